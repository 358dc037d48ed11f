"""Stage 1, detection cleaning (``train_det_cls.py`` / ``val_det_cls.py``): RTMDet decides people or car per image.

Reads (``<data_path>`` defaults to ``dataset/train``; ``<split>`` is ``train`` or ``val``)::

    <data_path>/<split>_label.txt            name$attribute$caption, one image per line (never modified)
    <data_path>/<split>_images/<name>         the images (never modified)

Writes (into ``<data_path>``)::

    fliter_<split>_labels.txt                 the kept lines, ``<category>_<name>$attribute$caption``, sorted car
                                              first, then people, then by original name (the spelling "fliter" is
                                              the original solution's)
    <split>_images/<category>_<name>          links to the originals (relative symlinks; hard links or copies
                                              where symlinks are impossible)
    det_<split>_report.jsonl                  one row per input line (see :class:`LineOutcome`)
    det_<split>_report.txt                    a short summary: counts per decision reason
    det_<split>_cache.jsonl                   the detection cache (see ``traffic_retrieval.detection``)
    det_<split>_copies.json                   the coded names this stage made as copies (only where neither
                                              symlinks nor hard links work), so a later run knows they are its own

Rule for each line:

1. A malformed line (not UTF-8, not three ``$`` fields, an empty field, a blank line in the middle, a name seen
   before) is dropped with the reader's reason; a name that is not a plain file name is dropped.
2. The caption's category comes from ``categories.text_category`` (He/She or a person word -> people, else car).
   The attribute cross-checks it: a 21-value 0/1 code is people, ``colour Brand.`` text is car
   (``categories.attribute_category``); if the two disagree the line is dropped, since one of them is wrong.
3. The image must exist and decode (our loader: truncated, empty and non-image files are dropped with the
   reason; CMYK, grayscale and PNG-in-a-.jpg are converted and noted).
4. The detector's decision (``detection.decide_category``: the best person box against the best car/bus/truck
   box at or above ``--score_thr``) must agree with the caption: a disagreement is dropped as
   "image looks like X, caption is about Y". An image with no box above the threshold is kept under the
   caption's category (``--keep_undetected``, the default: small or cut-off objects are often missed) or dropped
   with ``--no-keep_undetected``. An image the detector fails on (e.g. a 1x3000 strip) is dropped with the
   detector's message; a detector that fails on every image stops the stage.
5. A kept line gets its link ``<category>_<name>``. A file of that name that is not our link is never replaced:
   the line is dropped instead. The cleaned label file is written first, then the links are made.

Our own links of a previous run that no longer apply (their line was dropped, removed or changed category) are
removed: a symlink ``<category>_<name>`` to ``<name>`` in the same folder, a hard link ``<category>_<name>`` to
``<name>``, or a copy listed in ``det_<split>_copies.json`` that is still identical to ``<name>``. Nothing else is
ever deleted, in particular no file named in the label file. The stage exits with an error when a non-empty label
file keeps no line at all (after writing the report that says why).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import runtime
from .categories import CATEGORIES, attribute_category, coded_name, text_category
from .detection import (
    DEFAULT_DET_CHECKPOINT,
    DEFAULT_DET_CONFIG,
    DEFAULT_SCORE_THR,
    BatchDetector,
    CachedImage,
    Detection,
    DetectionCache,
    DetectorError,
    decide_category,
    detector_fingerprint,
    image_key,
    load_detector,
    rgb_to_bgr,
)
from .fileio import write_json, write_jsonl, write_text
from .images import ImageReadError, load_rgb
from .labels import BOM, LabelFormatError, LabelRecord, LineProblem, read_label_file, write_label_file

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val")
KEPT, DROPPED = "kept", "dropped"
# Reasons without specifics (the summary counts rows per reason; specifics go to LineOutcome.detail).
AGREES = "detected category agrees with the caption"
UNDETECTED_KEPT = "undetected, kept under the caption's category"
UNDETECTED = "undetected"
NOT_PLAIN_NAME = "image name is not a plain file name"
LINK_TAKEN = "link name taken by another file"
DETECTOR_FAILED = "detector failed"
FREE = "free"  # link_state: nothing has the coded name yet
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}

BatchDetectFn = Callable[[Sequence[np.ndarray]], "list[list[Detection]]"]


class CleaningError(ValueError):
    """The stage cannot run (missing label file or image folder); the message names the path."""


@dataclass
class CleaningConfig:
    """Arguments of the cleaning stage (filled by :func:`parse_args`)."""

    split: str  # "train" or "val"
    data_path: Path = Path("dataset/train")  # holds <split>_label.txt and <split>_images/; outputs go here too
    det_config: str = DEFAULT_DET_CONFIG  # mmdet config file, or mmdet::<path> for a packaged one
    det_checkpoint: str = DEFAULT_DET_CHECKPOINT  # mmdet checkpoint (.pth)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    score_thr: float = DEFAULT_SCORE_THR  # a box counts when its score is at least this
    batch_size: int = 8  # images per detector call
    threads: int | None = None  # torch CPU threads (None: runtime.default_threads())
    workers: int = 0  # image-decoding worker processes (0: decode in the main process)
    keep_undetected: bool = True  # keep images without any person/vehicle box under the caption's category


@dataclass
class LineOutcome:
    """One row of ``det_<split>_report.jsonl``: what happened to one input line and why."""

    line_no: int  # 1-based line number in the label file
    name: str | None  # image name as written (None when the line could not be split)
    decision: str  # "kept" or "dropped"
    reason: str  # short, groupable reason (the summary counts these)
    detail: str | None = None  # specifics: path, decoder message, the detector's best box, the bad line
    caption_category: str | None = None  # from categories.text_category
    attribute_category: str | None = None  # from categories.attribute_category (None: not recognised)
    detected: str | None = None  # the detector's category; None when undetected or not run
    best_scores: dict[str, float] | None = None  # best box score per category, whatever the threshold
    coded_name: str | None = None  # name in the cleaned file (kept lines only)
    link: str | None = None  # how the coded file was made: symlink, hardlink, copy (+ " (existing)")
    image_note: str | None = None  # e.g. "PNG data under a .jpg name", "CMYK image converted to RGB"
    from_cache: bool = False  # detections came from the cache


@dataclass
class CleaningResult:
    """What the stage did; also summarised in ``det_<split>_report.txt``."""

    split: str
    n_lines: int
    kept: dict[str, int]  # per category
    dropped: int
    reasons: dict[str, int]  # "kept: ..." / "dropped: ..." -> count
    n_detected: int  # images run through the detector in this run
    n_cached: int  # images whose detections came from the cache
    input_notes: list[str]
    outputs: dict[str, str] = field(default_factory=dict)  # "input" (the label file) and the output_paths
    rows: list[LineOutcome] = field(default_factory=list)
    links_removed: list[str] = field(default_factory=list)  # our links of a previous run that no longer applied


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None, split: str = "train") -> CleaningConfig:
    """Command-line arguments of ``<split>_det_cls.py``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    p = argparse.ArgumentParser(
        prog=f"{split}_det_cls.py",
        description=f"Clean {split}_label.txt with RTMDet: decide people/car per image, compare with the caption, "
                    f"write fliter_{split}_labels.txt, category-coded links and a report.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data_path", default="dataset/train",
                   help=f"folder with {split}_label.txt and {split}_images/ (default: %(default)s)")
    p.add_argument("--det_config", default=DEFAULT_DET_CONFIG,
                   help="mmdet config; mmdet::<path> = packaged config (default: %(default)s)")
    p.add_argument("--det_checkpoint", default=DEFAULT_DET_CHECKPOINT, help="mmdet checkpoint (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--score_thr", type=float, default=DEFAULT_SCORE_THR,
                   help="a box counts when its score is at least this (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="images per detector call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on small machines)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: %(default)s)")
    p.add_argument("--keep_undetected", action=argparse.BooleanOptionalAction, default=True,
                   help="keep images without a person/vehicle box under the caption's category (default: on)")
    a = p.parse_args(argv)
    if not 0.0 < a.score_thr <= 1.0:
        p.error("--score_thr must be in (0, 1]")
    if a.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if a.workers < 0:
        p.error("--workers must be >= 0")
    return CleaningConfig(
        split=split, data_path=Path(a.data_path), det_config=a.det_config, det_checkpoint=a.det_checkpoint,
        device=a.device, score_thr=a.score_thr, batch_size=a.batch_size, threads=a.threads, workers=a.workers,
        keep_undetected=a.keep_undetected,
    )


def main(argv: list[str] | None = None, split: str = "train") -> CleaningResult:
    """Entry point shared by ``train_det_cls.py`` and ``val_det_cls.py``."""
    cfg = parse_args(argv, split)
    runtime.setup(cfg.threads)
    try:
        result = clean_split(cfg)
    except (CleaningError, DetectorError) as e:
        raise SystemExit(f"{split}_det_cls: {e}") from None
    if result.n_lines and not result.kept:
        # Exit 0 with an empty cleaned file would let the next stage fail far from the cause (e.g. a mis-saved file).
        reason, n = Counter(result.reasons).most_common(1)[0]
        raise SystemExit(f"{split}_det_cls: no line kept out of {result.n_lines} of {result.outputs['input']} "
                         f"(most common: {reason}, {n} line(s)); see {result.outputs['summary']}")
    log.info("%s: kept %s, dropped %d; report: %s", split, result.kept, result.dropped, result.outputs["summary"])
    return result


# ------------------------------------------------------------------------------------------------- paths
def output_paths(data_path: Path, split: str) -> dict[str, Path]:
    return {
        "labels": data_path / f"fliter_{split}_labels.txt",
        "report": data_path / f"det_{split}_report.jsonl",
        "summary": data_path / f"det_{split}_report.txt",
        "cache": data_path / f"det_{split}_cache.jsonl",
        "copies": data_path / f"det_{split}_copies.json",
    }


def input_notes(path: Path) -> list[str]:
    """Things the reader tolerated in the raw file (BOM, CRLF, trailing blank lines, no lines at all)."""
    data = path.read_bytes()
    notes = []
    if data.startswith(BOM):
        notes.append("UTF-8 byte-order mark ignored")
    if b"\r\n" in data:
        notes.append("CRLF line ends accepted")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the normal final line end
    trailing = 0
    while lines and not lines[-1].strip():
        lines.pop()
        trailing += 1
    if not lines:
        notes.append("empty split: the file has no lines")
    elif trailing:
        notes.append(f"{trailing} trailing blank line(s) ignored")
    return notes


# ------------------------------------------------------------------------------------------------- images
def _image_note(path: Path) -> str | None:
    """What our loader had to convert: a format that does not match the extension, a non-RGB mode."""
    with Image.open(path) as im:  # header only; the full decode is load_rgb's
        fmt, mode = im.format, im.mode
    notes = []
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if fmt and expected and fmt != expected:
        notes.append(f"{fmt} data under a {path.suffix} name")
    if mode != "RGB":
        notes.append(f"{mode} image converted to RGB")
    return "; ".join(notes) or None


class _ImageSet(Dataset):
    """Decodes images for the detector; a bad file becomes an error string, never an exception in a worker."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            image = rgb_to_bgr(load_rgb(path))
            return {"index": i, "image": image, "error": None, "note": _image_note(path)}
        except ImageReadError as e:
            return {"index": i, "image": None, "error": str(e).removeprefix(f"{path}: "), "note": None}


def _image_reason(error: str) -> str:
    """Groupable reason from a loader message: ``truncated (image file is truncated ...)`` -> ``image truncated``."""
    return "image " + error.split(" (")[0]


# ------------------------------------------------------------------------------------------------- links
def _is_own_link(path: Path, name: str, original: Path) -> bool:
    """Whether ``path`` is a link this stage made to ``name``: a symlink to it, or a hard link to the same file."""
    if path.is_symlink():
        return os.readlink(path) == name
    try:
        return path.is_file() and original.exists() and os.path.samefile(path, original)
    except OSError:
        return False


def link_state(image_dir: Path, name: str, coded: str) -> str | None:
    """What ``image_dir/coded`` is, without changing anything: :data:`FREE` when nothing has that name, how it
    already links to ``image_dir/name`` (``"symlink (existing)"``, ...), or None when another file has the name."""
    dst, src = image_dir / coded, image_dir / name
    if not (dst.is_symlink() or dst.exists()):
        return FREE
    if dst.is_symlink():
        return "symlink (existing)" if os.readlink(dst) == name else None
    if _is_own_link(dst, name, src):
        return "hardlink (existing)"
    if dst.is_file() and filecmp.cmp(dst, src, shallow=False):
        return "copy (existing)"
    return None


def make_link(image_dir: Path, name: str, coded: str) -> str | None:
    """Create ``image_dir/coded`` pointing at ``image_dir/name``; returns how, or None if the name is taken.

    A relative symlink if the file system allows it, else a hard link, else a copy; made under a temporary name and
    moved into place, so a crash never leaves half a file. An existing link of ours (or an identical copy) is kept.
    """
    state = link_state(image_dir, name, coded)
    if state != FREE:
        return state
    dst, src = image_dir / coded, image_dir / name
    tmp = image_dir / f".{coded}.tmp-{os.getpid()}"
    try:
        try:
            os.symlink(name, tmp)
            how = "symlink"
        except OSError:
            try:
                os.link(src, tmp)
                how = "hardlink"
            except OSError:
                shutil.copy2(src, tmp)
                how = "copy"
        os.replace(tmp, dst)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
    return how


def read_copies(path: Path) -> set[str]:
    """The coded names listed in ``det_<split>_copies.json`` (empty if there is none or it is unreadable)."""
    if not path.is_file():
        return set()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("expected a JSON list of file names")
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): the copies it listed are left in place", path, e)
        return set()
    return set(names)


def _stale_link(entry: os.DirEntry, image_dir: Path, copies: set[str]) -> bool:
    """Whether ``entry`` is a link this stage made: ``<category>_<name>`` as a symlink to ``<name>``, a hard link to
    it, or a copy we listed that is still identical to it (so removing it loses nothing)."""
    category, sep, name = entry.name.partition("_")
    if not sep or category not in CATEGORIES or not name:
        return False
    src = image_dir / name
    if _is_own_link(Path(entry.path), name, src):
        return True
    return (entry.name in copies and entry.is_file(follow_symlinks=False) and src.is_file()
            and filecmp.cmp(entry.path, src, shallow=False))


def remove_stale_links(image_dir: Path, keep: set[str], protected: set[str], copies: set[str],
                       among: set[str] | None = None) -> list[str]:
    """Remove every link of ours in ``image_dir`` (see :func:`_stale_link`) whose name is not in ``keep``; returns the
    removed names. A name in ``protected`` (an image name of the label file) is never touched; with ``among``, only
    links to those names are considered."""
    removed = []
    with os.scandir(image_dir) as entries:
        for entry in entries:
            if entry.name in keep or entry.name in protected:
                continue
            if among is not None and entry.name.partition("_")[2] not in among:
                continue
            if not _stale_link(entry, image_dir, copies):
                continue
            os.unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


# ------------------------------------------------------------------------------------------------- the stage
def _problem_row(p: LineProblem) -> LineOutcome:
    name = p.text.split("$", 1)[0] if "$" in p.text else None
    if p.reason.startswith("duplicate image name"):
        return LineOutcome(p.line_no, name, DROPPED, "duplicate image name", f"{p.reason}: {p.text!r}")
    return LineOutcome(p.line_no, name, DROPPED, f"bad line: {p.reason}", repr(p.text))


def _check_record(rec: LabelRecord) -> LineOutcome:
    """Steps 1-2 of the rule: a row still to be decided ("" reason), or a dropped one."""
    cap = text_category(rec.caption)
    att = attribute_category(rec.attribute)
    row = LineOutcome(rec.line_no, rec.name, DROPPED, "", caption_category=cap, attribute_category=att)
    if "/" in rec.name or "\\" in rec.name or rec.name in (".", ".."):
        row.reason = NOT_PLAIN_NAME
    elif att is not None and att != cap:
        row.reason = f"caption is about {cap} but the attribute is a {att} attribute"
        row.detail = f"attribute {rec.attribute!r}"
    return row


class _LazyDetector:
    """Loads the detector on first use, so a fully cached run loads nothing."""

    def __init__(self, cfg: CleaningConfig) -> None:
        self.cfg = cfg
        self._fn: BatchDetectFn | None = None

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        if self._fn is None:
            device = str(runtime.resolve_device(self.cfg.device))
            try:
                self._fn = BatchDetector(load_detector(self.cfg.det_config, self.cfg.det_checkpoint, device))
            except DetectorError:
                raise
            except Exception as e:  # a setup failure, never one image's: _run_detector must not retry it per image
                raise DetectorError(f"cannot load the detector {self.cfg.det_config} + {self.cfg.det_checkpoint}: "
                                    f"{_one_line(e)}") from e
        return self._fn(images)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (OpenCV's messages span several), cut to ``limit`` characters."""
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    text = f"{kind}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_detector(detector: BatchDetectFn, images: list[np.ndarray]) -> list[list[Detection] | str]:
    """Detections of each image, or the error message of an image the detector fails on.

    A failing batch is retried image by image, so one image the detector cannot take (a 1x3000 strip makes mmcv's
    resize assert inside OpenCV) costs only its own line, instead of stopping the stage again at every resume.

    Raises:
        DetectorError: the detector cannot be loaded.
    """
    try:
        return list(detector(images))
    except DetectorError:
        raise
    except Exception as e:
        if len(images) == 1:
            return [_one_line(e)]
        log.warning("detector failed on a batch of %d images (%s); retrying them one by one", len(images),
                    _one_line(e))
    out: list[list[Detection] | str] = []
    for image in images:
        try:
            out.append(detector([image])[0])
        except DetectorError:
            raise
        except Exception as e:
            out.append(_one_line(e))
    return out


def _detect(
    rows: dict[str, LineOutcome], image_dir: Path, cache: DetectionCache, detector: BatchDetectFn, cfg: CleaningConfig
) -> tuple[dict[str, CachedImage], int, int]:
    """Detections of every image still to decide: from the cache or the detector. Bad images get their drop."""
    found: dict[str, CachedImage] = {}
    keys: dict[str, dict[str, int]] = {}
    todo: list[str] = []
    for name, row in rows.items():
        path = image_dir / name
        if not path.exists():
            row.reason, row.detail = "image missing", str(path)
            continue
        keys[name] = image_key(path)
        cached = cache.get(name, keys[name])
        if cached is not None:
            found[name] = cached
            row.from_cache = True
        else:
            todo.append(name)
    n_cached = len(found)
    if not todo:
        return found, 0, n_cached
    loader = DataLoader(_ImageSet([image_dir / n for n in todo]), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.workers, collate_fn=list)
    n_detected = 0
    failures: list[str] = []  # "<path>: <error>" of each image the detector failed on
    probed = False
    with tqdm(total=len(todo), desc=f"detect {cfg.split}", unit="img") as bar:
        for batch in loader:
            good = [item for item in batch if item["image"] is not None]
            for item in batch:
                if item["error"] is not None:
                    name = todo[item["index"]]
                    rows[name].reason = _image_reason(item["error"])
                    rows[name].detail = f"{image_dir / name}: {item['error']}"
            dets = _run_detector(detector, [item["image"] for item in good]) if good else []
            new = []
            for item, d in zip(good, dets):
                name = todo[item["index"]]
                if isinstance(d, str):  # not cached: a later run (perhaps with another detector) tries it again
                    rows[name].reason, rows[name].detail = DETECTOR_FAILED, f"{image_dir / name}: {d}"
                    failures.append(rows[name].detail)
                    continue
                found[name] = CachedImage(d, item["note"])
                new.append((name, keys[name], found[name]))
            cache.add_many(new)  # flushed per batch: an interrupted run resumes from here
            n_detected += len(new)
            bar.update(len(batch))
            # Nothing detected yet and a whole batch failed: the images, or the detector (a wrong device, a broken
            # install)? One plain image decides, so a broken detector stops the stage instead of dropping the split,
            # while a rerun that only retries the images it failed on (never cached) drops them again.
            if good and not new and n_detected == 0 and not probed:
                probed = True
                _probe_detector(detector, failures[-1])
    return found, n_detected, n_cached


PROBE_IMAGE = np.full((64, 64, 3), 127, dtype=np.uint8)  # an image any detector takes


def _probe_detector(detector: BatchDetectFn, example: str) -> None:
    """Raise CleaningError if the detector fails on a plain 64x64 grey image too (it is broken, not the images)."""
    try:
        detector([PROBE_IMAGE])
    except DetectorError:
        raise
    except Exception as e:
        raise CleaningError(f"the detector fails on every image, even a plain 64x64 one ({_one_line(e)}); e.g. "
                            f"{example}") from None


def _decide(row: LineOutcome, cached: CachedImage, cfg: CleaningConfig) -> None:
    """Step 4 of the rule: compare the detector's category with the caption's."""
    dec = decide_category(cached.detections, cfg.score_thr)
    row.detected = dec.category
    row.best_scores = {c: round(s, 4) for c, s in dec.best.items()}
    row.image_note = cached.note
    row.detail = dec.reason
    cap = row.caption_category
    if dec.category == cap:
        row.decision, row.reason = KEPT, AGREES
    elif dec.category is None:
        if cfg.keep_undetected:
            row.decision, row.reason = KEPT, UNDETECTED_KEPT
        else:
            row.reason = UNDETECTED
    else:
        row.reason = f"image looks like {dec.category}, caption is about {cap}"


def clean_split(cfg: CleaningConfig, detector: BatchDetectFn | None = None) -> CleaningResult:
    """Run the cleaning stage on one split (see the module docstring).

    Args:
        cfg: the stage's arguments.
        detector: maps a list of BGR images to their detections; default: the ``cfg`` detector, loaded lazily
            (only if some image is not in the cache).

    Raises:
        CleaningError: the label file or the image folder is missing, the label file is UTF-16, the detector fails
            on every image, or an output or a link cannot be written.
        DetectorError: the detector config or checkpoint is missing or unusable.
    """
    data_path = Path(cfg.data_path)
    label_path = data_path / f"{cfg.split}_label.txt"
    image_dir = data_path / f"{cfg.split}_images"
    out = output_paths(data_path, cfg.split)
    if not label_path.is_file():
        hint = ""
        archived = data_path.parent / cfg.split / label_path.name  # the official archive's layout: val/val_label.txt
        if archived.is_file():
            hint = (f" (the challenge archive has it in {archived.parent}: move or link {label_path.name} and "
                    f"{image_dir.name}/ from there into {data_path})")
        raise CleaningError(
            f"{label_path} not found: --data_path must hold {cfg.split}_label.txt and {cfg.split}_images/{hint}"
        )
    try:
        records, problems = read_label_file(label_path)
    except LabelFormatError as e:  # the whole file is unusable (UTF-16)
        raise CleaningError(str(e)) from None
    notes = input_notes(label_path)
    for note in notes:
        log.warning("%s: %s", label_path, note)
    if records and not image_dir.is_dir():
        raise CleaningError(f"image folder {image_dir} not found (next to {label_path})")

    rows = [_problem_row(p) for p in problems]
    pending: dict[str, LineOutcome] = {}
    for rec in records:
        row = _check_record(rec)
        rows.append(row)
        if not row.reason:
            pending[rec.name] = row
    n_detected = n_cached = 0
    fingerprint: dict[str, Any] | None = None
    if pending:
        fingerprint = detector_fingerprint(cfg.det_config, cfg.det_checkpoint)
        cache = DetectionCache(out["cache"], fingerprint)
        found, n_detected, n_cached = _detect(pending, image_dir, cache, detector or _LazyDetector(cfg), cfg)
        for name, cached in found.items():
            _decide(pending[name], cached, cfg)

    # Step 5 in three passes, so that nothing on disk changes before the cleaned file is written: which coded names
    # are free or already ours (nothing changes), the cleaned file, then the links.
    by_name = {rec.name: rec for rec in records}
    kept: list[LabelRecord] = []
    to_make: list[LineOutcome] = []
    for row in rows:
        if row.decision != KEPT:  # only good records are ever kept
            continue
        coded = coded_name(row.caption_category, row.name)
        state = link_state(image_dir, row.name, coded)
        if state is None:
            row.decision, row.reason = DROPPED, LINK_TAKEN
            row.detail = f"{image_dir / coded} exists and is not a link to {row.name}"
            continue
        row.coded_name = coded
        if state == FREE:
            to_make.append(row)
        else:
            row.link = state
        rec = by_name[row.name]
        kept.append(LabelRecord(coded, rec.attribute, rec.caption, rec.line_no))

    order = {c: i for i, c in enumerate(CATEGORIES)}  # CATEGORIES = (car, people): vehicles first, as the real file
    kept.sort(key=lambda r: (order[r.name.split("_", 1)[0]], r.name.split("_", 1)[1]))
    rows.sort(key=lambda r: r.line_no)
    try:
        write_label_file(out["labels"], kept)
    except ValueError as e:  # read_label_file lets no such field through; still, one line rather than a traceback
        raise CleaningError(f"cannot write {out['labels']}: {e}") from None
    removed: list[str] = []
    if image_dir.is_dir():  # else there is no record, so no link to make or remove
        removed = _update_links(data_path, cfg.split, image_dir, to_make, kept, rows, out["copies"])
    write_jsonl(out["report"], (asdict(r) for r in rows))

    result = CleaningResult(
        split=cfg.split, n_lines=len(rows), kept=dict(Counter(r.name.split("_", 1)[0] for r in kept)),
        dropped=sum(r.decision == DROPPED for r in rows),
        reasons=dict(Counter(f"{r.decision}: {r.reason}" for r in rows)), n_detected=n_detected, n_cached=n_cached,
        input_notes=notes, outputs={"input": str(label_path), **{k: str(v) for k, v in out.items()}}, rows=rows,
        links_removed=removed,
    )
    write_text(out["summary"], _summary_text(result, cfg, label_path, fingerprint))
    return result


def _update_links(data_path: Path, split: str, image_dir: Path, to_make: Sequence[LineOutcome],
                  kept: Sequence[LabelRecord], rows: Sequence[LineOutcome], copies_path: Path) -> list[str]:
    """Make the new links, remove our links that no longer apply and record our copies; returns the removed names."""
    copies = read_copies(copies_path)  # before this run adds its own
    made: set[str] = set()  # the copies this run makes, recorded even if a later link fails (disk full, ...)

    def record(removed: Sequence[str] = ()) -> None:
        ours = {n for n in copies - set(removed) if (image_dir / n).is_file() and not (image_dir / n).is_symlink()}
        if ours | made or copies_path.exists():
            write_json(copies_path, sorted(ours | made), indent=0)

    try:
        for row in to_make:
            name, coded = str(row.name), str(row.coded_name)  # both set for every kept row
            dst = image_dir / coded
            try:
                row.link = make_link(image_dir, name, coded)
            except OSError as e:
                raise CleaningError(f"cannot create {dst} ({e}); fix the folder and run the stage again") from None
            if row.link is None:
                raise CleaningError(f"{dst} appeared while the stage ran; run the stage again")
            if row.link == "copy":
                made.add(coded)
    except CleaningError:
        record()
        raise
    names = {r.name for r in rows if r.name is not None}  # every image name of the label file, even on a bad line
    other = data_path / f"{SPLITS[1 - SPLITS.index(split)]}_images"
    if other.is_dir() and other.resolve() == image_dir.resolve():
        # Both splits share the folder: links to names this file does not mention may be the other split's.
        log.warning("%s is also the %s image folder: only links to images named in this split's label file are "
                    "cleaned up", image_dir, other.name.split("_")[0])
        among: set[str] | None = names
    else:
        among = None
    removed = remove_stale_links(image_dir, {r.name for r in kept}, names, copies, among)
    if removed:
        log.info("removed %d link(s) of a previous run that no longer apply (first: %s)", len(removed),
                 image_dir / removed[0])
    record(removed)
    return removed


def _summary_text(result: CleaningResult, cfg: CleaningConfig, label_path: Path, fp: dict[str, Any] | None) -> str:
    lines = [f"Detection cleaning of {label_path} (split {cfg.split})"]
    if fp is not None:
        lines.append(f"detector: {cfg.det_config} + {cfg.det_checkpoint}")
    lines.append(f"score_thr {cfg.score_thr}; undetected images {'kept' if cfg.keep_undetected else 'dropped'}")
    for note in result.input_notes:
        lines.append(f"input: {note}")
    n_kept = sum(result.kept.values())
    per_cat = ", ".join(f"{c} {result.kept.get(c, 0)}" for c in CATEGORIES)
    lines.append(f"lines: {result.n_lines}; kept: {n_kept} ({per_cat}); dropped: {result.dropped}")
    lines.append(f"images detected in this run: {result.n_detected}; from the cache: {result.n_cached}")
    if result.links_removed:
        lines.append(f"links of a previous run removed (no longer apply): {len(result.links_removed)}")
    for decision in (KEPT, DROPPED):
        counts = sorted(((n, k) for k, n in result.reasons.items() if k.startswith(decision + ":")), reverse=True)
        if counts:
            lines.append(f"{decision}:")
            lines.extend(f"  {n:7d}  {k[len(decision) + 2:]}" for n, k in counts)
    lines.append(f"every line with its reason: {result.outputs['report']}")
    return "\n".join(lines) + "\n"
