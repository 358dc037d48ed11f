"""Tests of traffic_retrieval.detection: the decision rule, the cache, checkpoint loading and the shipped detector."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from traffic_retrieval.demo_data import generate
from traffic_retrieval.detection import (
    CACHE_TOP_K,
    DEFAULT_DET_CONFIG,
    DEMO_DET_CHECKPOINT,
    DEMO_DET_CONFIG,
    RTMDET_L_CHECKPOINT_NAME,
    BatchDetector,
    CachedImage,
    Detection,
    DetectionCache,
    DetectorError,
    _top_detections,
    check_checkpoint,
    decide_category,
    detector_fingerprint,
    evaluate_accuracy,
    fingerprint_digest,
    load_detector,
    load_true_categories,
    resolve_config,
    rgb_to_bgr,
    true_category,
)
from traffic_retrieval.images import load_rgb

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / DEMO_DET_CONFIG
SHIPPED_CHECKPOINT = REPO / DEMO_DET_CHECKPOINT


def det(label: str, score: float) -> Detection:
    return Detection(label, score, (0.0, 0.0, 10.0, 10.0))


# ------------------------------------------------------------------------------------------------- decision rule
@pytest.mark.parametrize(
    "dets, expected",
    [
        ([det("person", 0.9), det("car", 0.5)], "people"),
        ([det("person", 0.4), det("bus", 0.8)], "car"),  # bus and truck count as car
        ([det("truck", 0.35), det("person", 0.31)], "car"),
        ([det("dog", 0.99), det("person", 0.6)], "people"),  # classes outside the groups are ignored
        ([det("person", 0.29), det("car", 0.1)], None),  # nothing at or above 0.3
        ([det("person", 0.3)], "people"),  # the threshold is inclusive
        ([det("person", 0.7), det("car", 0.7)], None),  # a tie has no winner
        ([det("car", 0.2), det("person", 0.5), det("car", 0.45)], "people"),  # the best box per group decides
        ([], None),
    ],
)
def test_decide_category(dets: list[Detection], expected: str | None) -> None:
    assert decide_category(dets, score_thr=0.3).category == expected


def test_decide_category_reports_best_scores_below_threshold() -> None:
    d = decide_category([det("person", 0.2), det("car", 0.1), det("truck", 0.15), det("person", 0.05)], 0.3)
    assert d.category is None
    assert d.best == {"car": 0.15, "people": 0.2}
    assert "0.3" in d.reason
    assert decide_category([det("person", 0.2)], score_thr=0.1).category == "people"


def test_true_category_is_the_largest_box() -> None:
    assert true_category([("people", 100.0), ("car", 900.0)]) == "car"
    assert true_category([("people", 50.0)]) == "people"
    assert true_category([]) is None


def test_top_detections_keep_the_best_box_of_each_grouped_class() -> None:
    classes = ["person", "car", "dog"]
    n = CACHE_TOP_K + 5
    labels = [2] * (n - 2) + [0, 1]  # the person and car boxes rank below ten dog boxes
    scores = [0.9 - 0.01 * i for i in range(n)]
    out = _top_detections(labels, scores, [[0, 0, 1, 1]] * n, classes, CACHE_TOP_K)
    assert len(out) == CACHE_TOP_K + 2
    assert [d.label for d in out[:CACHE_TOP_K]] == ["dog"] * CACHE_TOP_K
    assert {d.label for d in out[CACHE_TOP_K:]} == {"person", "car"}
    assert Detection.from_row(out[-1].to_row()) == Detection("car", round(scores[-1], 5), (0.0, 0.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------------- cache
def test_cache_resumes_and_is_invalidated_by_a_new_detector(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    fp = {"config": "a.py", "checkpoint_size": 1}
    key = {"size": 10, "mtime_ns": 5}
    cache = DetectionCache(path, fp)
    cache.add_many([("a.jpg", key, CachedImage([det("car", 0.8)], None)),
                    ("b.jpg", key, CachedImage([], "CMYK image converted to RGB"))])
    # an interrupted append leaves half a line
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"name": "c.jpg", "image": {"si')
    again = DetectionCache(path, fp)
    assert again.n_loaded == 2
    assert again.get("a.jpg", key).detections == [det("car", 0.8)]
    assert again.get("b.jpg", key).note == "CMYK image converted to RGB"
    assert again.get("a.jpg", {"size": 11, "mtime_ns": 5}) is None  # the image changed
    assert len(path.read_text().splitlines()) == 2  # the damaged row was dropped
    other = DetectionCache(path, {**fp, "checkpoint_size": 2})
    assert other.n_loaded == 0 and other.get("a.jpg", key) is None
    assert path.read_text() == ""
    assert fingerprint_digest(fp) != fingerprint_digest({**fp, "checkpoint_size": 2})


def test_fingerprint_follows_the_checkpoint_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "det.pth"
    ckpt.write_bytes(b"x" * 10)
    a = detector_fingerprint(SHIPPED_CONFIG, ckpt)
    assert a == detector_fingerprint(os.path.relpath(SHIPPED_CONFIG), ckpt)  # relative or absolute: same detector
    os.utime(ckpt, ns=(1, 1))
    assert detector_fingerprint(SHIPPED_CONFIG, ckpt) != a


# ------------------------------------------------------------------------------------------------- loading
def test_default_config_is_the_packaged_rtmdet_l() -> None:
    path = resolve_config(DEFAULT_DET_CONFIG)
    assert path.name == "rtmdet_l_8xb32-300e_coco.py" and path.is_file()
    with pytest.raises(DetectorError, match="not found"):
        resolve_config("mmdet::rtmdet/no_such_config.py")


def test_missing_checkpoint_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DetectorError) as e:
        check_checkpoint(tmp_path / "none.pth")
    msg = str(e.value)
    assert RTMDET_L_CHECKPOINT_NAME in msg and "model_pth/" in msg and DEMO_DET_CHECKPOINT in msg


@pytest.fixture(scope="module")
def shipped_model():
    assert SHIPPED_CHECKPOINT.is_file(), "the demo detector is not shipped: run code/train_demo_detector.py"
    assert SHIPPED_CHECKPOINT.stat().st_size < 20 * 2**20
    return load_detector(SHIPPED_CONFIG, SHIPPED_CHECKPOINT, "cpu")


@pytest.fixture(scope="module")
def val_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """60 unseen demo val images (another seed than the shipped detector's training data) and their truth."""
    root = tmp_path_factory.mktemp("detval") / "demo"
    generate(root, seed=1, n_train=0, n_val=60, n_test=0)
    return root / "train", load_true_categories(root / "annotations" / "val_boxes.json")


def test_shipped_detector_classifies_demo_images(shipped_model, val_images) -> None:
    assert shipped_model.dataset_meta["classes"] == ("person", "car")
    root, truth = val_images
    res = evaluate_accuracy(BatchDetector(shipped_model), root, truth, score_thr=0.3, batch_size=8)
    assert res["n"] == 60
    assert res["accuracy"] >= 0.95, res


def test_batched_inference_matches_inference_detector(shipped_model, val_images) -> None:
    from mmdet.apis import inference_detector

    root, truth = val_images
    names = sorted(truth)[:5]  # different image sizes in one batch
    images = [rgb_to_bgr(load_rgb(root / n)) for n in names]
    assert len({im.shape for im in images}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mmdet's own deprecation warnings are silenced: users would see one per run
        batched = BatchDetector(shipped_model, top_k=5)(images)
    single = inference_detector(shipped_model, images)
    for got, ref in zip(batched, single):
        inst = ref.pred_instances
        assert [d.label for d in got] == [shipped_model.dataset_meta["classes"][i] for i in inst.labels[:len(got)]]
        np.testing.assert_allclose([d.score for d in got], inst.scores[:len(got)].numpy(), atol=1e-4)
        np.testing.assert_allclose([d.bbox for d in got], inst.bboxes[:len(got)].numpy(), atol=0.05)


def test_loads_an_mmengine_checkpoint_despite_weights_only_default(shipped_model, val_images, tmp_path: Path) -> None:
    """A checkpoint as mmengine's Runner writes it (numpy in meta, message hub) loads with torch>=2.6 defaults."""
    from mmengine.logging import MessageHub
    from mmengine.runner import save_checkpoint

    hub = MessageHub.get_instance("test_detection")
    hub.update_scalar("train/loss", 0.5)
    meta = {"dataset_meta": {"classes": ("person", "car"), "palette": [(220, 20, 60), (0, 0, 142)]},
            "epoch": 6, "iter": 600, "seed": np.int64(0), "hook_msgs": {"best_score": np.float64(0.9)},
            "mmengine_version": "0.10.7"}
    path = tmp_path / "epoch_6.pth"
    save_checkpoint({"meta": meta, "state_dict": shipped_model.state_dict(), "message_hub": hub.state_dict()},
                    str(path))
    with pytest.raises(Exception):  # what mmengine's own load_checkpoint (a plain torch.load) runs into
        torch.load(path)
    model = load_detector(SHIPPED_CONFIG, path, "cpu")
    assert model.dataset_meta["classes"] == ("person", "car")
    root, truth = val_images
    images = [rgb_to_bgr(load_rgb(root / n)) for n in sorted(truth)[:3]]
    assert BatchDetector(model)(images) == BatchDetector(shipped_model)(images)


def test_coco_80_class_checkpoint_without_class_names(tmp_path: Path) -> None:
    """An 80-class head whose checkpoint has no class names gets COCO's (the RTMDet-L case), mmdet-2 CLASSES too."""
    from mmdet.apis import init_detector

    cfg = resolve_config("mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py")
    with warnings.catch_warnings(record=True):  # "checkpoint is None, use COCO classes by default"
        model = init_detector(str(cfg), None, device="cpu")
    path = tmp_path / "coco.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load_detector("mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py", path, "cpu")
    classes = loaded.dataset_meta["classes"]
    assert len(classes) == 80 and {"person", "car", "bus", "truck"} <= set(classes)
    # the packaged COCO test pipeline (640 px, with LoadAnnotations) runs on our arrays
    (dets,) = BatchDetector(loaded)([np.full((48, 64, 3), 127, np.uint8)])
    assert all(d.label in classes for d in dets)
    torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": [f"c{i}" for i in range(79)] + ["person"]}}, path)
    assert load_detector(cfg, path, "cpu").dataset_meta["classes"][-1] == "person"
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("bbox_head.")}
    torch.save({"state_dict": bad}, path)
    with pytest.raises(DetectorError, match="weights missing"):
        load_detector(cfg, path, "cpu")
