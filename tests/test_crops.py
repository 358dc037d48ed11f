"""Camera frames: detecting and cutting out the objects (traffic_retrieval.crops, with the shipped demo detector) and
``search.py --detect``, which ranks the objects and lists each frame once by its best object."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import traffic_retrieval.crops as crops_mod
from traffic_retrieval.categories import text_category
from traffic_retrieval.checkpoint import load_weights
from traffic_retrieval.crops import crop_box, detect_crops, frame_objects
from traffic_retrieval.detection import DEMO_DET_CHECKPOINT, DEMO_DET_CONFIG, Detection, load_true_categories
from traffic_retrieval.encoding import encode_images, encode_texts
from traffic_retrieval.images import load_rgb
from traffic_retrieval.labels import read_ground_truth, read_test_text
from traffic_retrieval.metrics import official_ap
from traffic_retrieval.modeling import create_model
from traffic_retrieval.tokenizer import Tokenizer
from traffic_retrieval.transforms import eval_transform

REPO = Path(__file__).resolve().parents[1]
DET = dict(det_config=REPO / DEMO_DET_CONFIG, det_checkpoint=REPO / DEMO_DET_CHECKPOINT)
MODEL = "beit3_nano_patch16_32"


def test_crop_box_grows_rounds_outward_and_clips() -> None:
    assert crop_box((10.2, 20.7, 30.5, 40.0), 100, 100) == (10, 20, 31, 40)
    assert crop_box((10, 20, 30, 40), 100, 100, margin=0.1) == (8, 18, 32, 42)  # 2 px = 0.1 x 20 on each side
    assert crop_box((-5, -3, 120, 90), 100, 80, margin=0.5) == (0, 0, 100, 80)  # clipped to the frame
    assert crop_box((99.6, 50, 99.9, 50.2), 100, 100) == (99, 50, 100, 51)  # at least one pixel


def test_frame_objects_keep_grouped_classes_above_threshold_and_size() -> None:
    dets = [Detection("person", 0.5, (0, 0, 10, 30)), Detection("truck", 0.9, (0, 0, 50, 40)),
            Detection("dog", 0.95, (0, 0, 50, 50)), Detection("car", 0.2, (0, 0, 50, 50)),
            Detection("bus", 0.7, (0, 0, 12, 60))]
    got = frame_objects(dets, score_thr=0.3, min_size=11)
    assert [(c, d.label) for c, d in got] == [("car", "truck"), ("car", "bus")]  # best first; the person is 10 wide
    assert [d.label for _, d in frame_objects(dets, 0.3, 0)] == ["truck", "bus", "person"]


@pytest.fixture()
def frames(gallery_copy) -> Path:
    return gallery_copy


@pytest.fixture()
def detector_calls(monkeypatch) -> list[int]:
    """Frames per detector batch actually run (cached frames are not run)."""
    calls: list[int] = []
    real = crops_mod.BatchDetector

    class Counting(real):
        def __call__(self, images):
            calls.append(len(images))
            return super().__call__(images)

    monkeypatch.setattr(crops_mod, "BatchDetector", Counting)
    return calls


def test_detect_crops_cuts_every_object_and_resumes(tiny_dataset, frames, tmp_path, hash_tree, detector_calls):
    before = hash_tree(frames)
    cache = tmp_path / "cache"
    fc = detect_crops(frames, cache, **DET, score_thr=0.3, min_size=0)
    n = len(list(frames.iterdir()))
    assert sum(detector_calls) == n and fc.frames == sorted(p.name for p in frames.iterdir())
    assert hash_tree(frames) == before  # the frames are only read

    # every crop is the exact pixels of its box (lossless), under its category's folder
    for c in fc.crops.values():
        want = np.asarray(load_rgb(frames / c.frame).crop(c.box))
        assert np.array_equal(np.asarray(Image.open(fc.folder(c.category) / c.name)), want)
    # the best object of each frame is the frame's true category (the shipped detector on demo images)
    truth = {Path(name).name: c for name, c in
             load_true_categories(tiny_dataset / "annotations" / "test_boxes.json").items()}
    best = {}
    for c in fc.crops.values():
        if c.frame not in best or c.score > best[c.frame].score:
            best[c.frame] = c
    right = sum(best[f].category == truth[f] for f in best)
    assert len(best) >= 0.9 * n and right >= 0.9 * len(best), (len(best), right)
    manifest = json.loads((fc.root / "crops.json").read_text())
    assert sorted(r[0] for e in manifest.values() for r in e["crops"]) == sorted(fc.crops)

    # a rerun detects and cuts nothing
    stamps = {p: p.stat().st_mtime_ns for p in fc.root.rglob("*.png")}
    again = detect_crops(frames, cache, **DET, score_thr=0.3, min_size=0)
    assert sum(detector_calls) == n and again.crops == fc.crops
    assert {p: p.stat().st_mtime_ns for p in fc.root.rglob("*.png")} == stamps

    # another margin or threshold cuts anew from the cached detections, in a folder of its own
    wide = detect_crops(frames, cache, **DET, score_thr=0.1, margin=0.25, min_size=0)
    assert sum(detector_calls) == n and wide.root != fc.root and len(wide.crops) >= len(fc.crops)

    # a replaced frame is detected again, a deleted one loses its crops, an unreadable one is reported
    names = sorted(p.name for p in frames.iterdir())
    gone, replaced = names[0], names[1]
    gone_crops = [fc.folder(c.category) / c.name for c in fc.crops.values() if c.frame == gone]
    (frames / gone).unlink()
    shutil.copy(frames / names[2], frames / replaced)
    (frames / "broken.jpg").write_bytes(b"not an image")
    third = detect_crops(frames, cache, **DET, score_thr=0.3, min_size=0)
    assert sum(detector_calls) == n + 1  # the replaced frame only
    assert [p.name for p, _ in third.failed] == ["broken.jpg"]
    assert gone_crops and not any(p.exists() for p in gone_crops)
    assert {c.frame for c in third.crops.values()} <= set(names[1:])
    moved = [c for c in third.crops.values() if c.frame == replaced]
    same = [c for c in third.crops.values() if c.frame == names[2]]
    assert [(c.category, c.box) for c in moved] == [(c.category, c.box) for c in same]


def test_interrupted_cutting_resumes(frames, tmp_path, monkeypatch, detector_calls):
    real_cut, done = crops_mod._cut, []

    def cut_then_stop(path, *args):
        if len(done) == 5:
            raise KeyboardInterrupt
        done.append(path.name)
        return real_cut(path, *args)

    monkeypatch.setattr(crops_mod, "_cut", cut_then_stop)
    with pytest.raises(KeyboardInterrupt):
        detect_crops(frames, tmp_path / "cache", **DET, min_size=0, batch_size=4)
    root = next((tmp_path / "cache").glob("crops_*"))
    assert sorted(json.loads((root / "crops.json").read_text())) == sorted(done)  # saved when interrupted
    monkeypatch.setattr(crops_mod, "_cut", real_cut)
    n = len(list(frames.iterdir()))
    assert sum(detector_calls) == n  # every frame was detected before the cutting began
    fc = detect_crops(frames, tmp_path / "cache", **DET, min_size=0, batch_size=4)
    assert sum(detector_calls) == n and len({c.frame for c in fc.crops.values()}) > 5  # nothing detected again
    manifest = json.loads((fc.root / "crops.json").read_text())
    assert set(done) <= set(manifest) and len(manifest) == len(fc.frames)


# ------------------------------------------------------------------------------------------------ search --detect
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for seed, c in ((4, "car"), (5, "people")):
        torch.manual_seed(seed)
        out[c] = tmp_path_factory.mktemp("ckpt") / f"{c}.pth"
        torch.save({"model": create_model(MODEL).state_dict()}, out[c])
    return out


def _best_frames(ckpt: Path, spm: Path, crops: list, folder_of, text: str, k: int) -> list[tuple[str, float, tuple]]:
    """Brute force: score every crop, keep each frame's best crop, sort the frames."""
    model = create_model(MODEL)
    load_weights(model, ckpt)
    feats = encode_images(model, [folder_of(c.category) / c.name for c in crops], eval_transform(32)).features
    sims = (encode_texts(model, Tokenizer(spm), [text]) @ feats.T)[0].tolist()
    best: dict[str, tuple[float, tuple]] = {}
    for c, s in zip(crops, sims):
        if c.frame not in best or s > best[c.frame][0]:
            best[c.frame] = (s, c.box)
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(f, s, box) for f, (s, box) in ranked]


def test_search_detect_lists_frames_by_their_best_object(tiny_dataset, frames, load_script, ckpts, tiny_spm,
                                                         tmp_path, capsys):
    texts = read_test_text(tiny_dataset / "test" / "test_text.txt")
    queries = [texts[0], next(t for t in texts if text_category(t) == "people")]
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(queries) + "\n")
    gt = tiny_dataset / "test" / "test_gt.txt"
    out = tmp_path / "out"
    common = ["--images", str(frames), "--queries", str(qfile), "--model", MODEL, "--sentencepiece_model",
              str(tiny_spm), "--device", "cpu", "--k", "5", "--output_dir", str(out), "--detect",
              "--det_config", str(DET["det_config"]), "--det_checkpoint", str(DET["det_checkpoint"]),
              "--det_score_thr", "0.1", "--det_min_size", "0", "--gt", str(gt)]
    main = load_script("search")["main"]
    fc = detect_crops(frames, out / "cache", **DET, score_thr=0.1, min_size=0)
    all_crops = list(fc.crops.values())
    assert max(Counter(c.frame for c in all_crops).values()) >= 3  # several objects per frame: dedup matters
    relevant = dict(read_ground_truth(gt))

    # one model: every object of every frame
    results = main(common + ["--finetune", str(ckpts["car"]), "--json", str(out / "results.json")])
    hits = json.loads((out / "results.json").read_text())["results"][0]["hits"]
    assert [(Path(h["path"]), h["object"]["box"]) for h in hits] == \
        [(frames / h.name, list(h.obj.box)) for h in results[0].hits]  # the user's frame, and where the object is
    for r, q in zip(results, queries):
        want = _best_frames(ckpts["car"], tiny_spm, all_crops, fc.folder, q, 5)
        assert [(h.name, h.obj.box) for h in r.hits] == [(f, box) for f, _, box in want]
        assert [h.score for h in r.hits] == pytest.approx([s for _, s, _ in want], abs=1e-5)
        assert len({h.name for h in r.hits}) == 5 and all(h.path.name == h.obj.name for h in r.hits)
        assert r.official_ap == official_ap([h.name for h in r.hits], relevant[q])  # ground truth names frames
    printed = capsys.readouterr().out
    h = results[0].hits[0]
    assert f"{h.name}  ({h.obj.category} at {','.join(map(str, h.obj.box))})" in printed
    page = (out / "search.html").read_text()
    assert f"{h.obj.category} at {','.join(map(str, h.obj.box))}" in page
    # each hit shows its crop and its frame with the object's box drawn in red
    framed = re.findall(r'<img class="frame" src="data:image/jpeg;base64,([^"]*)"', page)
    assert len(framed) == sum(len(r.hits) for r in results)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(framed[0]))).convert("RGB")).astype(int)
    frame = load_rgb(frames / h.name)
    f = thumb.shape[1] / frame.width
    x1, y1, x2, y2 = (round(v * f) for v in h.obj.box)
    left_edge = thumb[y1:y2, min(x1, thumb.shape[1] - 1)]
    assert (left_edge[:, 0] - left_edge[:, 1:].max(axis=1)).mean() > 60, left_edge  # red dominates the box edge

    # one model per category: each query ranks only the objects of its category
    results = main(common + ["--finetune_car", str(ckpts["car"]), "--finetune_people", str(ckpts["people"])])
    for r, q in zip(results, queries):
        c = text_category(q)
        want = _best_frames(ckpts[c], tiny_spm, [x for x in all_crops if x.category == c], fc.folder, q, 5)
        assert [(h.name, h.obj.box) for h in r.hits] == [(f, box) for f, _, box in want]
        assert {h.obj.category for h in r.hits} == {c}
        assert [h.score for h in r.hits] == pytest.approx([s for _, s, _ in want], abs=1e-5)


def test_search_detect_bad_input(frames, load_script, ckpts, tiny_spm, tmp_path):
    main = load_script("search")["main"]
    argv = ["--images", str(frames), "--query", "A red BMW Sedan.", "--model", MODEL, "--finetune",
            str(ckpts["car"]), "--sentencepiece_model", str(tiny_spm), "--device", "cpu", "--output_dir",
            str(tmp_path / "out"), "--detect", "--det_config", str(DET["det_config"])]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--det_checkpoint", str(tmp_path / "missing.pth")])
    assert "search.py: error: detector checkpoint not found" in str(e.value.code) and "missing.pth" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # nothing scores that high: a clear message, not an empty page
        main(argv + ["--det_checkpoint", str(DET["det_checkpoint"]), "--det_score_thr", "1.0"])
    assert "nothing to search" in str(e.value.code) and "0 detected car and people objects" in str(e.value.code)
    for bad in (["--det_margin", "-1"], ["--det_score_thr", "0.01"]):  # boxes under 0.05 are not kept
        with pytest.raises(SystemExit) as e:
            main(argv + bad)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="at least 0.05"):
        detect_crops(frames, tmp_path / "cache", **DET, score_thr=0.01)


def test_extract_features_detect_one_row_per_object(frames, load_script, ckpts, tmp_path):
    out = tmp_path / "objects.npz"
    load_script("extract_features")["main"](
        ["--model", MODEL, "--finetune", str(ckpts["car"]), "--images", str(frames), "--device", "cpu", "--detect",
         "--det_config", str(DET["det_config"]), "--det_checkpoint", str(DET["det_checkpoint"]), "--det_min_size",
         "0", "--det_score_thr", "0.1", "--out", str(out)])
    fc = detect_crops(frames, frames.parent / ".search_cache", **DET, score_thr=0.1, min_size=0)  # cached: no work
    got = np.load(out)
    assert len(got["image_names"]) == len(fc.crops) > len({c.frame for c in fc.crops.values()})
    model = create_model(MODEL)
    load_weights(model, ckpts["car"])
    by_box = {(c.frame, c.box): c for c in fc.crops.values()}
    crops = [by_box[(n, tuple(b))] for n, b in zip(got["image_names"].tolist(), got["boxes"].tolist())]
    assert got["categories"].tolist() == [c.category for c in crops]
    assert got["det_scores"] == pytest.approx([c.score for c in crops], abs=1e-6)
    want = encode_images(model, [fc.folder(c.category) / c.name for c in crops], eval_transform(32)).features
    np.testing.assert_allclose(got["image_features"], want.numpy(), atol=1e-5)
