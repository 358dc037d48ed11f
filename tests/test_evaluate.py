"""code/evaluate.py end to end on small files, against hand-computed scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EPS = 1e-6

CAR1 = "This is a white Audi Sedan."
CAR2 = "A black BESTUNE Sedan."
PED = "A female pedestrian is someone who walks on foot, with her body back to the camera. She is in a skirt."


@pytest.fixture()
def evaluate(load_script):
    """The namespace of code/evaluate.py (a stage script, not a package module)."""
    return load_script("evaluate")


def _write(tmp_path: Path, gt_lines: list[str], results: list[tuple[str, list[str]]]) -> tuple[str, str]:
    gt = tmp_path / "gt.txt"
    gt.write_text("\n".join(gt_lines) + "\n", encoding="utf-8")
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"results": [{"text": t, "image_names": n} for t, n in results]}), encoding="utf-8")
    return str(res), str(gt)


def _pad(names: list[str], k: int = 10) -> list[str]:
    return names + [f"junk{i}.jpg" for i in range(k - len(names))]


def test_json_output_hand_computed(tmp_path, evaluate, capsys):
    gt_lines = [f"{CAR1}$a.jpg$b.jpg", f"{CAR2}$c.jpg$d.jpg$e.jpg", f"{PED}$p.jpg"]
    results = [
        (CAR1, _pad(["a.jpg", "x.jpg", "b.jpg"])),  # hits at 1, 3 of 2 relevant
        (CAR2, _pad(["x.jpg", "y.jpg", "z.jpg", "w.jpg", "e.jpg"])),  # one hit at 5 of 3 relevant
        (PED, _pad([])),  # no hit
    ]
    res, gt = _write(tmp_path, gt_lines, results)
    evaluate["main"](["--results", res, "--gt", gt, "--json"])
    out = json.loads(capsys.readouterr().out)

    # official AP: car1 ((1+e)/1 + (2+e)/3)/(2+e) ~ 5/6; car2 ((1+e)/5)/(1+e) = 1/5; ped 0
    ap_car1 = ((1 + EPS) + (2 + EPS) / 3) / (2 + EPS)
    # standard AP@10: car1 (1 + 2/3)/2 = 5/6; car2 (1/5)/3 = 1/15; ped 0
    want_car = {"official_map10": (ap_car1 + 0.2) / 2, "map10": (5 / 6 + 1 / 15) / 2, "r1": 0.5, "r5": 1.0, "r10": 1.0}
    want_ped = {"official_map10": 0.0, "map10": 0.0, "r1": 0.0, "r5": 0.0, "r10": 0.0}
    want_all = {"official_map10": (ap_car1 + 0.2) / 3, "map10": (5 / 6 + 1 / 15) / 3,
                "r1": 1 / 3, "r5": 2 / 3, "r10": 2 / 3}
    assert set(out) == {"official_map10", "map10", "r1", "r5", "r10", "car", "people"}
    assert {k: out[k] for k in want_all} == pytest.approx(want_all, abs=1e-12)
    assert out["car"] == pytest.approx(want_car, abs=1e-12)
    assert out["people"] == pytest.approx(want_ped, abs=1e-12)


def test_official_semantics_long_list_and_repeats(tmp_path, evaluate, capsys):
    # A list of 11 with the only hit at rank 11 (the scorer walks all names: AP = 1/11), and a repeated relevant
    # name ([x, p, p]: ((1+e)/2 + (2+e)/3)/(2+e) ~ 7/12). A warning says these lists break the format rules.
    gt_lines = [f"{CAR1}$a.jpg", f"{PED}$p.jpg"]
    results = [(CAR1, [f"x{i}.jpg" for i in range(10)] + ["a.jpg"]), (PED, ["x.jpg", "p.jpg", "p.jpg"])]
    res, gt = _write(tmp_path, gt_lines, results)
    evaluate["main"](["--results", res, "--gt", gt, "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    ap_ped = ((1 + EPS) / 2 + (2 + EPS) / 3) / (2 + EPS)
    assert out["car"]["official_map10"] == pytest.approx(1 / 11, abs=1e-12)
    assert out["people"]["official_map10"] == pytest.approx(ap_ped, abs=1e-12)
    assert out["official_map10"] == pytest.approx((1 / 11 + ap_ped) / 2, abs=1e-12)
    # standard metrics stop at 10 and count a name once: car 0, people 1/2
    assert out["map10"] == pytest.approx(0.25)
    assert (out["r1"], out["r5"], out["r10"]) == (0.0, 0.5, 0.5)


def test_table_output(tmp_path, evaluate, capsys):
    res, gt = _write(tmp_path, [f"{CAR1}$a.jpg", f"{PED}$p.jpg"], [(CAR1, _pad(["a.jpg"])), (PED, _pad(["p.jpg"]))])
    evaluate["main"](["--results", res, "--gt", gt])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "official mAP@10" in lines[0] and "R@10" in lines[0]
    assert [ln.split()[:2] for ln in lines[1:]] == [["all", "2"], ["car", "1"], ["people", "1"]]
    assert lines[1].split()[2:] == ["100.00"] * 5


def _run_fail(evaluate, capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate["main"](argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_wrong_order_exits_2(tmp_path, evaluate, capsys):
    res, gt = _write(tmp_path, [f"{CAR1}$a.jpg", f"{PED}$p.jpg"], [(PED, _pad(["p.jpg"])), (CAR1, _pad(["a.jpg"]))])
    err = _run_fail(evaluate, capsys, ["--results", res, "--gt", gt, "--json"])
    assert "The order of texts is wrong" in err and "index 0" in err and "results.json" in err


def test_fewer_texts_than_gt_exits_2(tmp_path, evaluate, capsys):
    res, gt = _write(tmp_path, [f"{CAR1}$a.jpg", f"{PED}$p.jpg"], [(CAR1, _pad(["a.jpg"]))])
    err = _run_fail(evaluate, capsys, ["--results", res, "--gt", gt])
    assert "The order of texts is wrong" in err and "1 texts but the ground truth has 2" in err


def test_missing_file_exits_2(tmp_path, evaluate, capsys):
    res, gt = _write(tmp_path, [f"{CAR1}$a.jpg"], [(CAR1, _pad(["a.jpg"]))])
    err = _run_fail(evaluate, capsys, ["--results", res, "--gt", str(tmp_path / "nope.txt")])
    assert "nope.txt" in err and "not found" in err
    err = _run_fail(evaluate, capsys, ["--results", str(tmp_path / "none.json"), "--gt", gt])
    assert "none.json" in err and "not found" in err


def test_malformed_gt_line_exits_2(tmp_path, evaluate, capsys):
    res, gt = _write(tmp_path, [f"{CAR1}$a.jpg", "", f"{PED}$$p.jpg"], [(CAR1, _pad(["a.jpg"]))])
    err = _run_fail(evaluate, capsys, ["--results", res, "--gt", gt])
    assert f"{gt}:2: blank line" in err and f"{gt}:3: empty image name" in err


def test_malformed_results_exits_2(tmp_path, evaluate, capsys):
    _, gt = _write(tmp_path, [f"{CAR1}$a.jpg"], [])
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [{"text": 1}]}', encoding="utf-8")
    err = _run_fail(evaluate, capsys, ["--results", str(bad), "--gt", gt])
    assert "bad.json: result 0: 'text' must be a string" in err


def test_gallery_adds_the_random_baseline(tmp_path, evaluate, capsys):
    from PIL import Image

    gallery = tmp_path / "imgs"
    gallery.mkdir()
    for i in range(20):
        Image.new("RGB", (4, 4)).save(gallery / f"{i}.jpg")
    res, gt = _write(tmp_path, [f"{CAR1}$3.jpg", f"{PED}$4.jpg"], [(CAR1, _pad(["3.jpg"])), (PED, _pad([]))])
    evaluate["main"](["--results", res, "--gt", gt, "--json", "--gallery", str(gallery)])
    out = json.loads(capsys.readouterr().out)
    # one relevant image among 20, 10 drawn at random: R@10 = 1/2 in expectation
    assert 0.25 < out["random"]["r10"] < 0.75 and set(out["random"]) >= {"car", "people"}
    assert out["official_map10"] == pytest.approx(0.5)
