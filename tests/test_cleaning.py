"""Tests of the detection cleaning stage (traffic_retrieval.cleaning, train_det_cls.py, val_det_cls.py).

Every test runs the shipped demo detector (model_pth/demo) on small generated data; none fakes the detector.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from traffic_retrieval import cleaning
from traffic_retrieval.categories import CATEGORIES, split_coded_name, text_category
from traffic_retrieval.cleaning import CleaningError, CleaningResult, clean_split, parse_args
from traffic_retrieval.detection import (
    DEMO_DET_CHECKPOINT,
    DEMO_DET_CONFIG,
    RTMDET_L_CHECKPOINT_NAME,
    BatchDetector,
    Detection,
    load_detector,
)
from traffic_retrieval.labels import CR_INSIDE, LabelRecord, read_label_file_strict

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / DEMO_DET_CONFIG)
CHECKPOINT = str(REPO / DEMO_DET_CHECKPOINT)

KEPT_REASONS = {"detected category agrees with the caption", "undetected, kept under the caption's category"}


class Counting:
    """The real detector, counting the images it is given; ``fail_after`` batches it raises (an interruption)."""

    def __init__(self, inner: BatchDetector, fail_after: int | None = None) -> None:
        self.inner, self.fail_after = inner, fail_after
        self.calls = self.images = 0

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted by the test")
        self.calls += 1
        self.images += len(images)
        return self.inner(images)


@pytest.fixture(scope="module")
def detector() -> BatchDetector:
    return BatchDetector(load_detector(CONFIG, CHECKPOINT, "cpu"))


def run(data: Path, split: str = "train", *extra: str, detector=None, checkpoint: str = CHECKPOINT) -> CleaningResult:
    cfg = parse_args(["--data_path", str(data), "--det_config", CONFIG, "--det_checkpoint", checkpoint, *extra],
                     split=split)
    return clean_split(cfg, detector=detector)


def report(data: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"det_{split}_report.jsonl").read_text(encoding="utf-8").splitlines()]


def originals_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    assert {k: after.get(k) for k in before} == before


# ------------------------------------------------------------------------------------------------- end to end
def test_end_to_end_then_resume_from_cache(dataset_copy: Path, hash_tree, detector: BatchDetector) -> None:
    data = dataset_copy / "train"
    before = hash_tree(data)
    counter = Counting(detector)
    res = run(data, "train", "--batch_size", "5", detector=counter)
    assert counter.images == 24 and counter.calls == 5
    assert res.n_detected == 24 and res.n_cached == 0

    original = {r.name: r for r in read_label_file_strict(data / "train_label.txt")}
    cleaned = read_label_file_strict(data / "fliter_train_labels.txt")
    rows = report(data, "train")
    assert [r["line_no"] for r in rows] == list(range(1, 25))
    kept = [r for r in rows if r["decision"] == "kept"]
    assert len(cleaned) == len(kept) == sum(res.kept.values()) >= 20
    assert all(r["reason"] in KEPT_REASONS for r in kept)
    agree = [r for r in kept if r["reason"] == "detected category agrees with the caption"]
    assert len(agree) >= 18  # the shipped detector sees most tiny images
    for r in rows:
        assert set(r["best_scores"]) == set(CATEGORIES) and r["caption_category"] in CATEGORIES
        assert r["from_cache"] is False

    # sorted: vehicles first, then people, each by original name; names coded by the caption's category
    keys = [(CATEGORIES.index(split_coded_name(r.name)[0]), split_coded_name(r.name)[1]) for r in cleaned]
    assert keys == sorted(keys) and keys[0][0] == 0 and keys[-1][0] == 1
    image_dir = data / "train_images"
    for rec in cleaned:
        category, name = split_coded_name(rec.name)
        assert category == text_category(rec.caption)
        assert (rec.attribute, rec.caption) == (original[name].attribute, original[name].caption)
        link = image_dir / rec.name
        assert link.is_symlink() and os.readlink(link) == name  # relative, into the same folder
        assert link.read_bytes() == (image_dir / name).read_bytes()
    originals_unchanged(before, hash_tree(data))
    summary = (data / "det_train_report.txt").read_text()
    assert "lines: 24" in summary and "images detected in this run: 24; from the cache: 0" in summary

    # second run: everything from the cache, the detector is never called, same outputs
    first = (data / "fliter_train_labels.txt").read_bytes()
    counter2 = Counting(detector)
    res2 = run(data, "train", detector=counter2)
    assert counter2.calls == 0 and res2.n_detected == 0 and res2.n_cached == 24
    assert (data / "fliter_train_labels.txt").read_bytes() == first
    assert all(r["from_cache"] for r in report(data, "train"))
    assert [r["link"] for r in report(data, "train") if r["decision"] == "kept"] == ["symlink (existing)"] * len(kept)
    # without an injected detector a fully cached run loads no model either, and another threshold needs no detection
    res3 = run(data, "train", "--score_thr", "0.9")
    assert res3.n_detected == 0 and res3.n_cached == 24
    originals_unchanged(before, hash_tree(data))


def test_mismatch_is_dropped_and_its_old_link_removed(dataset_copy: Path, detector: BatchDetector) -> None:
    data = dataset_copy / "train"
    run(data, "val", detector=detector)
    rows = report(data, "val")
    best = {c: max((r for r in rows if r["detected"] == c == r["caption_category"]),
                   key=lambda r: r["best_scores"][c]) for c in CATEGORIES}
    car_name, person_name = best["car"]["name"], best["people"]["name"]
    assert (data / "val_images" / f"car_{car_name}").is_symlink()
    # the test (not the stage) puts a pedestrian picture under a vehicle caption
    shutil.copyfile(data / "val_images" / person_name, data / "val_images" / car_name)
    counter = Counting(detector)
    res = run(data, "val", detector=counter)
    assert counter.images == 1  # only the changed file is detected again
    row = next(r for r in report(data, "val") if r["name"] == car_name)
    assert row["decision"] == "dropped" and row["reason"] == "image looks like people, caption is about car"
    assert row["detected"] == "people" and row["caption_category"] == "car"
    assert not (data / "val_images" / f"car_{car_name}").exists()  # our stale link is gone
    assert car_name not in {split_coded_name(r.name)[1] for r in read_label_file_strict(data / "fliter_val_labels.txt")}
    assert res.reasons["dropped: image looks like people, caption is about car"] == 1


def test_interrupted_run_resumes_and_new_detector_invalidates(dataset_copy: Path, detector: BatchDetector,
                                                              tmp_path: Path) -> None:
    data = dataset_copy / "train"
    ckpt = tmp_path / "det.pth"
    shutil.copy2(CHECKPOINT, ckpt)
    with pytest.raises(KeyboardInterrupt):
        run(data, "val", "--batch_size", "4", detector=Counting(detector, fail_after=1), checkpoint=str(ckpt))
    assert len((data / "det_val_cache.jsonl").read_text().splitlines()) == 4
    assert not (data / "fliter_val_labels.txt").exists()  # outputs are written only at the end
    counter = Counting(detector)
    run(data, "val", "--batch_size", "4", detector=counter, checkpoint=str(ckpt))
    assert counter.images == 8
    os.utime(ckpt, ns=(1_000_000_000, 1_000_000_000))  # "another" checkpoint: the cache no longer applies
    counter = Counting(detector)
    res = run(data, "val", detector=counter, checkpoint=str(ckpt))
    assert counter.images == 12 and res.n_cached == 0
    assert len((data / "det_val_cache.jsonl").read_text().splitlines()) == 12


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def bad_split(tiny_dataset: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A val split with every kind of bad input; returns the folder and the line number of each case."""
    src = read_label_file_strict(tiny_dataset / "train" / "val_label.txt")
    cars = [r for r in src if text_category(r.caption) == "car"]
    people = [r for r in src if text_category(r.caption) == "people"]
    src_dir = tiny_dataset / "train" / "val_images"
    data = tmp_path / "bad"
    images = data / "val_images"
    images.mkdir(parents=True)
    for r in (cars[0], people[0]):
        shutil.copy2(src_dir / r.name, images / r.name)
    raw = (src_dir / cars[1].name).read_bytes()
    (images / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    Image.open(src_dir / people[1].name).convert("CMYK").save(images / "cmyk.jpg", format="JPEG")
    Image.open(src_dir / cars[2].name).convert("L").save(images / "gray.jpg", format="JPEG")
    Image.open(src_dir / people[2].name).save(images / "png.jpg", format="PNG")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")

    def line(name: str, rec) -> bytes:
        return f"{name}${rec.attribute}${rec.caption}".encode()

    cases = [
        ("car_ok", line(cars[0].name, cars[0])),
        ("people_ok", line(people[0].name, people[0])),
        ("missing", line("nothere.jpg", cars[3])),
        ("truncated", line("trunc.jpg", cars[1])),
        ("cmyk", line("cmyk.jpg", people[1])),
        ("gray", line("gray.jpg", cars[2])),
        ("png", line("png.jpg", people[2])),
        ("empty_file", line("empty.jpg", cars[4])),
        ("not_image", line("text.jpg", cars[4])),
        ("fields", b"a.jpg$only two fields"),
        ("blank", b"   "),  # a blank line in the middle
        ("duplicate", line(cars[0].name, cars[0])),
        ("not_utf8", b"bad\xff.jpg$white Audi.$This is a white Audi."),
        ("attribute", f"{people[0].name.replace('.jpg', 'x.jpg')}$white Audi Sedan.${people[0].caption}".encode()),
        ("path", line("../escape.jpg", cars[0])),
    ]
    body = b"\r\n".join(c[1] for c in cases) + b"\r\n\r\n\r\n"  # CRLF, two trailing blank lines
    (data / "val_label.txt").write_bytes(b"\xef\xbb\xbf" + body)  # and a BOM
    return data, {name: i for i, (name, _) in enumerate(cases, start=1)}


def test_bad_inputs_are_reported_and_nothing_is_changed(bad_split, hash_tree, detector: BatchDetector) -> None:
    data, at = bad_split
    before = hash_tree(data)
    res = run(data, "val", detector=detector)
    rows = {r["line_no"]: r for r in report(data, "val")}
    assert sorted(rows) == list(range(1, len(at) + 1))  # one row per input line; trailing blanks are not lines

    def row(case: str) -> dict:
        return rows[at[case]]

    expected_drops = {
        "missing": "image missing",
        "truncated": "image truncated",
        "empty_file": "image empty file",
        "not_image": "image unreadable",
        "duplicate": "duplicate image name",
        "not_utf8": "bad line: not valid UTF-8",
        "attribute": "caption is about people but the attribute is a car attribute",
        "path": "image name is not a plain file name",
        "blank": "bad line: blank line",
    }
    for case, reason in expected_drops.items():
        assert (row(case)["decision"], row(case)["reason"]) == ("dropped", reason), case
    assert row("fields")["reason"].startswith("bad line: expected 3 '$'-separated fields")
    assert "nothere.jpg" in row("missing")["detail"]
    # readable but unusual images are converted, detected and noted
    notes = {"cmyk": "CMYK image converted to RGB", "gray": "L image converted to RGB",
             "png": "PNG data under a .jpg name"}
    for case, note in notes.items():
        r = row(case)
        assert r["image_note"] == note and r["best_scores"] is not None, r
        assert r["detected"] in (r["caption_category"], None) or r["reason"].startswith("image looks like"), r
    for case in ("car_ok", "people_ok"):
        assert row(case)["decision"] == "kept" and row(case)["reason"] in KEPT_REASONS
    assert res.input_notes == ["UTF-8 byte-order mark ignored", "CRLF line ends accepted",
                               "2 trailing blank line(s) ignored"]
    summary = (data / "det_val_report.txt").read_text()
    assert "input: CRLF line ends accepted" in summary and "       1  image truncated" in summary
    cleaned = read_label_file_strict(data / "fliter_val_labels.txt")
    assert {split_coded_name(r.name)[1] for r in cleaned} >= {row("car_ok")["name"], row("people_ok")["name"]}
    assert not (data / "fliter_val_labels.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    assert b"\r" not in (data / "fliter_val_labels.txt").read_bytes()
    originals_unchanged(before, hash_tree(data))
    assert not (data.parent / "escape.jpg").exists()


def test_links_never_replace_user_files_and_undetected_rule(bad_split, hash_tree, detector: BatchDetector) -> None:
    data, at = bad_split
    images = data / "val_images"
    lines = (data / "val_label.txt").read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\r\n")
    car_line, people_line = lines[at["car_ok"] - 1], lines[at["people_ok"] - 1]
    car_name = car_line.split(b"$")[0].decode()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(images / "blank.jpg", format="JPEG")  # nothing to detect
    (images / f"car_{car_name}").write_bytes(b"the user's own file")  # the name our link would take
    (data / "val_label.txt").write_bytes(
        b"\n".join([car_line, people_line, b"blank.jpg$white Audi Sedan.$This is a white Audi Sedan."]) + b"\n")
    before = hash_tree(data)

    run(data, "val", detector=detector)
    rows = report(data, "val")
    assert rows[0]["decision"] == "dropped" and rows[0]["reason"] == "link name taken by another file"
    assert (images / f"car_{car_name}").read_bytes() == b"the user's own file"
    assert rows[1]["decision"] == "kept"
    assert (rows[2]["decision"], rows[2]["reason"], rows[2]["detected"]) == (
        "kept", "undetected, kept under the caption's category", None)
    assert (images / "car_blank.jpg").is_symlink()

    run(data, "val", "--no-keep_undetected", detector=detector)
    rows = report(data, "val")
    assert (rows[2]["decision"], rows[2]["reason"]) == ("dropped", "undetected")
    assert not (images / "car_blank.jpg").exists()  # our link of the previous run is removed
    assert [split_coded_name(r.name)[1] for r in read_label_file_strict(data / "fliter_val_labels.txt")] == [
        people_line.split(b"$")[0].decode()]
    originals_unchanged(before, hash_tree(data))


def test_empty_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "val_images").mkdir(parents=True)
    (data / "val_label.txt").write_bytes(b"")
    res = run(data, "val")
    assert res.n_lines == 0 and res.kept == {} and res.dropped == 0
    assert (data / "fliter_val_labels.txt").read_bytes() == b""
    assert (data / "det_val_report.jsonl").read_bytes() == b""
    assert "empty split" in (data / "det_val_report.txt").read_text()
    assert (data / "val_label.txt").read_bytes() == b""


# ------------------------------------------------------------------------------------------------- the scripts
def test_scripts_share_one_module_and_differ_only_in_split(dataset_copy: Path) -> None:
    train = runpy.run_path(str(REPO / "train_det_cls.py"), run_name="train_det_cls_under_test")
    val = runpy.run_path(str(REPO / "val_det_cls.py"), run_name="val_det_cls_under_test")
    assert train["parse_args"]([]).split == "train" and val["parse_args"]([]).split == "val"
    cfg = val["parse_args"]([])
    assert cfg.data_path == Path("dataset/train") and cfg.score_thr == 0.3 and cfg.keep_undetected
    assert cfg.det_checkpoint == f"model_pth/{RTMDET_L_CHECKPOINT_NAME}" and cfg.det_config.startswith("mmdet::")
    res = val["main"](["--data_path", str(dataset_copy / "train"), "--det_config", CONFIG,
                       "--det_checkpoint", CHECKPOINT, "--threads", "1"])
    assert res.split == "val" and res.n_lines == 12
    assert (dataset_copy / "train" / "fliter_val_labels.txt").is_file()
    with pytest.raises(SystemExit):
        val["parse_args"](["--score_thr", "0"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data_path", "no/such/dir"], "val_label.txt not found"),
        (["--det_checkpoint", "no/such.pth"], RTMDET_L_CHECKPOINT_NAME),
    ],
)
def test_script_errors_are_one_clear_line(args: list[str], message: str, tiny_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "train"
    shutil.copytree(tiny_dataset / "train", data)
    proc = subprocess.run([sys.executable, str(REPO / "val_det_cls.py"), "--data_path", str(data), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("detector", [[], ["--det_config", CONFIG, "--det_checkpoint", CHECKPOINT]],
                         ids=["packaged-config", "demo-detector"])
def test_missing_mmdet_is_one_clear_line(detector: list[str], tiny_dataset: Path, tmp_path: Path) -> None:
    """An environment without mmdet (torch only, like the GPU machines) gets the install hint, not a traceback."""
    data = tmp_path / "train"
    shutil.copytree(tiny_dataset / "train", data)
    argv = [str(REPO / "val_det_cls.py"), "--data_path", str(data), *detector]
    # sys.modules[name] = None makes every import of that name raise ImportError, as if it were not installed.
    code = ("import runpy, sys; sys.modules['mmdet'] = None; "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "needs mmdet 3.3.0 and mmcv 2.1.0" in proc.stderr and "make install" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (data / "fliter_val_labels.txt").exists()


# ------------------------------------------------------------------------------------------------- review fixes
@pytest.fixture()
def small_split(tiny_dataset: Path, tmp_path: Path) -> tuple[Path, list[LabelRecord]]:
    """A val split of two vehicle and two pedestrian images (no label file yet); returns the folder and records."""
    src = read_label_file_strict(tiny_dataset / "train" / "val_label.txt")
    recs = [r for r in src if text_category(r.caption) == "car"][:2] + \
        [r for r in src if text_category(r.caption) == "people"][:2]
    data = tmp_path / "small"
    (data / "val_images").mkdir(parents=True)
    for r in recs:
        shutil.copy2(tiny_dataset / "train" / "val_images" / r.name, data / "val_images" / r.name)
    return data, recs


def _labels(recs: Sequence[LabelRecord], end: bytes = b"\n") -> bytes:
    return b"".join(r.to_line().encode() + end for r in recs)


def _coded_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.split("_", 1)[0] in CATEGORIES)


def _main(data: Path, *extra: str) -> CleaningResult:
    return cleaning.main(["--data_path", str(data), "--det_config", CONFIG, "--det_checkpoint", CHECKPOINT,
                          "--threads", "1", *extra], split="val")


def test_carriage_returns_never_reach_the_cleaned_file(small_split, detector: BatchDetector) -> None:
    data, recs = small_split
    (data / "val_label.txt").write_bytes(_labels(recs, b"\r\r\n"))  # unix2dos run twice
    res = run(data, "val", detector=detector)
    assert sum(res.kept.values()) == 4
    assert b"\r" not in (data / "fliter_val_labels.txt").read_bytes()
    assert [r.caption for r in read_label_file_strict(data / "fliter_val_labels.txt")] == \
        [r.caption for r in sorted(recs, key=lambda r: (CATEGORIES.index(text_category(r.caption)), r.name))]
    # old-Mac CR-only line ends: the file is one line, reported and dropped; nothing kept is an error after the report
    (data / "val_label.txt").write_bytes(_labels(recs, b"\r"))
    with pytest.raises(SystemExit, match=r"no line kept out of 1 .*carriage return inside the line"):
        _main(data)
    assert [(r["line_no"], r["reason"]) for r in report(data, "val")] == [(1, f"bad line: {CR_INSIDE}")]
    assert (data / "fliter_val_labels.txt").read_bytes() == b""
    assert _coded_files(data / "val_images") == []  # the links of the first run no longer apply


def test_a_failed_write_changes_no_link(small_split, detector: BatchDetector, monkeypatch) -> None:
    data, recs = small_split
    (data / "val_label.txt").write_bytes(_labels(recs))

    def refuse(path, records):
        raise ValueError("refused by the test")

    monkeypatch.setattr(cleaning, "write_label_file", refuse)
    with pytest.raises(CleaningError, match="cannot write .*fliter_val_labels.txt: refused by the test"):
        run(data, "val", detector=detector)
    assert _coded_files(data / "val_images") == []


def test_utf16_file_and_nothing_kept_stop_the_stage(small_split) -> None:
    data, recs = small_split
    (data / "val_label.txt").write_bytes(_labels(recs, b"\r\n").decode().encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(SystemExit, match=r"val_label.txt is UTF-16 encoded; save it as UTF-8"):
        _main(data)
    missing = [LabelRecord(f"gone{i}.jpg", r.attribute, r.caption) for i, r in enumerate(recs)]
    (data / "val_label.txt").write_bytes(_labels(missing))
    with pytest.raises(SystemExit, match=r"no line kept out of 4 .*most common: dropped: image missing, 4 line"):
        _main(data)
    assert "       4  image missing" in (data / "det_val_report.txt").read_text()  # the report is there


def test_an_image_the_detector_fails_on_is_dropped_alone(small_split, detector: BatchDetector) -> None:
    data, recs = small_split
    thin = []
    for name in ("thin1.jpg", "thin2.jpg"):  # mmcv's resize asserts in OpenCV on a 1x3000 strip
        Image.new("RGB", (1, 3000), (200, 0, 0)).save(data / "val_images" / name)
        thin.append(LabelRecord(name, recs[0].attribute, recs[0].caption))
    (data / "val_label.txt").write_bytes(_labels([recs[0], *thin, *recs[1:]]))
    counter = Counting(detector)
    res = run(data, "val", "--batch_size", "8", detector=counter)
    rows = report(data, "val")
    for row in rows[1:3]:
        assert (row["decision"], row["reason"]) == ("dropped", "detector failed")
        assert "thin" in row["detail"] and "OpenCV" in row["detail"]
    assert [r["decision"] for r in rows[:1] + rows[3:]] == ["kept"] * 4 and res.n_detected == 4
    assert counter.calls == 1 + 6  # the batch, then image by image
    assert "thin" not in (data / "det_val_cache.jsonl").read_text()  # a later run tries them again
    # The rerun detects only the two strips, which fail together: a plain probe image shows the detector works, so
    # they are dropped again and the stage does not stop.
    counter = Counting(detector)
    run(data, "val", detector=counter)
    assert counter.images == 2 + 2 + 1 and [r["reason"] for r in report(data, "val")[1:3]] == ["detector failed"] * 2

    def broken(images: Sequence[np.ndarray]) -> list[list[Detection]]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    (data / "det_val_cache.jsonl").unlink()
    with pytest.raises(CleaningError, match="detector fails on every image, even a plain 64x64 one .*RuntimeError: CUDA"):
        run(data, "val", detector=broken)


def test_links_of_removed_or_malformed_lines_are_removed(small_split, hash_tree, detector: BatchDetector) -> None:
    data, recs = small_split
    images = data / "val_images"
    os.symlink(recs[0].name, images / f"people_{recs[0].name}")  # the user's, in our pattern, but an image of a line
    os.symlink(f"../elsewhere/{recs[1].name}", images / f"people_{recs[1].name}")  # the user's, pointing elsewhere
    (images / "car_notes.jpg").write_bytes(b"the user's own file")
    user_line = LabelRecord(f"people_{recs[0].name}", recs[0].attribute, recs[0].caption)
    before = hash_tree(images)  # the originals, the user's files and the look-alike link
    label = data / "val_label.txt"
    label.write_bytes(_labels([*recs, user_line]))
    run(data, "val", detector=detector)
    coded = {r.name: f"{text_category(r.caption)}_{r.name}" for r in recs}
    assert all((images / c).is_symlink() for c in coded.values())

    # line 1 removed, line 2 malformed (four fields)
    label.write_bytes(recs[1].to_line().encode() + b"$extra\n" + _labels([*recs[2:], user_line]))
    res = run(data, "val", detector=detector)
    assert not (images / coded[recs[0].name]).exists() and not (images / coded[recs[1].name]).exists()
    assert all((images / coded[r.name]).is_symlink() for r in recs[2:])
    assert sorted(res.links_removed) == sorted([coded[recs[0].name], coded[recs[1].name]])
    assert "links of a previous run removed (no longer apply): 2" in (data / "det_val_report.txt").read_text()
    assert (images / f"people_{recs[0].name}").is_symlink()  # named in the label file: never ours to delete
    assert os.readlink(images / f"people_{recs[1].name}") == f"../elsewhere/{recs[1].name}"
    originals_unchanged(before, hash_tree(images))


def test_copies_are_recorded_and_only_ours_removed(small_split, detector: BatchDetector, monkeypatch) -> None:
    data, recs = small_split
    images = data / "val_images"
    user_copy = images / f"{text_category(recs[1].caption)}_{recs[1].name}"
    shutil.copyfile(images / recs[1].name, user_copy)  # the user's identical copy, made before the stage
    (data / "val_label.txt").write_bytes(_labels(recs))

    def no_links(*args, **kwargs):
        raise OSError("links not supported by the test's file system")

    with monkeypatch.context() as m:
        m.setattr(os, "symlink", no_links)
        m.setattr(os, "link", no_links)
        run(data, "val", detector=detector)
        rows = report(data, "val")
        assert [r["link"] for r in rows] == ["copy", "copy (existing)", "copy", "copy"]
        ours = sorted(r["coded_name"] for r in rows if r["link"] == "copy")
        assert json.loads((data / "det_val_copies.json").read_text()) == ours

        (data / "val_label.txt").write_bytes(_labels(recs[2:]))  # the two vehicle lines removed
        run(data, "val", detector=detector)
    assert not (images / rows[0]["coded_name"]).exists()  # our copy
    assert user_copy.read_bytes() == (images / recs[1].name).read_bytes()  # the user's copy is left
    assert json.loads((data / "det_val_copies.json").read_text()) == ours[1:]


def test_copies_made_before_a_failed_link_are_recorded(small_split, detector: BatchDetector, monkeypatch) -> None:
    data, recs = small_split
    (data / "val_label.txt").write_bytes(_labels(recs))
    real_copy, copied = shutil.copy2, []

    def copy_until_the_disk_is_full(src, dst, *args, **kwargs):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(Path(src).name)
        return real_copy(src, dst, *args, **kwargs)

    def no_links(*args, **kwargs):
        raise OSError("links not supported by the test's file system")

    with monkeypatch.context() as m:
        m.setattr(os, "symlink", no_links)
        m.setattr(os, "link", no_links)
        m.setattr(shutil, "copy2", copy_until_the_disk_is_full)
        with pytest.raises(CleaningError, match="No space left on device"):
            run(data, "val", detector=detector)
    first = f"{text_category(recs[0].caption)}_{recs[0].name}"
    assert copied == [recs[0].name] and (data / "val_images" / first).is_file()
    assert json.loads((data / "det_val_copies.json").read_text()) == [first]  # so a later run knows it is ours


def test_missing_val_label_points_at_the_archive_layout(tmp_path: Path) -> None:
    (tmp_path / "dataset" / "train").mkdir(parents=True)
    (tmp_path / "dataset" / "val" / "val_images").mkdir(parents=True)
    (tmp_path / "dataset" / "val" / "val_label.txt").write_text("")
    with pytest.raises(SystemExit, match=r"val_label.txt not found.*the challenge archive has it in .*dataset/val: "
                                         r"move or link val_label.txt and val_images/ from there into .*dataset/train"):
        _main(tmp_path / "dataset" / "train")
