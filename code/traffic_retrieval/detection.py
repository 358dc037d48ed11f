"""RTMDet through mmdet: loading a detector, batched inference, the detection cache and the per-image decision.

Used by the cleaning stage (``traffic_retrieval.cleaning``) and by ``code/train_demo_detector.py``.

Decision rule (one image -> ``people``, ``car`` or undetected), see :func:`decide_category`:
    Every detector class that matters belongs to a class group: ``person`` -> ``people``; ``car``, ``bus``,
    ``truck`` -> ``car`` (:data:`CLASS_GROUPS`; every other COCO class is ignored). For each group take the
    highest-scoring box. Boxes scoring below ``score_thr`` (default 0.3) do not count. The image's category is the
    group whose best box scores higher; with no box at or above the threshold the image is *undetected*
    (an exact tie between the two groups counts as undetected too, since neither wins). Class names come from the
    model's ``dataset_meta["classes"]``, so the COCO 80-class RTMDet-L and the demo's 2-class (person, car)
    detector both work.

Loading: ``init_detector(config, None, device)`` builds the model; the checkpoint the user named is then read with
``torch.load(weights_only=False)`` (torch >= 2.6 defaults to ``weights_only=True``, which refuses the numpy and
mmengine objects that mmdet checkpoints carry in their ``meta``) and loaded with an explicit key check.

Inference: images are decoded by our own loader (``traffic_retrieval.images``), so bad files are caught before
mmdet sees them, and passed as BGR arrays through the config's own test pipeline (the one ``inference_detector``
uses). mmdet 3.3's ``inference_detector`` runs a list one image at a time; :class:`BatchDetector` runs the same
pipeline per image but calls ``model.test_step`` once per batch (a test checks both give the same boxes).

Cache (``det_<split>_cache.jsonl``, append-only, one JSON row per image):
``{"name", "image": {"size", "mtime_ns"}, "detector": <fingerprint digest>, "note", "detections": [[class, score,
x1, y1, x2, y2], ...]}``. The detections are the raw top boxes (score-threshold independent: the top
:data:`CACHE_TOP_K` plus the best box of every grouped class), so a re-run with another ``--score_thr`` needs no
detection. A row counts only while the detector fingerprint (config path and content hash, checkpoint path, size
and mtime) and the image's size and mtime are unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .categories import CATEGORIES
from .fileio import atomic_open, file_stamp, torch_save, write_text

log = logging.getLogger(__name__)

# Detector class name -> our category. Category is data: a new class (e.g. "motorcycle") is one entry here.
CLASS_GROUPS: dict[str, str] = {"person": "people", "car": "car", "bus": "car", "truck": "car"}
DEFAULT_SCORE_THR = 0.3
DEFAULT_DET_CONFIG = "mmdet::rtmdet/rtmdet_l_8xb32-300e_coco.py"
# File name of the official RTMDet-L COCO release (mmdetection v3.0 model zoo).
RTMDET_L_CHECKPOINT_NAME = "rtmdet_l_8xb32-300e_coco_20220719_112030-5a0be7c4.pth"
DEFAULT_DET_CHECKPOINT = f"model_pth/{RTMDET_L_CHECKPOINT_NAME}"
DEMO_DET_CONFIG = "model_pth/demo/rtmdet_tiny_demo.py"
DEMO_DET_CHECKPOINT = "model_pth/demo/rtmdet_tiny_demo.pth"
CACHE_TOP_K = 10
MMDET_SCOPE = "mmdet::"


class DetectorError(RuntimeError):
    """A detector cannot be set up (missing file, bad checkpoint); the message says what to do."""


# ------------------------------------------------------------------------------------------------- decision rule
@dataclass(frozen=True)
class Detection:
    """One box: detector class name, score and ``(x1, y1, x2, y2)`` in original image pixels."""

    label: str
    score: float
    bbox: tuple[float, float, float, float]

    def to_row(self) -> list:
        return [self.label, round(self.score, 5), *[round(v, 1) for v in self.bbox]]

    @classmethod
    def from_row(cls, row: Sequence) -> "Detection":
        if len(row) != 6:
            raise ValueError(f"a cached detection needs 6 values [class, score, x1, y1, x2, y2], got {row!r}")
        return cls(str(row[0]), float(row[1]), (float(row[2]), float(row[3]), float(row[4]), float(row[5])))


@dataclass(frozen=True)
class ImageDecision:
    """The category the detections point to (None = undetected) and each category's best score (0.0 if none)."""

    category: str | None
    best: dict[str, float]
    reason: str


def decide_category(
    detections: Iterable[Detection],
    score_thr: float = DEFAULT_SCORE_THR,
    class_groups: Mapping[str, str] = CLASS_GROUPS,
) -> ImageDecision:
    """Apply the module's decision rule to one image's detections.

    Returns:
        The winning category (``people``/``car``) or None when no grouped box scores at least ``score_thr`` or
        the two groups tie; ``best`` holds each category's highest score whatever the threshold.
    """
    best = {c: 0.0 for c in CATEGORIES}
    for det in detections:
        category = class_groups.get(det.label)
        if category is not None and det.score > best[category]:
            best[category] = det.score
    above = {c: s for c, s in best.items() if s >= score_thr}
    if not above:
        return ImageDecision(None, best, f"no person or vehicle box scoring >= {score_thr}")
    top = max(above.values())
    winners = [c for c, s in above.items() if s == top]
    if len(winners) > 1:
        return ImageDecision(None, best, f"person and vehicle boxes tie at {top:.3f}")
    return ImageDecision(winners[0], best, f"best {winners[0]} box {top:.3f}")


def true_category(boxes: Sequence[tuple[str, float]]) -> str | None:
    """The category of an image from its true boxes ``[(category, area), ...]``: that of the largest box (the demo
    data draws one main object and, now and then, a much smaller second one), None for an empty image."""
    if not boxes:
        return None
    return max(boxes, key=lambda b: b[1])[0]


# ------------------------------------------------------------------------------------------------- files
def require_mmdet() -> Any:
    """The ``mmdet`` module, or a DetectorError saying how to install it: the detector needs mmdet and mmcv built
    with its compiled ops (RTMDet's NMS), which a torch-only environment such as the GPU machines' lacks."""
    try:
        mmdet = importlib.import_module("mmdet")
        importlib.import_module("mmcv.ops")  # mmcv-lite, or an mmcv built for another torch, fails here
    except (ImportError, OSError) as e:  # OSError: a compiled extension that cannot be loaded
        raise DetectorError(
            f"the detector needs mmdet 3.3.0 and mmcv 2.1.0 built with its ops, which {sys.executable} cannot "
            f"import ({type(e).__name__}: {e}); install them with `make install` (README, Setup)"
        ) from None
    return mmdet


def resolve_config(spec: str | os.PathLike) -> Path:
    """Path of a detector config: ``mmdet::<rel>`` means mmdet's packaged configs, anything else is a file path.

    Raises:
        DetectorError: the file does not exist, or (for ``mmdet::``) mmdet is not installed.
    """
    s = str(spec)
    if s.startswith(MMDET_SCOPE):
        path = Path(require_mmdet().__file__).parent / ".mim" / "configs" / s[len(MMDET_SCOPE):]
    else:
        path = Path(s)
    if not path.is_file():
        raise DetectorError(f"detector config not found: {s} (looked at {path})")
    return path


def check_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint path if it exists, else a DetectorError explaining where to get one."""
    p = Path(path)
    if p.is_file():
        return p
    raise DetectorError(
        f"detector checkpoint not found: {p}. For the real data put the RTMDet-L COCO checkpoint "
        f"{RTMDET_L_CHECKPOINT_NAME} (mmdetection v3.0 model zoo) at {DEFAULT_DET_CHECKPOINT}, or pass "
        f"--det_checkpoint. For the synthetic demo data use the shipped detector: --det_config {DEMO_DET_CONFIG} "
        f"--det_checkpoint {DEMO_DET_CHECKPOINT}"
    )


def detector_fingerprint(config: str | os.PathLike, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What identifies a detector's output: config path and content hash, checkpoint path, size and mtime."""
    cfg_path = resolve_config(config)
    ckpt = check_checkpoint(checkpoint)
    st = ckpt.stat()
    # Absolute paths: the same files named relatively or absolutely (or from another directory) match.
    return {
        "config": str(cfg_path.resolve()),
        "config_sha256": hashlib.sha256(cfg_path.read_bytes()).hexdigest(),
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_size": st.st_size,
        "checkpoint_mtime_ns": st.st_mtime_ns,
    }


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- loading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an mmdet/mmengine checkpoint file the user named.

    ``weights_only=False`` because mmengine checkpoints pickle numpy arrays and mmengine objects in ``meta`` /
    ``message_hub``, which torch >= 2.6's default ``weights_only=True`` refuses. Only ever called on the
    checkpoint path given on the command line (or the shipped demo file): unpickling runs code from that file.
    """
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        raise DetectorError(f"{path}: not a checkpoint (expected a dict, got {type(ckpt).__name__})")
    return ckpt


def _state_dict(ckpt: Mapping[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DetectorError(f"{path}: no state_dict of tensors found (keys: {sorted(ckpt)[:10]})")
    # DataParallel/DDP prefixes, as mmengine's loader strips them.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_detector(config: str | os.PathLike, checkpoint: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Build the detector from ``config`` and load ``checkpoint`` (see the module docstring).

    Every model weight must be in the checkpoint (a missing key would leave random weights and silent garbage);
    extra keys are logged. Class names come from the checkpoint's ``meta.dataset_meta.classes`` (mmdet 3.x),
    ``meta.CLASSES`` (mmdet 2.x), or, for an 80-class head without names, the COCO classes.

    Raises:
        DetectorError: mmdet is not installed, missing files, a checkpoint that does not fit the config, or no
            usable class names.
    """
    require_mmdet()
    from mmdet.apis import init_detector
    from mmdet.evaluation import get_classes

    cfg_path = resolve_config(config)
    ckpt_path = check_checkpoint(checkpoint)
    with warnings.catch_warnings(record=True):
        # "checkpoint is None, use COCO classes by default": we load the weights and the classes ourselves below.
        # record=True swallows it although init_detector resets the filter to "once" itself.
        model = init_detector(str(cfg_path), checkpoint=None, device="cpu")
    ckpt = read_checkpoint(ckpt_path)
    sd = _state_dict(ckpt, ckpt_path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing:
        raise DetectorError(
            f"{ckpt_path} does not fit {config}: {len(missing)} model weights missing, e.g. {missing[:5]}"
        )
    if unexpected:
        log.warning("%s: ignoring %d keys the model does not have, e.g. %s", ckpt_path, len(unexpected), unexpected[:5])
    bad_shape = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad_shape:
        k = bad_shape[0]
        raise DetectorError(
            f"{ckpt_path} does not fit {config}: {len(bad_shape)} weights differ in shape, e.g. {k} "
            f"{tuple(sd[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
        )
    # load_state_dict copies into the model's own (fp32) tensors, so fp16 checkpoints load as well.
    model.load_state_dict({k: sd[k] for k in own}, strict=True)

    meta = ckpt.get("meta") or {}
    num_classes = int(model.bbox_head.num_classes)
    if isinstance(meta.get("dataset_meta"), Mapping) and "classes" in {k.lower() for k in meta["dataset_meta"]}:
        classes = next(v for k, v in meta["dataset_meta"].items() if k.lower() == "classes")
    elif "CLASSES" in meta:
        classes = meta["CLASSES"]
    elif num_classes == 80:
        classes = get_classes("coco")
    else:
        raise DetectorError(f"{ckpt_path}: no class names in meta.dataset_meta.classes for a {num_classes}-class head")
    classes = [str(c) for c in classes]
    if len(classes) != num_classes:
        raise DetectorError(f"{ckpt_path}: {len(classes)} class names for a {num_classes}-class head: {classes}")
    if not set(classes) & set(CLASS_GROUPS):
        raise DetectorError(f"{ckpt_path}: none of the classes {sorted(CLASS_GROUPS)} among {classes}")
    model.dataset_meta = {"classes": tuple(classes)}
    model.to(device)
    model.eval()
    log.info("detector %s + %s: %d classes, on %s", config, ckpt_path, num_classes, device)
    return model


# ------------------------------------------------------------------------------------------------- inference
def _top_detections(
    labels: Sequence[int], scores: Sequence[float], bboxes: Sequence[Sequence[float]], classes: Sequence[str],
    top_k: int,
) -> list[Detection]:
    """The ``top_k`` best boxes plus the best box of every grouped class (so any threshold can be applied later)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = list(order[:top_k])
    seen = {classes[labels[i]] for i in keep}
    for i in order[top_k:]:
        name = classes[labels[i]]
        if name in CLASS_GROUPS and name not in seen:
            keep.append(i)
            seen.add(name)
    return [
        Detection(classes[labels[i]], float(scores[i]), tuple(float(v) for v in bboxes[i]))  # type: ignore[arg-type]
        for i in keep
    ]


class BatchDetector:
    """Run a loaded mmdet detector on lists of BGR uint8 arrays, one ``test_step`` per batch."""

    def __init__(self, model: torch.nn.Module, top_k: int = CACHE_TOP_K) -> None:
        from mmcv.transforms import Compose
        from mmdet.utils import get_test_pipeline_cfg

        self.model = model
        self.top_k = top_k
        self.classes: tuple[str, ...] = tuple(model.dataset_meta["classes"])
        pipeline = copy.deepcopy(get_test_pipeline_cfg(model.cfg.copy()))
        # Exactly what inference_detector does for array inputs ("mmdet." so the registry finds it from any scope).
        pipeline[0].type = "mmdet.LoadImageFromNDArray"
        self.pipeline = Compose(pipeline)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections of each image (best first)."""
        if not images:
            return []
        data = [self.pipeline({"img": img, "img_id": i}) for i, img in enumerate(images)]
        batch = {"inputs": [d["inputs"] for d in data], "data_samples": [d["data_samples"] for d in data]}
        with warnings.catch_warnings():
            # mmdet 3.3's SE layer calls the deprecated torch.cuda.amp.autocast: one warning per batch otherwise.
            warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
            # and its anchor generator calls torch.meshgrid without indexing= (it means "ij", torch's default)
            warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
            results = self.model.test_step(batch)
        out = []
        for r in results:
            inst = r.pred_instances
            out.append(_top_detections(
                inst.labels.cpu().tolist(), inst.scores.cpu().tolist(), inst.bboxes.cpu().tolist(), self.classes,
                self.top_k,
            ))
        return out


def rgb_to_bgr(image: Any) -> np.ndarray:
    """A PIL RGB image (or HxWx3 RGB array) as the contiguous BGR uint8 array mmdet's pipelines expect."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape HxWx3, got {arr.shape}")
    return np.ascontiguousarray(arr[:, :, ::-1])


# ------------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CachedImage:
    detections: list[Detection]
    note: str | None


def image_key(path: str | os.PathLike) -> dict[str, int]:
    """:func:`fileio.file_stamp` as the detection cache stores it (a replaced file is detected again)."""
    size, mtime_ns = file_stamp(path)
    return {"size": size, "mtime_ns": mtime_ns}


class DetectionCache:
    """The append-only detection cache of one split (format in the module docstring).

    Rows of another detector, unreadable rows (e.g. a line cut by an interrupted run) and superseded rows are
    dropped by rewriting the file once, atomically, when it is opened; afterwards rows are only appended and
    flushed, so an interrupted run keeps everything detected so far.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.digest = fingerprint_digest(fingerprint)
        self._rows: dict[str, dict[str, Any]] = {}
        stale = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
            for line_no, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                    ok = (isinstance(row, dict) and isinstance(row.get("name"), str)
                          and row.get("detector") == self.digest)
                    if ok:
                        [Detection.from_row(d) for d in row["detections"]]  # validates every row now
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable cache row ignored", self.path, line_no)
                    ok = False
                if ok:
                    stale += row["name"] in self._rows  # a newer row supersedes an older one
                    self._rows[row["name"]] = row
                else:
                    stale += 1
            if stale:
                log.info("%s: dropping %d stale rows (other detector, damaged or superseded)", self.path, stale)
                with atomic_open(self.path) as f:
                    for row in self._rows.values():
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.n_loaded = len(self._rows)

    def get(self, name: str, key: Mapping[str, int]) -> CachedImage | None:
        row = self._rows.get(name)
        if row is None or row.get("image") != dict(key):
            return None
        return CachedImage([Detection.from_row(d) for d in row["detections"]], row.get("note"))

    def add_many(self, items: Iterable[tuple[str, Mapping[str, int], CachedImage]]) -> None:
        """Append rows and flush them to disk (one write per batch)."""
        text = []
        for name, key, cached in items:
            row = {"name": name, "image": dict(key), "detector": self.digest, "note": cached.note,
                   "detections": [d.to_row() for d in cached.detections]}
            self._rows[name] = row
            text.append(json.dumps(row, ensure_ascii=False) + "\n")
        if text:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8", newline="\n") as f:
                f.write("".join(text))
                f.flush()
                os.fsync(f.fileno())


def detect_cached(
    paths: Sequence[Path],
    cache: DetectionCache | None,
    make_detector: Callable[[], Callable[[Sequence[np.ndarray]], list[list[Detection]]]],
    *,
    batch_size: int = 8,
    desc: str = "detect",
    keep: Callable[[Detection], bool] | None = None,
) -> tuple[dict[str, list[Detection]], list[tuple[Path, str]], int]:
    """Detections of each image (by file name): from ``cache`` while the image is unchanged, else from the detector,
    which ``make_detector`` builds on first need (a fully cached run loads nothing). New rows are appended to the
    cache batch by batch, so an interrupted run resumes where it stopped. ``keep`` filters the boxes stored.

    Returns:
        The detections by name, the images that could not be read (path, reason) and how many were detected now.
    """
    from tqdm import tqdm

    from .images import load_rgb

    found: dict[str, list[Detection]] = {}
    failed: list[tuple[Path, str]] = []
    keys: dict[str, dict[str, int]] = {}
    todo: list[Path] = []
    for p in paths:
        try:
            keys[p.name] = image_key(p)
        except OSError as e:
            failed.append((p, f"missing ({e.strerror})"))
            continue
        hit = cache.get(p.name, keys[p.name]) if cache is not None else None
        if hit is not None:
            found[p.name] = hit.detections
        else:
            todo.append(p)
    detector = None
    n_new = 0
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not todo):
        chunk, arrays = [], []
        for p in todo[start:start + batch_size]:
            try:
                arrays.append(rgb_to_bgr(load_rgb(p)))
                chunk.append(p)
            except ValueError as e:  # ImageReadError: reported by the caller, the others go on
                failed.append((p, str(e)))
        if not chunk:
            continue
        detector = detector or make_detector()
        dets = [[d for d in ds if keep is None or keep(d)] for ds in detector(arrays)]
        found.update((p.name, d) for p, d in zip(chunk, dets))
        n_new += len(chunk)
        if cache is not None:
            cache.add_many((p.name, keys[p.name], CachedImage(d, None)) for p, d in zip(chunk, dets))
    return found, failed, n_new


# ------------------------------------------------------------------------------------------------- demo detector
def packaged_config(rel: str) -> Path:
    """A config file shipped inside the mmdet package, e.g. ``rtmdet/rtmdet_tiny_8xb32-300e_coco.py``."""
    return resolve_config(MMDET_SCOPE + rel)


def _plain_bn(node: Any) -> Any:
    """Replace SyncBN by BN everywhere in a config tree (single-process training and CPU inference)."""
    if isinstance(node, Mapping):
        out = {k: _plain_bn(v) for k, v in node.items()}
        if out.get("type") == "SyncBN":
            out["type"] = "BN"
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_plain_bn(v) for v in node)
    return node


def demo_model_cfg(num_classes: int) -> dict[str, Any]:
    """The packaged RTMDet-tiny model, from scratch (no ImageNet backbone), plain BN, ``num_classes`` classes."""
    from mmengine.config import Config

    model = Config.fromfile(str(packaged_config("rtmdet/rtmdet_tiny_8xb32-300e_coco.py"))).model.to_dict()
    model = _plain_bn(model)
    model["backbone"]["init_cfg"] = None
    model["bbox_head"]["num_classes"] = num_classes
    # Few objects per image: 100 boxes are plenty, and a smaller nms_pre keeps CPU inference quick.
    model["test_cfg"] = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.001, nms=dict(type="nms", iou_threshold=0.65),
                             max_per_img=100)
    return model


def demo_test_pipeline(img_size: int) -> list[dict[str, Any]]:
    return [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(img_size, img_size), keep_ratio=True),
        dict(type="Pad", size=(img_size, img_size), pad_val=dict(img=(114, 114, 114))),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]


def demo_inference_config(classes: Sequence[str], img_size: int) -> dict[str, Any]:
    """Everything ``init_detector`` / the test pipeline need, with no ``_base_`` (self-contained)."""
    pipeline = demo_test_pipeline(img_size)
    return dict(
        default_scope="mmdet",
        model=demo_model_cfg(len(classes)),
        test_pipeline=pipeline,
        test_dataloader=dict(
            batch_size=1,
            num_workers=0,
            dataset=dict(type="CocoDataset", data_root="", ann_file="", data_prefix=dict(img=""),
                         metainfo=dict(classes=tuple(classes)), test_mode=True, pipeline=pipeline),
        ),
    )


@dataclass
class DemoTrainConfig:
    """How the demo detector is trained (``code/train_demo_detector.py``)."""

    data: Path  # demo dataset root (holds annotations/train_boxes.json and train/train_images/)
    out: Path  # where the config and weights are written (model_pth/demo)
    work_dir: Path  # mmengine's run directory (logs, scalars)
    epochs: int = 6
    batch_size: int = 16
    img_size: int = 128  # square network input; demo images are 64 to 128 px
    lr: float = 0.004  # AdamW
    weight_decay: float = 0.05
    warmup_iters: int = 50
    seed: int = 0
    fp16: bool = True  # store the weights in half precision (half the file size)
    classes: tuple[str, ...] = ("person", "car")  # the order of the annotations' category ids 0, 1


def demo_train_config(tc: DemoTrainConfig) -> dict[str, Any]:
    """The mmengine Runner config: packaged RTMDet-tiny, 128 px, no Mosaic/MixUp, AdamW, warmup + cosine."""
    data_root = tc.data / "train"  # COCO file names are relative to <data>/train
    ann = tc.data / "annotations" / "train_boxes.json"
    s = tc.img_size
    cos_begin = 1 if tc.epochs > 1 else 0  # cosine after the warmup epoch (from the start in a 1-epoch run)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        # Mosaic/MixUp (the packaged recipe) are left out: they need hundreds of epochs to pay off.
        dict(type="RandomResize", scale=(s, s), ratio_range=(0.5, 1.5), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(s, s)),
        dict(type="YOLOXHSVRandomAug"),
        dict(type="RandomFlip", prob=0.5),
        dict(type="Pad", size=(s, s), pad_val=dict(img=(114, 114, 114))),
        dict(type="PackDetInputs"),
    ]
    return dict(
        default_scope="mmdet",
        model=demo_model_cfg(len(tc.classes)),
        work_dir=str(tc.work_dir),
        train_dataloader=dict(
            batch_size=tc.batch_size,
            num_workers=0,
            persistent_workers=False,
            sampler=dict(type="DefaultSampler", shuffle=True),
            dataset=dict(
                type="CocoDataset", data_root=str(data_root), ann_file=str(ann.resolve()), data_prefix=dict(img=""),
                metainfo=dict(classes=tc.classes),
                # images without boxes (the dataset's "empty" dirty images) stay in as negatives
                filter_cfg=dict(filter_empty_gt=False, min_size=0),
                pipeline=train_pipeline,
            ),
        ),
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=tc.epochs, val_interval=tc.epochs + 1),
        optim_wrapper=dict(
            type="OptimWrapper",
            optimizer=dict(type="AdamW", lr=tc.lr, weight_decay=tc.weight_decay),
            paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True),
        ),
        # The packaged schedule (1000-iter warmup, cosine over epochs 150-300) rewritten for a run of a few epochs.
        param_scheduler=[
            dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=tc.warmup_iters),
            dict(type="CosineAnnealingLR", eta_min=tc.lr * 0.05, begin=cos_begin, end=tc.epochs,
                 T_max=tc.epochs - cos_begin, by_epoch=True, convert_to_iter_based=True),
        ],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=20),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=None,  # the weights are written once, at the end, by train_demo_detector
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        log_processor=dict(type="LogProcessor", window_size=20, by_epoch=True),
        log_level="INFO",
        randomness=dict(seed=tc.seed),
        load_from=None,
        resume=False,
    )


def half_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as fp16 (integer buffers such as ``num_batches_tracked`` unchanged)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in state_dict.items()}


def write_demo_detector(model: torch.nn.Module, tc: DemoTrainConfig, out: Path | None = None, fp16: bool | None = None
                        ) -> tuple[Path, Path]:
    """Write the self-contained inference config and the weights-only checkpoint into ``out`` (default
    ``tc.out``); returns their paths."""
    from mmengine.config import Config

    out = tc.out if out is None else out
    fp16 = tc.fp16 if fp16 is None else fp16
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / Path(DEMO_DET_CONFIG).name
    ckpt_path = out / Path(DEMO_DET_CHECKPOINT).name
    header = (
        "# RTMDet-tiny (person, car) trained from scratch on the synthetic demo data by code/train_demo_detector.py.\n"
        "# Self-contained: inference needs only this file and rtmdet_tiny_demo.pth.\n"
    )
    write_text(cfg_path, header + Config(demo_inference_config(tc.classes, tc.img_size)).pretty_text)
    sd = model.state_dict()
    torch_save(
        {"state_dict": half_state_dict(sd) if fp16 else {k: v.detach().cpu().clone() for k, v in sd.items()},
         "meta": {"dataset_meta": {"classes": list(tc.classes)}}},
        ckpt_path,
    )
    return cfg_path, ckpt_path


def train_demo_detector(tc: DemoTrainConfig) -> torch.nn.Module:
    """Train RTMDet-tiny on the demo data's true boxes with mmengine's Runner; returns the trained model."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    ann = tc.data / "annotations" / "train_boxes.json"
    if not ann.is_file():
        raise DetectorError(f"{ann} not found: generate the demo data first (python code/make_demo_dataset.py)")
    runner = Runner.from_cfg(Config(demo_train_config(tc)))
    runner.train()
    model = runner.model
    model.eval()
    return model


def build_demo_detector(tc: DemoTrainConfig, score_thr: float = DEFAULT_SCORE_THR) -> dict[str, Any]:
    """Train the demo detector, write it to ``tc.out`` and measure the stage's decision accuracy on the val split.

    The weights are stored in fp16 only if that keeps the val accuracy of the fp32 weights (both are reloaded
    from disk through :func:`load_detector`, exactly as the cleaning stage loads them).

    Returns:
        ``{"config", "checkpoint", "checkpoint_mb", "fp16", "val": <accuracy dict>, "val_fp32": ...,
        "train_seconds"}``.
    """
    import time

    t0 = time.time()
    model = train_demo_detector(tc)
    train_s = time.time() - t0
    truth = load_true_categories(tc.data / "annotations" / "val_boxes.json")
    root = tc.data / "train"
    fp32_cfg, fp32_ckpt = write_demo_detector(model, tc, out=tc.work_dir / "fp32", fp16=False)
    val32 = evaluate_accuracy(BatchDetector(load_detector(fp32_cfg, fp32_ckpt)), root, truth, score_thr)
    log.info("val accuracy, fp32 weights: %.4f (%d/%d)", val32["accuracy"], val32["correct"], val32["n"])
    cfg_path, ckpt_path = write_demo_detector(model, tc, fp16=tc.fp16)
    val = val32
    if tc.fp16:
        val = evaluate_accuracy(BatchDetector(load_detector(cfg_path, ckpt_path)), root, truth, score_thr)
        log.info("val accuracy, fp16 weights: %.4f (%d/%d)", val["accuracy"], val["correct"], val["n"])
        if val["correct"] < val32["correct"]:
            log.info("fp16 loses accuracy: writing the fp32 weights instead")
            cfg_path, ckpt_path = write_demo_detector(model, tc, fp16=False)
            val = val32
    fp16 = tc.fp16 and val is not val32
    return {"config": str(cfg_path), "checkpoint": str(ckpt_path),
            "checkpoint_mb": round(ckpt_path.stat().st_size / 2**20, 2), "fp16": fp16, "val": val,
            "val_fp32": val32, "train_seconds": round(train_s, 1)}


# ------------------------------------------------------------------------------------------------- evaluation
def load_true_categories(boxes_json: str | os.PathLike, class_to_category: Mapping[str, str] | None = None
                         ) -> dict[str, str | None]:
    """True category of every image of a COCO box file (file name relative to the split root -> category)."""
    groups = dict(class_to_category or CLASS_GROUPS)
    coco = json.loads(Path(boxes_json).read_text(encoding="utf-8"))
    cat_names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes: dict[int, list[tuple[str, float]]] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        boxes[a["image_id"]].append((groups[cat_names[a["category_id"]]], float(a["bbox"][2] * a["bbox"][3])))
    return {im["file_name"]: true_category(boxes[im["id"]]) for im in coco["images"]}


def evaluate_accuracy(
    detector: Callable[[Sequence[np.ndarray]], list[list[Detection]]],
    image_root: str | os.PathLike,
    truth: Mapping[str, str | None],
    score_thr: float = DEFAULT_SCORE_THR,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Share of images whose decided category (None = undetected) equals the true one, plus the confusion counts."""
    from tqdm import tqdm

    from .images import load_rgb

    names = sorted(truth)
    confusion: dict[str, int] = {}
    correct = 0
    wrong: list[str] = []
    for start in tqdm(range(0, len(names), batch_size), desc="accuracy", unit="batch", disable=len(names) < 200):
        chunk = names[start:start + batch_size]
        dets = detector([rgb_to_bgr(load_rgb(Path(image_root) / n)) for n in chunk])
        for n, d in zip(chunk, dets):
            got = decide_category(d, score_thr).category
            key = f"{truth[n] or 'none'}->{got or 'none'}"
            confusion[key] = confusion.get(key, 0) + 1
            if got == truth[n]:
                correct += 1
            else:
                wrong.append(n)
    n = len(names)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else math.nan, "confusion": confusion,
            "wrong": wrong}


# ------------------------------------------------------------------------------------------------- test images
def classify_images(
    image_dir: str | os.PathLike,
    names: Sequence[str],
    config: str | os.PathLike,
    checkpoint: str | os.PathLike,
    device: str = "cpu",
    score_thr: float = DEFAULT_SCORE_THR,
    batch_size: int = 8,
    cache_path: str | os.PathLike | None = None,
) -> dict[str, str | None]:
    """Category of each image by the decision rule (None = undetected or unreadable), with the resumable cache.

    Used for test galleries, whose file names need not reveal the category: ``code/jsonl_test.py --detect``.
    """
    image_dir = Path(image_dir)
    cache = DetectionCache(cache_path, detector_fingerprint(config, checkpoint)) if cache_path else None
    found, failed, n_new = detect_cached([image_dir / n for n in names], cache,
                                         lambda: BatchDetector(load_detector(config, checkpoint, device)),
                                         batch_size=batch_size, desc="detect test images")
    for p, reason in failed:
        log.warning("%s: not classified (%s)", p, reason)
    out = {n: decide_category(found[n], score_thr).category if n in found else None for n in names}
    log.info("classified %d test images (%d from the cache): %d car, %d people, %d undetected", len(out),
             len(found) - n_new, sum(c == "car" for c in out.values()), sum(c == "people" for c in out.values()),
             sum(c is None for c in out.values()))
    return out
