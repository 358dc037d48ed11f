"""code/infer.py end to end on a tiny generated test set: format, order, uniqueness, names, metric, the ranking
itself, the gallery cache, category restriction, FAISS, two-process encoding, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import traffic_retrieval.inference as inference
from traffic_retrieval.categories import text_category
from traffic_retrieval.checkpoint import load_weights
from traffic_retrieval.distributed import free_port
from traffic_retrieval.encoding import encode_images, encode_texts, list_images
from traffic_retrieval.labels import read_ground_truth, read_test_text
from traffic_retrieval.metrics import official_map
from traffic_retrieval.modeling import create_model
from traffic_retrieval.submission import SubmissionError, load_submission, validate_submission
from traffic_retrieval.tokenizer import Tokenizer
from traffic_retrieval.transforms import eval_transform

MODEL = "beit3_nano_patch16_32"
PADS = {"car": 0, "people": 8}  # the eval padding each test checkpoint was validated with
REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random nano models: car as a plain {'model': sd} .pth, people in the DeepSpeed tag-directory layout; both
    carry the trainer's config as 'args' (people validated with 8 px side padding)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    car = root / "car_best.pth"
    torch.save({"model": create_model(MODEL).state_dict(), "epoch": 3,
                "args": {"data": {"category": "car", "people_pad": 70}}}, car)
    people = root / "pt_out_people" / "checkpoint-best"
    people.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save({"module": create_model(MODEL).state_dict(), "args": {"data": {"category": "people", "people_pad": 8}}},
               people / "mp_rank_00_model_states.pt")
    return {"car": car, "people": people}


def _mix_queries(test_dir: Path) -> None:
    """Interleave people and car queries (people first): the real file is car-first, the code must not rely on it."""
    q = read_test_text(test_dir / "test_text.txt")
    cars, people = [x for x in q if text_category(x) == "car"], [x for x in q if text_category(x) == "people"]
    mixed = [x for pair in zip(people, cars) for x in pair]
    (test_dir / "test_text.txt").write_text("".join(x + "\n" for x in mixed), encoding="utf-8")
    gt = dict(read_ground_truth(test_dir / "test_gt.txt"))
    (test_dir / "test_gt.txt").write_text("".join("$".join([x, *gt[x]]) + "\n" for x in mixed), encoding="utf-8")


def _make_test_dir(tiny_dataset: Path, dst: Path, spm: Path, load_script, categories: Path | None = None) -> Path:
    shutil.copytree(tiny_dataset / "test", dst)
    _mix_queries(dst)
    argv = ["--data_path", str(dst), "--sentencepiece_model", str(spm)]
    load_script("jsonl_test")["main"](argv + (["--image_categories", str(categories)] if categories else []))
    return dst


@pytest.fixture(scope="module")
def test_dir(tiny_dataset, tiny_spm, load_script, tmp_path_factory) -> Path:
    """An indexed copy of the tiny test split (read-only for the tests: they write into their own output dirs)."""
    return _make_test_dir(tiny_dataset, tmp_path_factory.mktemp("data") / "test", tiny_spm, load_script)


@pytest.fixture()
def infer(load_script, tiny_spm, checkpoints):
    """Run code/infer.py's main with the tiny model and checkpoints; extra flags override."""
    main = load_script("infer")["main"]

    def run(data: Path, out: Path, *extra: str) -> dict:
        argv = ["--model", MODEL, "--input_size", "32", "--data_path", str(data), "--sentencepiece_model",
                str(tiny_spm), "--finetune_car", str(checkpoints["car"]), "--finetune_people",
                str(checkpoints["people"]), "--output_dir", str(out), "--device", "cpu", *extra]
        return main(argv)

    return run


def _error(fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return str(e.value.code)


def _results(path: Path) -> list[tuple[str, list[str]]]:
    return load_submission(path)


def _reference_topk(ckpt: Path | list[tuple[Path, int]], image_dir: Path, spm: Path, texts: list[str],
                    pad: int = 0, k: int = 10) -> list[list[str]]:
    """Brute force: every image and text encoded directly, the full score matrix, a stable descending sort. A list
    of (checkpoint, padding) is an ensemble: the mean of the members' score matrices."""
    members = ckpt if isinstance(ckpt, list) else [(ckpt, pad)]
    paths = list_images(image_dir)
    scores = 0
    for path, member_pad in members:
        model = create_model(MODEL)
        load_weights(model, path)
        img = encode_images(model, paths, eval_transform(32, member_pad), batch_size=64).features
        txt = encode_texts(model, Tokenizer(spm), texts)
        scores = scores + (txt @ img.T) / len(members)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return [[paths[j].name for j in row] for row in order.tolist()]


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_format_order_names_metric(test_dir, infer, tiny_spm, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    summary = infer(test_dir, out, "--eval")
    texts = read_test_text(test_dir / "test_text.txt")
    on_disk = {p.name for p in (test_dir / "test_images").iterdir()}
    cats = [text_category(t) for t in texts]
    assert cats[:2] == ["people", "car"]  # the mixed order really is mixed
    assert summary["queries"] == {"car": 8, "people": 8} and summary["failed_images"] == []

    res = _results(out / "infer_json_all.json")
    assert [t for t, _ in res] == texts  # order and characters of test_text.txt
    for _, names in res:
        assert len(names) == 10 and len(set(names)) == 10 and set(names) <= on_disk
    validate_submission(json.loads((out / "infer_json_all.json").read_text()), texts, on_disk)
    by_text_index = dict(enumerate(res))
    for c in ("car", "people"):
        part = _results(out / f"infer_json_{c}.json")
        idx = [i for i, x in enumerate(cats) if x == c]
        assert part == [by_text_index[i] for i in idx]  # that category only, in test_text order, same lists

    # The ranking itself: each query ranked by its own category's model over the whole gallery, the images framed
    # as the checkpoint was validated (people: side padding from the checkpoint's training config).
    for c in ("car", "people"):
        idx = [i for i, x in enumerate(cats) if x == c]
        ref = _reference_topk(checkpoints[c], test_dir / "test_images", tiny_spm, [texts[i] for i in idx], PADS[c])
        assert [res[i][1] for i in idx] == ref
        assert torch.load(out / "cache" / f"gallery_{c}.pt")["spec"]["pad"] == PADS[c]

    metrics = json.loads((out / "infer_metrics.json").read_text())
    expected = official_map(res, read_ground_truth(test_dir / "test_gt.txt"))
    assert 0.0 <= metrics["official_map10"] <= 1.0
    assert metrics["official_map10"] == pytest.approx(expected, abs=1e-12)
    assert set(metrics["car"]) >= {"official_map10", "map10", "r1", "r5", "r10"}
    assert summary["metrics"]["official_map10"] == metrics["official_map10"]
    printed = capsys.readouterr().out
    assert "infer_json_all.json" in printed and "official_map10" in printed


def test_gallery_cache_reused_and_refreshed(test_dir, infer, checkpoints, tmp_path, monkeypatch):
    calls: list[int] = []
    real = inference.encode_images

    def counting(model, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_images", counting)
    data = tmp_path / "test"
    shutil.copytree(test_dir, data)
    out = tmp_path / "out"
    infer(data, out)
    first = (out / "infer_json_all.json").read_bytes()
    assert calls == [16, 16]  # each image encoded once per model
    assert {p.name for p in (out / "cache").iterdir()} == {"gallery_car.pt", "gallery_people.pt"}

    calls.clear()
    infer(data, out)
    assert calls == [] and (out / "infer_json_all.json").read_bytes() == first

    # A changed image (new mtime) is re-encoded by each model; nothing else is.
    img = sorted((data / "test_images").iterdir())[3]
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()
    infer(data, out)
    assert calls == [1, 1] and (out / "infer_json_all.json").read_bytes() == first

    # Another checkpoint for one model invalidates only that model's cache.
    calls.clear()
    infer(data, out, "--finetune_people", str(checkpoints["car"]))
    assert calls == [16]
    calls.clear()
    infer(data, out, "--no_cache")
    assert calls == [16, 16]


def test_restrict_to_category(tiny_dataset, tiny_spm, load_script, infer, tmp_path, monkeypatch):
    names = sorted(p.name for p in (tiny_dataset / "test" / "test_images").iterdir())
    unknown = next(n for n in names if not n.startswith("vehicle_"))  # one pedestrian image without a category
    cat_file = tmp_path / "image_categories.txt"
    cat_file.write_text("".join(f"{n}${'car' if n.startswith('vehicle_') else 'people'}\n"
                                for n in names if n != unknown))
    data = _make_test_dir(tiny_dataset, tmp_path / "test", tiny_spm, load_script, cat_file)
    out = tmp_path / "out"
    infer(data, out, "--restrict_to_category")
    cars = {n for n in names if n.startswith("vehicle_")}
    people = set(names) - cars - {unknown}
    for c, own in (("car", cars), ("people", people)):
        allowed = own | {unknown}
        for text, ranked in _results(out / f"infer_json_{c}.json"):
            # the allowed images (own category + unknown) come first; the list is then filled up to 10
            assert set(ranked[: len(allowed)]) == allowed, text
            assert len(ranked) == 10 and len(set(ranked)) == 10
    # Without the flag the same index ranks everything together: car queries then show pedestrian images early.
    infer(data, tmp_path / "free")
    free = _results(tmp_path / "free" / "infer_json_car.json")
    assert any(set(r[:9]) != cars | {unknown} for _, r in free)

    # Switching the flag on and off over one cache encodes nothing again: the subset's run keeps the other images.
    calls: list[int] = []
    real = inference.encode_images
    monkeypatch.setattr(inference, "encode_images", lambda m, paths, *a, **k: calls.append(len(paths)) or
                        real(m, paths, *a, **k))
    (data / "test_images" / unknown).touch()  # one changed image: the subsets (both allow it) encode only it
    infer(data, tmp_path / "free", "--restrict_to_category")
    infer(data, tmp_path / "free")
    assert calls == [1, 1]


def test_padding_override_and_swapped_checkpoint_warn(test_dir, infer, checkpoints, tmp_path, caplog):
    out = tmp_path / "out"
    infer(test_dir, out, "--people_pad", "0", "--finetune_car", str(checkpoints["people"]))
    assert "encoding with padding 0 but it was validated with 8" in caplog.text
    assert "was fine-tuned on 'people', not 'car'" in caplog.text
    assert torch.load(out / "cache" / "gallery_people.pt")["spec"]["pad"] == 0
    assert torch.load(out / "cache" / "gallery_car.pt")["spec"]["pad"] == 8  # the people checkpoint's own padding


def test_ensemble_ranks_by_the_mean_cosine_similarity(test_dir, infer, tiny_spm, checkpoints, tmp_path, monkeypatch):
    """Two car checkpoints: each encodes with its own validated padding, the car queries are ranked by the mean of
    the two models' similarities; the first member shares the single-model cache, so it is not encoded again."""
    out = tmp_path / "out"
    infer(test_dir, out)  # single models: fills cache/gallery_car.pt
    encoded = []
    real = inference.encode_images_sharded

    def counting(model, paths, *args, **kwargs):
        encoded.append(len(paths))
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_images_sharded", counting)
    summary = infer(test_dir, out, "--finetune_car", str(checkpoints["car"]), str(checkpoints["people"]))
    assert encoded == [16]  # only the second car member encodes the gallery; the rest comes from the caches
    assert torch.load(out / "cache" / "gallery_car_1.pt")["spec"]["pad"] == PADS["people"]
    texts = read_test_text(test_dir / "test_text.txt")
    res = _results(out / "infer_json_all.json")
    idx = [i for i, t in enumerate(texts) if text_category(t) == "car"]
    members = [(checkpoints["car"], PADS["car"]), (checkpoints["people"], PADS["people"])]
    ensemble = _reference_topk(members, test_dir / "test_images", tiny_spm, [texts[i] for i in idx])
    assert [res[i][1] for i in idx] == ensemble
    single = _reference_topk(checkpoints["car"], test_dir / "test_images", tiny_spm, [texts[i] for i in idx])
    assert ensemble != single  # the second member really changes the ranking
    assert summary["queries"] == {"car": 8, "people": 8}


def test_ensemble_features_fuse_to_the_mean_and_drop_images_a_member_failed():
    torch.manual_seed(0)
    paths = [Path(f"{i}.jpg") for i in range(5)]
    g1, g2 = (torch.nn.functional.normalize(torch.randn(5, 8), dim=1) for _ in range(2))
    q1, q2 = (torch.nn.functional.normalize(torch.randn(3, 8), dim=1) for _ in range(2))
    a = inference.ImageFeatures(paths, g1)
    b = inference.ImageFeatures([paths[i] for i in (0, 1, 3, 4)], g2[[0, 1, 3, 4]], [(paths[2], "truncated")])
    gallery, queries = inference.ensemble_features([a, b], [q1, q2])
    keep = [0, 1, 3, 4]
    assert gallery.paths == [paths[i] for i in keep] and gallery.failed == [(paths[2], "truncated")]
    expected = (q1 @ g1[keep].T + q2 @ g2[keep].T) / 2
    assert torch.allclose(queries @ gallery.features.T, expected, atol=1e-6)
    assert torch.allclose(gallery.features.norm(dim=1), torch.ones(4)) and torch.allclose(queries.norm(dim=1),
                                                                                          torch.ones(3))
    assert inference.ensemble_features([a], [q1]) == (a, q1)
    with pytest.raises(ValueError, match="different images"):
        inference.ensemble_features([a, inference.ImageFeatures(paths[:4], g2[:4])], [q1, q2])


def test_ensemble_of_one_checkpoint_twice_is_refused(test_dir, infer, checkpoints, tmp_path):
    ckpt = checkpoints["people"]
    msg = _error(infer, test_dir, tmp_path / "out", "--finetune_people", str(ckpt),
                 str(ckpt / "mp_rank_00_model_states.pt"))
    assert "--finetune_people" in msg and "same checkpoint" in msg and not (tmp_path / "out").exists()


def test_faiss_gives_the_exact_ranking(test_dir, infer, tmp_path):
    infer(test_dir, tmp_path / "exact", "--no_cache")
    infer(test_dir, tmp_path / "faiss", "--no_cache", "--faiss")
    assert _results(tmp_path / "faiss" / "infer_json_all.json") == _results(tmp_path / "exact" / "infer_json_all.json")


def test_compiled_model_gives_the_same_ranking(test_dir, infer, tmp_path):
    infer(test_dir, tmp_path / "eager", "--no_cache")
    infer(test_dir, tmp_path / "compiled", "--no_cache", "--compile")
    assert _results(tmp_path / "compiled" / "infer_json_all.json") == \
        _results(tmp_path / "eager" / "infer_json_all.json")


def test_unreadable_image_is_reported_and_never_ranked(test_dir, infer, tmp_path, caplog):
    data = tmp_path / "test"
    shutil.copytree(test_dir, data)
    victim = sorted((data / "test_images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG after indexing
    out = tmp_path / "out"
    summary = infer(data, out)
    assert [n for n, _ in summary["failed_images"]] == [victim.name]
    assert victim.name in caplog.text and "never ranked" in caplog.text
    for _, ranked in _results(out / "infer_json_all.json"):
        assert victim.name not in ranked and len(ranked) == 10


def test_dist_eval_two_processes_equal_one(test_dir, infer, tiny_spm, checkpoints, tmp_path):
    """Sharded encoding over two processes gives the same files as one, also for an ensemble (people here)."""
    people = [str(checkpoints["people"]), str(checkpoints["car"])]
    infer(test_dir, tmp_path / "single", "--no_cache", "--finetune_people", *people)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in TORCHRUN_VARS:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "code" / "infer.py"),
           "--dist_eval", "--model", MODEL, "--input_size", "32", "--data_path", str(test_dir),
           "--sentencepiece_model", str(tiny_spm), "--finetune_car", str(checkpoints["car"]), "--finetune_people",
           *people, "--output_dir", str(tmp_path / "dist"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("infer_json_all.json", "infer_json_car.json", "infer_json_people.json"):
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    # rank 0 wrote the gathered features: all 16 images, in order, equal to one process's features
    for member in ("gallery_car.pt", "gallery_people.pt", "gallery_people_1.pt"):
        cache = torch.load(tmp_path / "dist" / "cache" / member)
        assert [e[0] for e in cache["entries"]] == sorted(p.name for p in (test_dir / "test_images").iterdir())
        assert cache["features"].shape[0] == 16


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_index_says_run_jsonl_test(tiny_dataset, infer, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(tiny_dataset / "test", data)
    msg = _error(infer, data, tmp_path / "out")
    assert "test index file(s) missing" in msg and "code/jsonl_test.py" in msg and "test.txt" in msg


def test_stale_index_is_detected(test_dir, infer, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(test_dir, data)
    lines = (data / "test_text.txt").read_text().splitlines()
    lines[2] = lines[2].replace(".", "!")
    (data / "test_text.txt").write_text("\n".join(lines) + "\n")
    msg = _error(infer, data, tmp_path / "out")
    assert "test_text.txt:3" in msg and "re-run" in msg and "jsonl_test.py" in msg


def test_checkpoint_of_another_model_size(test_dir, infer, tmp_path):
    wrong = tmp_path / "tiny.pth"
    torch.save({"model": create_model("beit3_tiny_patch8_64").state_dict()}, wrong)
    msg = _error(infer, test_dir, tmp_path / "out", "--finetune_car", str(wrong))
    assert "--finetune_car" in msg and str(wrong) in msg and "does not fit the model" in msg
    assert "model size differs" in msg


def test_missing_default_checkpoint_names_the_flag(test_dir, load_script, tiny_spm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative default code/pt_out_car/checkpoint-best does not exist here
    msg = _error(load_script("infer")["main"], ["--model", MODEL, "--data_path", str(test_dir),
                                                "--sentencepiece_model", str(tiny_spm), "--device", "cpu"])
    assert "code/pt_out_car/checkpoint-best" in msg and "checkpoint-best.pth" in msg and "--finetune_car" in msg


def test_plain_checkpoint_best_pth_is_found(test_dir, infer, checkpoints, tmp_path):
    run_dir = tmp_path / "pt_out_car"
    run_dir.mkdir()
    shutil.copy(checkpoints["car"], run_dir / "checkpoint-best.pth")
    infer(test_dir, tmp_path / "out", "--finetune_car", str(run_dir / "checkpoint-best"), "--no_cache")
    assert len(_results(tmp_path / "out" / "infer_json_all.json")) == 16


def test_a_model_encoding_at_another_size_than_it_was_trained_warns(tmp_path, caplog):
    path = tmp_path / "run.pth"
    torch.save({"model": create_model(MODEL).state_dict(), "args": {"model": {"model": MODEL, "input_size": None}}},
               path)
    assert inference.trained_for(torch.load(path)).input_size == 32  # None: the model's own size
    inference.load_model(MODEL, path, torch.device("cpu"), 32)
    assert "trained on" not in caplog.text
    model, _ = inference.load_model(MODEL, path, torch.device("cpu"), 64, what="--finetune_car run.pth")
    assert model.cfg.img_size == 64
    assert "--finetune_car run.pth was trained on 32 px images but encodes 64 px ones" in caplog.text
    assert inference.trained_for({"args": {"model": {"model": "beit3_future_model"}}}).input_size is None


def test_infer_sh_builds_the_infer_py_command(tmp_path):
    def command(**env: str) -> str:
        run = subprocess.run(["bash", str(REPO / "code" / "infer.sh"), "--eval"], cwd=tmp_path, text=True,
                             capture_output=True, check=True, env={**os.environ, "PYTHON": "echo", **env})
        return run.stdout.strip()

    default = command()
    assert default.startswith("code/infer.py --model beit3_large_patch16_384 --task flickr30k")
    assert "--input_size" not in default and default.endswith("--output_dir code --eval")  # the model's own size
    assert "--input_size 224 " in command(INPUT_SIZE="224")
    assert "--finetune_car a.pth b.pth --finetune_people" in command(CKPT_CAR="a.pth b.pth")
    two = command(NGPU="2")
    assert two.startswith("-m torch.distributed.run --nproc_per_node=2 code/infer.py") and two.endswith("--dist_eval --eval")


def test_fp16_on_cpu_fails_fast(test_dir, infer, tmp_path):
    msg = _error(infer, test_dir, tmp_path / "out", "--precision", "fp16")
    assert "fp16 is not supported on cpu" in msg and not (tmp_path / "out").exists()


def test_eval_without_ground_truth(test_dir, infer, tmp_path):
    msg = _error(infer, test_dir, tmp_path / "out", "--eval", "--gt", str(tmp_path / "nope.txt"))
    assert "--eval needs the ground truth" in msg and "nope.txt" in msg
    assert not (tmp_path / "out").exists()  # failed before any work


def test_ground_truth_is_checked_before_any_work(test_dir, infer, tmp_path):
    rows = read_ground_truth(test_dir / "test_gt.txt")
    rows[0], rows[1] = rows[1], rows[0]
    gt = tmp_path / "gt.txt"
    gt.write_text("".join("$".join([t, *names]) + "\n" for t, names in rows))
    msg = _error(infer, test_dir, tmp_path / "out", "--eval", "--gt", str(gt))
    assert "--eval: The order of texts is wrong: index 0" in msg
    assert not (tmp_path / "out").exists()  # nothing encoded


def test_metrics_of_an_earlier_submission_do_not_survive(test_dir, infer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "infer_metrics.json").write_text('{"official_map10": 0.99}')
    infer(test_dir, out, "--no_cache")
    assert (out / "infer_json_all.json").is_file() and not (out / "infer_metrics.json").exists()


def test_bad_results_files_get_clear_messages(test_dir, infer, load_script, tmp_path, capsys):
    out = tmp_path / "out"
    infer(test_dir, out, "--no_cache")
    texts = read_test_text(test_dir / "test_text.txt")
    gallery = {p.name for p in (test_dir / "test_images").iterdir()}
    good = json.loads((out / "infer_json_all.json").read_text())

    swapped = json.loads(json.dumps(good))
    swapped["results"][0], swapped["results"][1] = swapped["results"][1], swapped["results"][0]
    with pytest.raises(SubmissionError, match=r"result 0 .*text differs from query 0.*test_text.txt order"):
        validate_submission(swapped, texts, gallery)

    unknown = json.loads(json.dumps(good))
    unknown["results"][4]["image_names"][7] = "not_there.jpg"
    with pytest.raises(SubmissionError, match=r"result 4 .*'not_there.jpg' is not in the gallery"):
        validate_submission(unknown, texts, gallery)

    short = json.loads(json.dumps(good))
    short["results"][5]["image_names"] = short["results"][5]["image_names"][:9]
    with pytest.raises(SubmissionError, match=r"result 5 .*has 9 image names, expected exactly 10"):
        validate_submission(short, texts, gallery)

    # The scorer script says the same about the order, with exit status 2.
    bad = tmp_path / "swapped.json"
    bad.write_text(json.dumps(swapped))
    with pytest.raises(SystemExit) as e:
        load_script("evaluate")["main"](["--results", str(bad), "--gt", str(test_dir / "test_gt.txt")])
    assert e.value.code == 2 and "order of texts is wrong" in capsys.readouterr().err.lower()


def test_parse_args_rejects_bad_flags(load_script, monkeypatch):
    parse = load_script("infer")["parse_args"]
    with pytest.raises(SystemExit):
        parse(["--k", "0"])
    with pytest.raises(SystemExit):
        parse(["--task", "coco"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun without --dist_eval
    with pytest.raises(SystemExit):
        parse([])
    assert parse(["--dist_eval"]).dist_eval
