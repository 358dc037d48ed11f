"""Objects in camera frames: detect the people and vehicles, cut each one out and map the crops back to their frame.

The retrieval models learn from one object per image (the challenge's galleries are crops), so a folder of whole
camera frames is searched object by object (``search.py --detect``): the stage-1 detector finds every person and
vehicle box scoring at least ``score_thr`` (the class groups of :data:`traffic_retrieval.detection.CLASS_GROUPS`),
each box becomes a crop, and the search ranks the crops and reports each frame once, by its best-matching object.

Layout, under the search cache (see :func:`crop_folder`)::

    detections_<folder>_<key>.jsonl     per frame folder and detector: the detection cache in stage 1's format (an
                                        interrupted or repeated run detects only new or changed frames; another
                                        score threshold, margin or minimum size needs no detection)
    crops_<folder>_<key>/crops.json     per frame folder, detector and crop setting: {frame name: {"image": {size,
                                        mtime_ns}, "crops": [[crop name, category, score, x1, y1, x2, y2], ...]}}
    crops_<folder>_<key>/{car,people}/<frame name>__<i>.png     the crops (lossless), i = the box's rank in its frame

Crops are cut again only for new or changed frames; those of frames that are gone are deleted. Nothing in the
frame folder is ever written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from .categories import CATEGORIES
from .detection import (
    CLASS_GROUPS,
    DEFAULT_DET_CHECKPOINT,
    DEFAULT_DET_CONFIG,
    DEFAULT_SCORE_THR,
    BatchDetector,
    Detection,
    DetectionCache,
    detect_cached,
    detector_fingerprint,
    fingerprint_digest,
    image_key,
    load_detector,
)
from .encoding import list_images
from .fileio import atomic_open, folder_key, write_json
from .images import ImageReadError, load_rgb

log = logging.getLogger(__name__)

DEFAULT_MIN_SIZE = 16  # pixels on the shorter side: smaller (distant) objects are too blurred to describe
DEFAULT_MARGIN = 0.1  # share of the box width / height added on every side (some context, as in training crops)
BOXES_PER_FRAME = 100  # boxes the detector reports per frame (a busy street holds dozens of objects)
MIN_SCORE = 0.05  # person and vehicle boxes scoring at least this are cached (so the lowest usable threshold)
MANIFEST_SAVE_SECONDS = 60.0  # progress of a long crop run is saved this often


@dataclass(frozen=True)
class Crop:
    """One detected object: its crop file, the frame it was cut from and where."""

    name: str  # crop file name (unique within the crop folder)
    frame: str  # frame file name
    category: str  # people or car, from the detector's class
    score: float  # detector score
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in frame pixels, x2 and y2 exclusive


@dataclass
class FrameCrops:
    """The crops of a frame folder."""

    root: Path  # the crop folder
    images: Path  # the frame folder
    frames: list[str]  # every frame file name, sorted
    crops: dict[str, Crop]  # crop name -> crop
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable frames and why

    def folder(self, category: str) -> Path:
        return self.root / category

    def of(self, category: str) -> list[Crop]:
        return [c for c in self.crops.values() if c.category == category]


def crop_box(bbox: Sequence[float], width: int, height: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """A detector box ``(x1, y1, x2, y2)`` grown by ``margin`` x its width / height on each side, rounded outward to
    whole pixels and clipped to the frame (x2, y2 exclusive, at least one pixel wide and high)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    left = min(max(math.floor(x1 - dx), 0), width - 1)
    top = min(max(math.floor(y1 - dy), 0), height - 1)
    right = max(min(math.ceil(x2 + dx), width), left + 1)
    bottom = max(min(math.ceil(y2 + dy), height), top + 1)
    return left, top, right, bottom


def frame_objects(detections: Sequence[Detection], score_thr: float = DEFAULT_SCORE_THR, min_size: int = 0,
                  class_groups: Mapping[str, str] = CLASS_GROUPS) -> list[tuple[str, Detection]]:
    """``(category, detection)`` of every person or vehicle box scoring at least ``score_thr`` whose shorter side is
    at least ``min_size`` pixels, best first."""
    out = []
    for d in sorted(detections, key=lambda d: -d.score):
        category = class_groups.get(d.label)
        short = min(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1])
        if category is not None and d.score >= score_thr and short >= min_size:
            out.append((category, d))
    return out


def detection_cache_file(cache_dir: str | os.PathLike, images: str | os.PathLike, detector_digest: str) -> Path:
    """The detection cache of one frame folder and detector."""
    return Path(cache_dir) / (folder_key("detections", images, detector_digest, f"boxes={BOXES_PER_FRAME}",
                                         f"min_score={MIN_SCORE}") + ".jsonl")


def crop_folder(cache_dir: str | os.PathLike, images: str | os.PathLike, detector_digest: str, score_thr: float,
                margin: float, min_size: int) -> Path:
    """The crop folder of one frame folder, detector and crop setting (a new setting gets a folder of its own, so
    switching back and forth costs nothing)."""
    return Path(cache_dir) / folder_key("crops", images, detector_digest, f"thr={score_thr!r}", f"margin={margin!r}",
                                        f"min_size={min_size}")


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        for entry in obj.values():  # validate the shape once: a damaged file only costs cutting the crops again
            for row in entry["crops"]:
                _crop_from_row(row, "")
            dict(entry["image"])
        return obj
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable crop list (%s: %s); cutting the crops again", path, type(e).__name__, e)
        return {}


def _crop_from_row(row: Sequence[Any], frame: str) -> Crop:
    name, category, score, x1, y1, x2, y2 = row
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}")
    return Crop(str(name), frame, category, float(score), (int(x1), int(y1), int(x2), int(y2)))


def _cut(frame_path: Path, root: Path, objects: Sequence[tuple[str, Detection]], margin: float) -> list[list[Any]]:
    """Write the crops of one frame; returns their manifest rows."""
    image = load_rgb(frame_path)
    rows = []
    for i, (category, det) in enumerate(objects):
        box = crop_box(det.bbox, image.width, image.height, margin)
        name = f"{frame_path.name}__{i}.png"
        (root / category).mkdir(parents=True, exist_ok=True)
        with atomic_open(root / category / name, "wb") as f:
            image.crop(box).save(f, format="PNG")
        rows.append([name, category, round(det.score, 5), *box])
    return rows


def _remove_crops(root: Path, entry: Mapping[str, Any]) -> None:
    for row in entry["crops"]:
        (root / row[1] / row[0]).unlink(missing_ok=True)


def add_detection_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--detect`` flags of the scripts that read camera frames (search.py, extract_features.py)."""
    d = p.add_argument_group("camera frames (--detect)")
    d.add_argument("--detect", action="store_true",
                   help="the images are camera frames: work on the people and vehicles the detector finds in them")
    d.add_argument("--det_config", default=DEFAULT_DET_CONFIG, help="mmdet config (default: %(default)s)")
    d.add_argument("--det_checkpoint", default=DEFAULT_DET_CHECKPOINT, help="(default: %(default)s)")
    d.add_argument("--det_score_thr", type=float, default=DEFAULT_SCORE_THR,
                   help=f"lowest detector score of an object, at least {MIN_SCORE} (default: %(default)s)")
    d.add_argument("--det_min_size", type=int, default=DEFAULT_MIN_SIZE,
                   help="objects whose box is shorter than this many pixels on a side are left out "
                        "(default: %(default)s)")
    d.add_argument("--det_margin", type=float, default=DEFAULT_MARGIN,
                   help="grow each box by this share of its width and height on every side (default: %(default)s)")
    d.add_argument("--det_batch_size", type=int, default=8, help="frames per detector batch (default: %(default)s)")


def check_detection_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``p.error`` for out-of-range ``--det_*`` values."""
    if not MIN_SCORE <= args.det_score_thr <= 1.0 or args.det_min_size < 0 or args.det_margin < 0:
        p.error(f"--det_score_thr must be in [{MIN_SCORE}, 1], --det_min_size and --det_margin >= 0")
    if args.det_batch_size < 1:
        p.error("--det_batch_size must be positive")


def detect_crops_from_args(args: argparse.Namespace, cache_dir: str | os.PathLike, device: str) -> FrameCrops:
    """:func:`detect_crops` of ``args.images`` with the flags of :func:`add_detection_arguments`."""
    return detect_crops(args.images, cache_dir, args.det_config, args.det_checkpoint, score_thr=args.det_score_thr,
                        margin=args.det_margin, min_size=args.det_min_size, device=device,
                        batch_size=args.det_batch_size)


def detect_crops(images: str | os.PathLike, cache_dir: str | os.PathLike, det_config: str | os.PathLike,
                 det_checkpoint: str | os.PathLike, *, score_thr: float = DEFAULT_SCORE_THR,
                 margin: float = DEFAULT_MARGIN, min_size: int = DEFAULT_MIN_SIZE, device: str = "cpu",
                 batch_size: int = 8,
                 save_every_s: float = MANIFEST_SAVE_SECONDS) -> FrameCrops:
    """Detect the people and vehicles in every image directly inside ``images`` and cut them out (module docstring).

    Only frames that are new or changed since the last run are detected and cut; the detector is loaded only when
    some frame is not in its cache. Unreadable frames are reported, returned in ``failed`` and skipped.

    Raises:
        FileNotFoundError: the folder is missing. ValueError: it holds no image file, or ``score_thr`` is below
        :data:`MIN_SCORE`.
        DetectorError: the detector config or checkpoint is missing or does not load.
    """
    if score_thr < MIN_SCORE:
        raise ValueError(f"the detector score threshold must be at least {MIN_SCORE} (lower boxes are not kept), got "
                         f"{score_thr}")
    frames = list_images(images)
    if not frames:
        raise ValueError(f"no image file (.jpg, .png, ...) directly inside {images}")
    fingerprint = detector_fingerprint(det_config, det_checkpoint)
    digest = fingerprint_digest(fingerprint)
    root = crop_folder(cache_dir, images, digest, score_thr, margin, min_size)
    manifest_path = root / "crops.json"
    manifest = _read_manifest(manifest_path)
    keys = {p.name: image_key(p) for p in frames}
    for name in [n for n, e in manifest.items() if keys.get(n) != e["image"]]:  # gone or changed: cut again
        _remove_crops(root, manifest.pop(name))
    todo = [p for p in frames if p.name not in manifest]
    log.info("%s: %d frames, %d cut before, %d to detect and cut", images, len(frames), len(frames) - len(todo),
             len(todo))
    failed: list[tuple[Path, str]] = []
    if todo:
        # Detect first (resumable through the detection cache), then cut (resumable through the crop list).
        cache = DetectionCache(detection_cache_file(cache_dir, images, digest), fingerprint)
        found, failed, _ = detect_cached(
            todo, cache, lambda: BatchDetector(load_detector(det_config, det_checkpoint, device), BOXES_PER_FRAME),
            batch_size=batch_size, desc=f"detect {Path(images).name}",
            keep=lambda d: d.label in CLASS_GROUPS and d.score >= MIN_SCORE)
        last_save = time.monotonic()
        try:
            for p in tqdm([p for p in todo if p.name in found], desc=f"cut {Path(images).name}", unit="frame"):
                try:
                    rows = _cut(p, root, frame_objects(found[p.name], score_thr, min_size), margin)
                except ImageReadError as e:  # changed or removed since it was detected
                    failed.append((p, str(e)))
                    continue
                manifest[p.name] = {"image": keys[p.name], "crops": rows}
                if time.monotonic() - last_save >= save_every_s:
                    write_json(manifest_path, manifest)
                    last_save = time.monotonic()
        finally:  # also when interrupted: the crops cut so far count on the next run
            write_json(manifest_path, manifest)
    for p, reason in failed:
        log.warning("unreadable frame %s (%s): not searched", p, reason)
    crops = {row[0]: _crop_from_row(row, frame) for frame, entry in sorted(manifest.items())
             for row in entry["crops"]}
    empty = sum(not e["crops"] for e in manifest.values())
    per = ", ".join(f"{sum(c.category == k for c in crops.values())} {k}" for k in CATEGORIES)
    log.info("%s: %d objects (%s) in %d frames; %d frames without a person or vehicle scoring >= %s",
             images, len(crops), per, len(manifest), empty, score_thr)
    return FrameCrops(root, Path(images), sorted(keys), crops, failed)
