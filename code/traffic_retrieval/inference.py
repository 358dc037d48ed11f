"""Stage 5: rank the test gallery for every query with one fine-tuned model per category, and write the submission.

Reads (``data_path``, as written by ``code/jsonl_test.py``; formats in :mod:`traffic_retrieval.indexing`):
the query file (``test_text.txt``, or the one ``test_order.json`` names), ``test.txt``, ``test_order.json``,
``<task>.test.jsonl`` (the gallery, with an optional image
``category``), ``<task>.test_queries.jsonl`` (each query with its category and token ids) and ``test_images/``; one
checkpoint per category that has queries.

Writes (``output_dir``), every file atomically and every submission validated first:

- ``infer_json_car.json`` / ``infer_json_people.json``: that category's queries only, in test_text.txt order;
- ``infer_json_all.json``: every query in test_text.txt order, each text as the line without its outer whitespace
  (as the official baseline reads the file and the scorer its ground truth): the submission;
- (without ``evaluate``) an earlier run's ``infer_metrics.json`` is removed;
- ``cache/gallery_<category>.pt``: the gallery features of that category's model (see :func:`encode_gallery`);
  ``gallery_<category>_<j>.pt`` for the further members of an ensemble;
- ``infer_metrics.json`` (with ``evaluate``): the metrics of ``infer_json_all.json`` against the ground truth.

What the 4th place's ``infer.py`` did differently (challenge.md section 4), and why this is better: it assumed the
car queries come first and concatenated by a count (here every query keeps its own original index, whatever the
order of test_text.txt); it built the full text x image matrix (here a chunked running top-k); it filled the other
category's queries with placeholder lists (here each category file holds only its own queries); and it wrote the
files unvalidated.

Framing: each model sees the gallery as it saw its validation images: the side padding (``people_pad``) is read
from the training config the checkpoint carries (``args``), unless given; a checkpoint fine-tuned on the other
category is warned about (the 4th place's infer.sh passed the car checkpoint for both models).

Ensembles: a category may have several checkpoints (other seeds, epochs or recipes of the same model); its
queries are then ranked by the mean of the members' cosine similarities, as the 1st place fused its models. The
members' L2-normalised features are concatenated and divided by sqrt(members) (:func:`ensemble_features`), so a dot
product of the fused unit vectors is that mean, and the chunked top-k and FAISS search work unchanged.

Scale: each model encodes each gallery image once (features cached per model and per image, saved every minute
while encoding, so an interrupted run re-encodes only what is missing), under bf16/fp16 autocast on the GPU; with
``dist_eval`` every rank encodes a contiguous shard of the gallery and of the queries and the features are gathered
in order, so the result equals a single-process run; rank 0 ranks and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from .categories import CATEGORIES
from .checkpoint import CheckpointError, load_checkpoint_file, load_state, resolve_checkpoint_path
from .distributed import (
    all_gather_concat,
    all_gather_objects,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
    shard,
)
from .encoding import ImageFeatures, encode_images, encode_token_batches
from .fileio import file_stamp, torch_save, write_json
from .indexing import DEFAULT_TEXT_FILE, TEST_IMAGE_DIR
from .labels import read_ground_truth, read_test_text
from .metrics import check_order, score_results
from .modeling import BEiT3Retrieval, compile_layers, create_model, get_config
from .precision import default_precision, get_autocast
from .retrieval import FaissIndex, topk_similarity
from .runtime import resolve_device
from .submission import write_submission
from .tokenizer import Tokenizer, batch_inputs
from .transforms import eval_transform

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_SAVE_SECONDS = 60.0  # the gallery cache is saved this often while encoding: what an interruption can lose
TASKS = ("flickr30k",)


class InferenceError(ValueError):
    """Input that inference cannot use (stale or missing index, missing checkpoint, ...); the message says what
    and how to fix it."""


# ------------------------------------------------------------------------------------------------ the test index
@dataclass
class TestIndex:
    """The test queries and gallery, checked against the query file (test_text.txt). Lists of queries are in that
    file's order."""

    texts: list[str]  # the query file's lines without outer whitespace (labels.read_test_text)
    categories: list[str]  # category of each query (from the index)
    segments: list[list[int]]  # token ids of each query (no bos/eos), as jsonl_test.py wrote them
    image_dir: Path  # <data_path>/test_images
    image_names: list[str]  # the gallery, sorted by name (the index's order)
    image_categories: list[str | None]  # category of each image, None when unknown
    text_file: str = DEFAULT_TEXT_FILE  # the query file in data_path that the index was built from

    def queries_of(self, category: str) -> list[int]:
        """Indices (in test_text.txt order) of the queries of ``category``."""
        return [i for i, c in enumerate(self.categories) if c == category]

    @property
    def image_paths(self) -> list[Path]:
        return [self.image_dir / n for n in self.image_names]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a line that is not a JSON object raises :class:`InferenceError` naming file:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InferenceError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InferenceError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _index_command(data_path: str | os.PathLike, spm: str | os.PathLike = "<spm>",
                   text_file: str = DEFAULT_TEXT_FILE) -> str:
    extra = "" if text_file == DEFAULT_TEXT_FILE else f" --text_file {text_file}"
    return f"python code/jsonl_test.py --data_path {data_path} --sentencepiece_model {spm}{extra}"


def _stale(data_path: Path, what: str, text_file: str = DEFAULT_TEXT_FILE) -> InferenceError:
    return InferenceError(f"{what}; the test index does not match {text_file} / {TEST_IMAGE_DIR}: re-run "
                          f"`{_index_command(data_path, text_file=text_file)}`")


def load_test_index(data_path: str | os.PathLike, task: str = "flickr30k") -> TestIndex:
    """Read and cross-check the test index written by ``code/jsonl_test.py``. The queries are those of the query
    file the index was built from (``test_order.json`` names it; ``test_text.txt`` for indexes that do not).

    Raises:
        FileNotFoundError: the query file is missing.
        InferenceError: an index file is missing, malformed or does not map back to the query file exactly, or a
            gallery image is missing.
    """
    if task not in TASKS:
        raise InferenceError(f"unknown task {task!r}; choose one of {TASKS}")
    data_path = Path(data_path)
    files = {"grouped": data_path / "test.txt", "order": data_path / "test_order.json",
             "images": data_path / f"{task}.test.jsonl", "queries": data_path / f"{task}.test_queries.jsonl"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InferenceError(f"test index file(s) missing: {', '.join(missing)}; run "
                             f"`{_index_command(data_path)}` first")
    try:
        order = json.loads(files["order"].read_text(encoding="utf-8"))
        original, cats = order["original_index"], order["category"]
        text_file = order.get("text_file", DEFAULT_TEXT_FILE)
        if not isinstance(text_file, str) or not text_file:
            raise TypeError(f"'text_file' must be a file name, got {text_file!r}")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InferenceError(f"{files['order']}: expected {{'text_file': str, 'original_index': [...], "
                             f"'category': [...]}} ({type(e).__name__}: {e})") from None

    def stale(what: str) -> InferenceError:
        return _stale(data_path, what, text_file)

    text_path = data_path / text_file
    texts = read_test_text(text_path)
    n = len(texts)
    if n == 0:
        raise InferenceError(f"{text_path} has no query")

    grouped = read_test_text(files["grouped"])
    if not (len(grouped) == len(original) == len(cats) == n):
        raise stale(f"{text_path} has {n} queries but {files['grouped']} has {len(grouped)} and "
                    f"{files['order']} maps {len(original)}")
    if sorted(original) != list(range(n)):
        raise stale(f"{files['order']}: original_index is not a permutation of 0..{n - 1}")
    for k, (line, i) in enumerate(zip(grouped, original)):
        if line != texts[i]:
            raise stale(f"{files['grouped']}:{k + 1}: {line!r} differs from {text_path}:{i + 1} {texts[i]!r}")

    rows = read_jsonl(files["queries"])
    if len(rows) != n:
        raise stale(f"{files['queries']} has {len(rows)} rows for {n} queries")
    categories: list[str] = [""] * n
    segments: list[list[int]] = [[] for _ in range(n)]
    for k, (row, i, cat) in enumerate(zip(rows, original, cats)):
        where = f"{files['queries']}:{k + 1}"
        if row.get("text") != grouped[k] or row.get("original_index") != i or row.get("category") != cat:
            raise stale(f"{where}: does not match {files['grouped']}:{k + 1} / {files['order']}")
        if cat not in CATEGORIES:
            raise InferenceError(f"{where}: unknown category {cat!r} (expected one of {CATEGORIES})")
        seg = row.get("text_segment")
        if not isinstance(seg, list) or not all(isinstance(t, int) for t in seg):
            raise InferenceError(f"{where}: 'text_segment' must be a list of token ids")
        categories[i], segments[i] = cat, seg

    image_dir = data_path / TEST_IMAGE_DIR
    names: list[str] = []
    image_cats: list[str | None] = []
    seen: set[str] = set()
    prefix = f"{TEST_IMAGE_DIR}/"
    for k, row in enumerate(read_jsonl(files["images"]), start=1):
        where = f"{files['images']}:{k}"
        path, cat = row.get("image_path"), row.get("category")
        if not isinstance(path, str) or not path.startswith(prefix) or "/" in path[len(prefix):]:
            raise InferenceError(f"{where}: image_path {path!r} is not '{prefix}<name>'")
        if cat is not None and cat not in CATEGORIES:
            raise InferenceError(f"{where}: unknown image category {cat!r} (expected null or one of {CATEGORIES})")
        name = path[len(prefix):]
        if name in seen:
            raise InferenceError(f"{where}: image {name!r} is listed twice")
        seen.add(name)
        names.append(name)
        image_cats.append(cat)
    if not names:
        raise stale(f"{files['images']} lists no image")
    absent = [nm for nm in names if not (image_dir / nm).is_file()]
    if absent:
        raise stale(f"{len(absent)} indexed image(s) missing from {image_dir} (first: {absent[0]})")
    if image_dir.is_dir():
        extra = sum(1 for p in image_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in seen)
        if extra:
            log.warning("%s holds %d file(s) that are not in the test index (unusable images, or added after "
                        "jsonl_test.py ran); they are not ranked", image_dir, extra)
    return TestIndex(texts, categories, segments, image_dir, names, image_cats, text_file)


# ------------------------------------------------------------------------------------------------ checkpoints
def find_checkpoint(path: str | os.PathLike, category: str) -> Path:
    """The checkpoint file of ``category``'s model (see :func:`~traffic_retrieval.checkpoint.resolve_checkpoint_path`:
    a file, a DeepSpeed tag directory, a run directory, or ``<run>/checkpoint-best`` of a plain-training run).

    Raises:
        InferenceError: none of them exists; the message names the flag to pass.
    """
    flag = f"--finetune_{category}"
    try:
        return resolve_checkpoint_path(path)
    except FileNotFoundError as e:
        raise InferenceError(f"{e} (the {category!r} model); train it or pass {flag} PATH (a .pth file or a "
                             "DeepSpeed checkpoint directory)") from None
    except CheckpointError as e:
        raise InferenceError(f"checkpoint of the {category!r} model ({flag}): {e}") from None


def resolve_members(paths: str | os.PathLike | Sequence[str | os.PathLike] | None, category: str,
                    n_queries: int) -> list[Path]:
    """The checkpoint files of ``category``'s model, or of its ensemble members (see :func:`find_checkpoint`).

    Raises:
        InferenceError: no checkpoint was given, one is missing, or one file is listed twice.
    """
    flag = f"--finetune_{category}"
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
    if not listed or not all(str(p) for p in listed):
        raise InferenceError(f"there are {n_queries} {category!r} queries but no checkpoint: pass {flag} PATH")
    files = [find_checkpoint(p, category) for p in listed]
    seen: dict[Path, str] = {}
    for given, f in zip(listed, files):
        key = f.resolve()
        if key in seen:
            raise InferenceError(f"{flag}: {given} and {seen[key]} are the same checkpoint ({f}); an ensemble "
                                 "needs different ones")
        seen[key] = str(given)
    return files


def ensemble_features(galleries: Sequence[ImageFeatures], queries: Sequence[torch.Tensor]
                      ) -> tuple[ImageFeatures, torch.Tensor]:
    """Fuse the members of an ensemble: ``(gallery, queries)`` whose dot product is the mean of the members'
    cosine similarities.

    Each member's features are L2-normalised; concatenating them and dividing by sqrt(n) gives unit vectors with
    ``<q, g> = (1/n) sum_j <q_j, g_j>``. Every member encoded the same images; the fused gallery keeps those that
    every member could read, in the first member's order, and reports the others as failed. One member is returned
    as it is.
    """
    if len(galleries) != len(queries) or not galleries:
        raise ValueError("ensemble_features: one gallery and one query tensor per member")
    if len(galleries) == 1:
        return galleries[0], queries[0]
    encoded = [{p.name for p in g.paths} | {p.name for p, _ in g.failed} for g in galleries]
    if any(e != encoded[0] for e in encoded[1:]):
        raise ValueError("ensemble_features: the members encoded different images")
    failed: dict[str, tuple[Path, str]] = {}
    for g in galleries:  # an image one member could not read is left out for all (the first reason is kept)
        for p, reason in g.failed:
            failed.setdefault(p.name, (p, reason))
    ok = [p for p in galleries[0].paths if p.name not in failed]
    scale = len(galleries) ** -0.5
    parts = []
    for g in galleries:
        row = {p.name: i for i, p in enumerate(g.paths)}
        parts.append(g.features[[row[p.name] for p in ok]])
    gallery = torch.cat(parts, dim=1) * scale
    return ImageFeatures(ok, gallery, list(failed.values())), torch.cat(list(queries), dim=1) * scale


@dataclass(frozen=True)
class TrainedFor:
    """What a checkpoint says about how it was trained (this project's trainer stores its config as ``args``)."""

    category: str | None = None  # the category it was fine-tuned on
    eval_pad: int | None = None  # side padding of its validation transform (people_pad for people, else 0)
    input_size: int | None = None  # image side it was trained at


def trained_for(obj: Any) -> TrainedFor:
    """Read :class:`TrainedFor` from a loaded checkpoint; unknown fields stay None (e.g. the official release)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if not isinstance(args, Mapping):
        return TrainedFor()
    size = None
    model = args.get("model")
    if isinstance(model, Mapping):
        size = model.get("input_size")
        if size is None and isinstance(model.get("model"), str):
            with contextlib.suppress(ValueError):  # a model name this version does not know: size unknown
                size = get_config(model["model"]).img_size
    size = size if isinstance(size, int) and size > 0 else None
    data = args.get("data")
    if not isinstance(data, Mapping) or data.get("category") not in CATEGORIES:
        return TrainedFor(input_size=size)
    pad = data.get("people_pad") if data["category"] == "people" else 0
    return TrainedFor(data["category"], pad if isinstance(pad, int) and pad >= 0 else None, size)


def load_model(name: str, checkpoint: str | os.PathLike, device: torch.device, input_size: int | None = None,
               vocab_needed: int | None = None, what: str = "model") -> tuple[BEiT3Retrieval, TrainedFor]:
    """Build ``name`` on ``device`` and load ``checkpoint`` strictly; errors name ``what`` (e.g. the flag).

    The file is read once for both the weights and its training settings (checkpoints are gigabytes). The model
    is built directly on the device: random initialisation of BEiT-3 large takes seconds on a CPU and is
    overwritten by the weights anyway.
    """
    with torch.device(device):
        model = create_model(name, img_size=input_size)
    try:
        file = resolve_checkpoint_path(checkpoint)
        obj = load_checkpoint_file(file)
        load_state(model, obj, str(file))
    except (CheckpointError, FileNotFoundError) as e:
        raise InferenceError(f"{what}: {e}") from None
    if vocab_needed is not None and vocab_needed > model.cfg.vocab_size:
        raise InferenceError(f"{what}: the tokenizer emits ids up to {vocab_needed - 1} but {name} has only "
                             f"{model.cfg.vocab_size} text embeddings (wrong --sentencepiece_model or --model?)")
    trained = trained_for(obj)
    if trained.input_size is not None and trained.input_size != model.cfg.img_size:
        log.warning("%s was trained on %d px images but encodes %d px ones (its position embeddings are "
                    "interpolated); pass --input_size %d unless that is what you want", what, trained.input_size,
                    model.cfg.img_size, trained.input_size)
    return model.eval(), trained


def resolve_pad(requested: int | None, trained: TrainedFor, what: str) -> int:
    """The side padding to encode images with: the requested one, else the checkpoint's validation padding, else 0."""
    if requested is None:
        pad = trained.eval_pad or 0
        if pad:
            log.info("%s: padding images by %d px left and right, as in its validation", what, pad)
        return pad
    if trained.eval_pad is not None and requested != trained.eval_pad:
        log.warning("%s: encoding with padding %d but it was validated with %d", what, requested, trained.eval_pad)
    return requested


# ------------------------------------------------------------------------------------------------ gallery cache
@dataclass(frozen=True)
class FeatureSpec:
    """Everything besides the image file that decides an image feature; cached features are reused only for the
    same spec (same checkpoint file, size and mtime; model; input size; precision; side padding)."""

    checkpoint: str  # absolute path of the checkpoint file
    checkpoint_size: int
    checkpoint_mtime_ns: int
    model: str
    input_size: int
    precision: str
    pad: int = 0  # black pixels added left and right before resizing (transforms.eval_transform people_pad)

    @classmethod
    def create(cls, checkpoint: str | os.PathLike, model: str, input_size: int, precision: str,
               pad: int = 0) -> "FeatureSpec":
        p = Path(checkpoint)
        size, mtime = file_stamp(p)
        return cls(os.path.abspath(p), size, mtime, model, input_size, precision, pad)


def _load_cache(path: Path, spec: FeatureSpec) -> dict[str, tuple[tuple[int, int], torch.Tensor | None, str | None]]:
    """``{name: (stamp, feature or None, failure reason or None)}`` from a cache file made with ``spec``."""
    if not path.is_file():
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("version") != CACHE_VERSION:
            log.info("%s: cache format %s, expected %s: re-encoding", path, obj.get("version"), CACHE_VERSION)
            return {}
        if obj["spec"] != asdict(spec):
            changed = sorted(k for k, v in asdict(spec).items() if obj["spec"].get(k) != v)
            log.info("%s: made with another %s: re-encoding", path, ", ".join(changed))
            return {}
        feats, out, row = obj["features"], {}, 0
        for name, size, mtime, reason in obj["entries"]:
            if reason is None:
                out[name] = ((size, mtime), feats[row], None)
                row += 1
            else:
                out[name] = ((size, mtime), None, reason)
        return out
    except Exception as e:  # a damaged cache only costs a re-encode, never the run
        log.warning("%s: unreadable gallery cache (%s: %s); re-encoding", path, type(e).__name__, e)
        return {}


def _save_cache(path: Path, spec: FeatureSpec, names: Sequence[str], stamps: Mapping[str, tuple[int, int]],
                feats: Mapping[str, torch.Tensor], failed: Mapping[str, str]) -> None:
    entries = [[n, *stamps[n], failed.get(n)] for n in names]
    rows = [feats[n] for n in names if n not in failed]
    dim = rows[0].shape[0] if rows else 0
    torch_save({"version": CACHE_VERSION, "spec": asdict(spec), "entries": entries,
                "features": torch.stack(rows) if rows else torch.empty(0, dim)}, path)


def _gather_rows(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """all_gather_concat on the device the backend needs (NCCL gathers CUDA tensors only), back on the CPU."""
    if get_world_size() == 1:
        return t.cpu()
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return all_gather_concat(t.to(dev)).cpu()


def encode_images_sharded(model: torch.nn.Module, paths: Sequence[Path], transform: Callable, *, batch_size: int,
                          device: torch.device, precision: str, num_workers: int = 0, desc: str = "images",
                          on_batch: Callable[[ImageFeatures], None] | None = None) -> ImageFeatures:
    """:func:`encode_images`, with every rank encoding a contiguous shard and the result gathered on every rank
    (``on_batch`` sees this rank's batches only)."""
    if get_world_size() == 1:
        return encode_images(model, paths, transform, batch_size=batch_size, device=device, precision=precision,
                             num_workers=num_workers, desc=desc, on_batch=on_batch)
    part_rows = shard(len(paths))
    lo, hi = part_rows.start, part_rows.stop
    part = encode_images(model, paths[lo:hi], transform, batch_size=batch_size, device=device, precision=precision,
                         num_workers=num_workers, desc=f"{desc} [rank {get_rank()}]", on_batch=on_batch)
    where = {p: lo + j for j, p in enumerate(paths[lo:hi])}
    kept = torch.tensor([where[p] for p in part.paths], dtype=torch.long)
    features = _gather_rows(part.features, device)
    kept = _gather_rows(kept, device)
    failed = [(Path(p), r) for rank_failed in all_gather_objects([(str(p), r) for p, r in part.failed])
              for p, r in rank_failed]
    return ImageFeatures([Path(paths[i]) for i in kept.tolist()], features, failed)


class _CacheSaver:
    """Writes the gallery cache while images are being encoded, so that an interrupted run resumes where it stopped.

    Saves at most every ``every_s`` seconds and, for large caches, never spends more than about a tenth of the time
    writing (each save rewrites the whole file atomically). A cache that cannot be written (a read-only folder, a
    full disk) is reported once and then left alone: it only saves time, the run goes on without it.
    """

    def __init__(self, path: Path, spec: FeatureSpec, names: Sequence[str], stamps: Mapping[str, tuple[int, int]],
                 feats: Mapping[str, torch.Tensor], failed: Mapping[str, str], every_s: float) -> None:
        self.path, self.spec, self.names, self.stamps = path, spec, names, stamps
        self.feats, self.failed = feats, failed  # the caller's dicts, filled while encoding: saved as they are then
        self.every_s, self.last, self.cost, self.broken = every_s, time.monotonic(), 0.0, False

    def save(self) -> int | None:
        """Write every image encoded so far; how many have a feature, or None when the cache cannot be written."""
        if self.broken:
            return None
        t0 = time.monotonic()
        done = [n for n in self.names if n in self.feats or n in self.failed]
        try:
            _save_cache(self.path, self.spec, done, self.stamps, self.feats, self.failed)
        except OSError as e:
            self.broken = True
            log.warning("cannot write the feature cache %s (%s: %s); going on without it", self.path,
                        type(e).__name__, e)
            return None
        self.last = time.monotonic()
        self.cost = self.last - t0
        return len(done) - sum(n in self.failed for n in done)

    def maybe_save(self) -> None:
        if time.monotonic() - self.last >= max(self.every_s, 10 * self.cost):
            n = self.save()
            log.debug("%s: progress saved (%s features)", self.path, n)


def encode_gallery(model: torch.nn.Module, paths: Sequence[Path], spec: FeatureSpec, cache_path: Path | None, *,
                   batch_size: int, device: torch.device, precision: str, num_workers: int = 0,
                   desc: str = "gallery", save_every_s: float = CACHE_SAVE_SECONDS) -> ImageFeatures:
    """Gallery features of ``model`` for ``paths`` (unique file names), reusing a cache file.

    The cache holds, for one :class:`FeatureSpec`, each image's name, size and mtime and its feature (or why it
    could not be read). Only images that are new or changed since are encoded, so a rerun, a different subset of
    the gallery or a few added images costs only what is missing. Progress is saved every ``save_every_s`` seconds
    while encoding and when the encoding stops with an error or Ctrl-C, so an interrupted run also resumes where it
    stopped. Unreadable images are reported and left out of the result (they are never ranked). Under
    ``torch.distributed`` the missing images are encoded in shards over the ranks; rank 0 writes the cache (with its
    own shard's progress until the shards are gathered).

    Returns:
        The readable images in ``paths`` order, their features [N, D] float32 on the CPU, and the failed ones.
    """
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("encode_gallery: image file names must be unique")
    stamps = {p.name: file_stamp(p) for p in paths}
    cached = _load_cache(cache_path, spec) if cache_path is not None else {}
    fresh = {n: v for n, v in cached.items() if n in stamps and v[0] == stamps[n]}  # changed images are re-encoded
    # Cached images of the same folder that this call does not ask for (e.g. the other category's, with
    # --restrict_to_category) stay in the cache while their file is unchanged; deleted or changed ones go.
    folder = paths[0].parent if paths and all(p.parent == paths[0].parent for p in paths) else None
    others = {n: v for n, v in cached.items()
              if n not in stamps and folder is not None and _unchanged(folder / n, v[0])}
    todo = [p for p in paths if p.name not in fresh]
    todo = broadcast_object(todo)  # every rank must encode the same list: rank 0's view of the cache decides
    log.info("%s: %d images, %d from the cache, %d to encode", desc, len(paths), len(paths) - len(todo), len(todo))
    feats = {n: v[1] for n, v in {**fresh, **others}.items() if v[1] is not None}
    failed = {n: v[2] for n, v in {**fresh, **others}.items() if v[2] is not None}
    saver = (_CacheSaver(cache_path, spec, [*names, *others], {**stamps, **{n: v[0] for n, v in others.items()}},
                         feats, failed, save_every_s)
             if cache_path is not None and is_main_process() else None)

    def merge(part: ImageFeatures) -> None:
        for p, row in zip(part.paths, part.features):
            feats[p.name] = row
            failed.pop(p.name, None)
        for p, reason in part.failed:
            failed[p.name] = reason
            feats.pop(p.name, None)

    def on_batch(part: ImageFeatures) -> None:
        merge(part)
        if saver is not None:
            saver.maybe_save()

    if todo:
        try:
            new = encode_images_sharded(model, todo, eval_transform(spec.input_size, spec.pad), batch_size=batch_size,
                                        device=device, precision=precision, num_workers=num_workers, desc=desc,
                                        on_batch=on_batch)
        except BaseException:
            if saver is not None and (n := saver.save()) is not None:
                log.warning("%s: stopped; %d features saved in %s, a rerun encodes only the rest", desc, n, cache_path)
            raise
        merge(new)
        if saver is not None and (n := saver.save()) is not None:
            log.info("%s: cached %d features in %s", desc, n, cache_path)
    bad = [(p, failed[p.name]) for p in paths if p.name in failed]
    for p, reason in bad:
        log.warning("%s: unreadable gallery image %s (%s): never ranked", desc, p, reason)
    ok = [p for p in paths if p.name not in failed]
    dim = model.cfg.embed_dim if hasattr(model, "cfg") else 0
    features = torch.stack([feats[p.name] for p in ok]) if ok else torch.empty(0, dim)
    return ImageFeatures(ok, features, bad)


def _unchanged(path: Path, stamp: tuple[int, int]) -> bool:
    """Whether ``path`` still exists with this (size, mtime) stamp."""
    try:
        return file_stamp(path) == stamp
    except OSError:
        return False


def encode_queries_sharded(model: torch.nn.Module, segments: Sequence[Sequence[int]], max_len: int, *,
                           batch_size: int, device: torch.device, precision: str,
                           desc: str = "queries") -> torch.Tensor:
    """Text features [N, D] (float32, CPU) of token id lists; every rank encodes a contiguous shard, gathered."""
    rows = shard(len(segments))
    tokens, mask = batch_inputs(segments[rows.start:rows.stop], max_len)  # may be empty: more ranks than queries
    feats = encode_token_batches(model, tokens, mask, batch_size=batch_size, device=device, precision=precision,
                                 desc=desc)
    return _gather_rows(feats, device)


# ------------------------------------------------------------------------------------------------ ranking
def rank_gallery(queries: torch.Tensor, gallery: torch.Tensor, k: int, *, device: torch.device | str = "cpu",
                 use_faiss: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``min(k, G)`` gallery rows per query: ``(scores [Q, k'], indices [Q, k'])`` on the CPU.

    Exact chunked search (:func:`topk_similarity`, never the whole Q x G matrix) or a FAISS inner-product index.
    """
    k_eff = min(k, gallery.shape[0])
    if queries.shape[0] == 0 or k_eff == 0:
        return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
    if use_faiss:
        index = FaissIndex(gallery.shape[1])
        index.add(gallery)
        scores, idx = index.search(queries, k_eff)
    else:
        scores, idx = topk_similarity(queries, gallery, k_eff, device=device, progress=progress)
    return scores.cpu(), idx.cpu()


def complete_ranking(ranked: Sequence[str], fallback: Sequence[str], k: int) -> list[str]:
    """``ranked`` followed by the first names of ``fallback`` that are not in it, up to ``k`` names.

    Used when a query may only be ranked among fewer than ``k`` images (``restrict_to_category``): the rest of the
    list is filled with other images in gallery order, so every query still has ``k`` unique names; under the official
    scorer misses after the last hit cost nothing.
    """
    out = list(ranked[:k])
    used = set(out)
    for name in fallback:
        if len(out) >= k:
            break
        if name not in used:
            out.append(name)
            used.add(name)
    return out


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class InferConfig:
    """Inference settings (``code/infer.py`` flags)."""

    # category -> checkpoint (file, DeepSpeed dir or checkpoint-best[.pth]), or a list of them: an ensemble ranked by
    # the mean cosine similarity of its members
    checkpoints: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]
    data_path: str = "dataset/test"  # folder with test_text.txt, test_images/ and the jsonl_test.py index
    sentencepiece_model: str = "model_pth/beit3.spm"
    model: str = "beit3_large_patch16_384"  # registered model name
    input_size: int | None = None  # image side; None: the model's
    task: str = "flickr30k"  # index file prefix
    output_dir: str = "code"  # where infer_json_*.json, cache/ and infer_metrics.json go
    batch_size: int = 64  # images per batch (texts: 4x)
    device: str = "auto"
    precision: str | None = None  # None: bf16 on cuda, fp32 on cpu
    k: int = 10  # names per query
    restrict_to_category: bool = False  # rank a query only among images of its category (or of unknown category)
    use_faiss: bool = False  # FAISS index instead of the exact chunked top-k
    num_workers: int = 0  # DataLoader workers for image decoding
    compile: bool = False  # torch.compile each encoder layer (the fastest on a GPU; costs a warm-up)
    pads: dict[str, int | None] = field(default_factory=dict)  # category -> side padding of its model's eval
    # transform; None or absent: what the checkpoint was validated with (0 if it does not say)
    use_cache: bool = True  # reuse/write <output_dir>/cache/gallery_<category>.pt
    evaluate: bool = False  # score infer_json_all.json against gt
    gt: str | None = None  # ground truth; None: <data_path>/test_gt.txt


def output_paths(output_dir: str | os.PathLike) -> dict[str, Path]:
    """``{"car": .../infer_json_car.json, "people": ..., "all": .../infer_json_all.json}``."""
    out = Path(output_dir)
    return {**{c: out / f"infer_json_{c}.json" for c in CATEGORIES}, "all": out / "infer_json_all.json"}


def _encode_member(cfg: InferConfig, category: str, j: int, checkpoint: Path, images: Sequence[Path],
                   segments: Sequence[Sequence[int]], tokenizer: Tokenizer, device: torch.device, precision: str,
                   n_members: int) -> tuple[ImageFeatures, torch.Tensor]:
    """Gallery and query features of member ``j`` of ``category``'s model (the only one, or one of an ensemble),
    each image framed as the checkpoint was validated; the model is freed afterwards (one on the device at a time)."""
    what = f"--finetune_{category} {checkpoint}"
    tag = category if n_members == 1 else f"{category} model {j + 1}/{n_members}"
    model, trained = load_model(cfg.model, checkpoint, device, cfg.input_size, tokenizer.vocab_size, what)
    if trained.category not in (None, category):
        log.warning("%s was fine-tuned on %r, not %r: is it the right checkpoint?", what, trained.category, category)
    if cfg.compile:
        compile_layers(model)
    pad = resolve_pad(cfg.pads.get(category), trained, what)
    spec = FeatureSpec.create(checkpoint, cfg.model, model.cfg.img_size, precision, pad)
    # member 0 keeps the single-model cache name, so adding members to a run re-encodes nothing of it
    cache = Path(cfg.output_dir) / "cache" / (f"gallery_{category}.pt" if j == 0 else f"gallery_{category}_{j}.pt")
    gallery = encode_gallery(model, images, spec, cache if cfg.use_cache else None, batch_size=cfg.batch_size,
                             device=device, precision=precision, num_workers=cfg.num_workers, desc=f"{tag} gallery")
    queries = encode_queries_sharded(model, segments, tokenizer.max_len, batch_size=cfg.batch_size * 4, device=device,
                                     precision=precision, desc=f"{tag} queries")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return gallery, queries


def run_inference(cfg: InferConfig) -> dict[str, Any]:
    """Encode, rank and write the submission files (see the module docstring); the caller sets up the process
    group for a distributed run. Every rank returns; only rank 0 ranks, writes and gets the full summary.

    Returns:
        A summary: ``queries`` per category, ``images``, ``failed_images`` (name, reason), ``timings`` (s per
        phase), ``outputs`` (paths) and ``metrics`` (with ``evaluate``, else None).

    Raises:
        InferenceError, FileNotFoundError, ValueError: bad input, with a message that says what to fix.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.k < 1:
        raise InferenceError(f"k must be positive, got {cfg.k}")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and get_world_size() > 1 and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed selected LOCAL_RANK's GPU
    precision = cfg.precision or default_precision(device)
    get_autocast(precision, device)  # fails fast on e.g. fp16 on the CPU, before any slow step
    gt_path = Path(cfg.gt) if cfg.gt else Path(cfg.data_path) / "test_gt.txt"
    if cfg.evaluate and not gt_path.is_file():
        raise InferenceError(f"--eval needs the ground truth, but {gt_path} does not exist (pass --gt FILE, in the "
                             "official format text$img1$img2... per line, or drop --eval)")

    index = load_test_index(cfg.data_path, cfg.task)
    tokenizer = Tokenizer(cfg.sentencepiece_model)
    for i, (text, seg) in enumerate(zip(index.texts, index.segments)):
        if tokenizer.encode(text) != seg:
            raise InferenceError(
                f"query {i + 1} ({text!r}): its token ids in the test index were made with another sentencepiece "
                f"model than {cfg.sentencepiece_model}; re-run "
                f"`{_index_command(cfg.data_path, cfg.sentencepiece_model, index.text_file)}`")
    gt = None
    if cfg.evaluate:  # read and order-check the ground truth now, not after hours of encoding
        gt = read_ground_truth(gt_path)
        check_order(index.texts, [t for t, _ in gt])
    present = [c for c in CATEGORIES if index.queries_of(c)]
    counts = {c: len(index.queries_of(c)) for c in CATEGORIES}
    log.info("%d queries (%s), %d gallery images; device %s, %s", len(index.texts),
             ", ".join(f"{c}: {n}" for c, n in counts.items()), len(index.image_names), device, precision)
    checkpoints = {c: resolve_members(cfg.checkpoints.get(c), c, counts[c]) for c in present}  # before slow steps

    known = [c for c in index.image_categories if c is not None]
    if cfg.restrict_to_category and not known:
        log.warning("--restrict_to_category: the test index has no image categories (run jsonl_test.py with "
                    "--image_categories), so every query is ranked among all images")
    # The images each model has to encode: all of them, or with the restriction only its category's and the unknown.
    candidates = {c: [p for p, ic in zip(index.image_paths, index.image_categories)
                      if not cfg.restrict_to_category or ic in (None, c)] for c in present}

    query_feats: dict[str, torch.Tensor] = {}
    galleries: dict[str, ImageFeatures] = {}
    failed: dict[str, str] = {}
    for c in present:
        t0 = time.perf_counter()
        q_idx = index.queries_of(c)
        segments = [index.segments[i] for i in q_idx]
        members = [_encode_member(cfg, c, j, ckpt, candidates[c], segments, tokenizer, device, precision,
                                  len(checkpoints[c]))
                   for j, ckpt in enumerate(checkpoints[c])]
        galleries[c], query_feats[c] = ensemble_features([g for g, _ in members], [q for _, q in members])
        failed.update((p.name, r) for p, r in galleries[c].failed)
        timings[f"encode_{c}"] = time.perf_counter() - t0
        log.info("%s: encoded %d images and %d queries%s in %.1f s", c, len(galleries[c].paths), len(q_idx),
                 f" with {len(checkpoints[c])} models" if len(checkpoints[c]) > 1 else "", timings[f"encode_{c}"])

    summary: dict[str, Any] = {"queries": counts, "images": len(index.image_names),
                               "failed_images": sorted(failed.items()), "timings": timings,
                               "outputs": {}, "metrics": None}
    if not is_main_process():
        barrier()
        return summary

    t0 = time.perf_counter()
    usable = [n for n in index.image_names if n not in failed]
    if len(usable) < cfg.k:
        raise InferenceError(f"the gallery has {len(usable)} usable image(s) but every query needs k={cfg.k} names")
    ranked: dict[int, list[str]] = {}
    for c in present:
        gal = galleries[c]
        if len(gal.paths) < cfg.k:
            log.warning("%s: only %d image(s) may be ranked for its queries; the lists are filled with other "
                        "images in gallery order", c, len(gal.paths))
        _, idx = rank_gallery(query_feats[c], gal.features, cfg.k, device=device, use_faiss=cfg.use_faiss)
        names = [p.name for p in gal.paths]
        for qi, row in zip(index.queries_of(c), idx.tolist()):
            ranked[qi] = complete_ranking([names[j] for j in row], usable, cfg.k)
    timings["rank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    outputs = output_paths(cfg.output_dir)
    gallery_names = set(index.image_names)
    for c in CATEGORIES:  # a category without queries still gets its (empty) file, so no stale one is left
        q_idx = index.queries_of(c)
        write_submission(outputs[c], [(index.texts[i], ranked[i]) for i in q_idx],
                         [index.texts[i] for i in q_idx], gallery_names, cfg.k)
    texts = read_test_text(Path(cfg.data_path) / index.text_file)  # the final check is against the file itself
    results = [(index.texts[i], ranked[i]) for i in range(len(index.texts))]
    write_submission(outputs["all"], results, texts, gallery_names, cfg.k)
    timings["write"] = time.perf_counter() - t0
    summary["outputs"] = {k: str(v) for k, v in outputs.items()}

    metrics_path = Path(cfg.output_dir) / "infer_metrics.json"
    if gt is not None:
        metrics = score_results(results, gt, index.categories)
        write_json(metrics_path, {"results": str(outputs["all"]), "gt": str(gt_path), **metrics}, indent=1)
        summary["metrics"] = metrics
    elif metrics_path.exists():  # the scores of an earlier run's submission must not sit next to this one
        metrics_path.unlink()
        log.info("removed %s: it scored an earlier run's submission", metrics_path)
    timings["total"] = time.perf_counter() - t_start
    log.info("timings (s): %s", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    barrier()
    return summary
