"""Text-to-image search over any image folder, a printable result table and a self-contained HTML contact sheet.

Reads: an image folder (the files directly inside it), one or more query texts, a checkpoint (or one per category:
each query then goes to the model of its category by the text rule, as in stage 5) and a sentencepiece model;
optionally ground truth in the official format (``text$img1$img2...`` per line) to mark hits and misses.
Writes: the gallery features, cached in ``<cache_dir>/gallery_<folder>_<key>.pt`` (one file per model, checkpoint,
input size, precision and padding; reused while the checkpoint file and every image's size and mtime are unchanged;
only new or changed images are encoded), and the HTML page: per query its text, AP when ground truth is given, and
the top k as thumbnails (small base64 JPEGs inside the page, so it still works when moved) with rank, name, score
and a green (hit) or red (miss) border.

Camera frames (whole scenes rather than one object per image) are searched object by object: with
:func:`traffic_retrieval.crops.detect_crops` every person and vehicle becomes a crop, the crops are ranked, and each
frame is listed once, by its best-matching object (whose crop is the thumbnail and whose box is reported).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from PIL import ImageDraw

from .categories import CATEGORIES, text_category
from .checkpoint import resolve_checkpoint_path
from .crops import Crop, FrameCrops
from .encoding import ImageFeatures, encode_texts, list_images
from .fileio import folder_key, write_json, write_text
from .images import ImageReadError, load_rgb
from .inference import FeatureSpec, encode_gallery, load_model, rank_gallery, resolve_pad
from .labels import read_ground_truth, read_test_text
from .metrics import average_precision_at_k, official_ap
from .modeling import BEiT3Retrieval
from .precision import default_precision
from .runtime import resolve_device
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

THUMB_SIZE = 128  # longest thumbnail side in pixels
THUMB_QUALITY = 80  # JPEG quality of the embedded thumbnails


@dataclass
class Hit:
    """One ranked image."""

    rank: int  # 1-based
    name: str  # file name inside the gallery folder (the frame's, when searching detected objects)
    path: Path  # the image shown (the object's crop, when searching detected objects)
    score: float  # cosine similarity
    relevant: bool | None = None  # None without ground truth for this query
    obj: Crop | None = None  # the frame's best-matching object, when searching detected objects
    frame_path: Path | None = None  # and its frame (shown with the object's box)


@dataclass
class QueryResult:
    """The top k of one query; the AP fields are set when the query is in the ground truth."""

    text: str
    hits: list[Hit]
    official_ap: float | None = None  # the challenge scorer's AP over the listed names
    ap_at_k: float | None = None  # standard AP@k (normalised by min(k, #relevant))
    num_relevant: int | None = None
    category: str | None = None  # which category's model answered (per-category search), else None


@dataclass
class Searcher:
    """A loaded model and tokenizer with an encoded gallery."""

    model: BEiT3Retrieval
    tokenizer: Tokenizer
    gallery: ImageFeatures
    device: torch.device
    precision: str
    batch_size: int = 256
    info: dict[str, str] = field(default_factory=dict)  # what was searched with what (shown in the HTML)
    crops: FrameCrops | None = None  # when the gallery images are objects detected in these frames

    def search(self, queries: Sequence[str], k: int = 10) -> list[QueryResult]:
        """The top ``k`` gallery images per query, best first (k is capped at the gallery size). A gallery of
        detected objects gives the top ``k`` frames, each scored by its best object."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        paths = self.gallery.paths
        if not paths:
            raise ValueError(f"nothing to search: {self.info.get('gallery', 'the gallery has no readable image')}")
        # Each gallery row's frame: itself, or the frame an object was cut from.
        frames = [self.crops.crops[p.name].frame if self.crops is not None else p.name for p in paths]
        per_frame = Counter(frames)
        if k > len(per_frame):
            log.warning("k=%d but the gallery has %d readable %s: showing all of them", k, len(per_frame),
                        "frames with a detected object" if self.crops is not None else "images")
        # The k-th best frame's best object ranks at most (k - 1) x (most objects in one frame) + 1 (every object
        # above it belongs to one of the k - 1 better frames), so that many objects always hold the top k frames.
        depth = min(len(paths), (k - 1) * max(per_frame.values()) + 1)
        feats = encode_texts(self.model, self.tokenizer, queries, batch_size=self.batch_size, device=self.device,
                             precision=self.precision, desc="queries")
        scores, idx = rank_gallery(feats, self.gallery.features, depth, device=self.device, progress=False)
        out = []
        for text, s_row, i_row in zip(queries, scores.tolist(), idx.tolist()):
            hits: list[Hit] = []
            listed: set[str] = set()
            for s, i in zip(s_row, i_row):
                if len(hits) == k:
                    break
                if frames[i] in listed:
                    continue  # the frame is already listed with a better object
                listed.add(frames[i])
                hit = Hit(len(hits) + 1, frames[i], paths[i], s)
                if self.crops is not None:
                    hit.obj, hit.frame_path = self.crops.crops[paths[i].name], self.crops.images / frames[i]
                hits.append(hit)
            out.append(QueryResult(text, hits))
        return out


def route_queries(queries: Sequence[str], models: Collection[str], category: str | None = None) -> list[str]:
    """The category of each query: ``category`` for all of them when given, else the text rule; ValueError naming
    the first query whose category is not in ``models``."""
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    cats = [category or text_category(q) for q in queries]
    for i, (q, c) in enumerate(zip(queries, cats), start=1):
        if c not in models:
            why = "you asked for" if category else "by the text rule it is about"
            raise ValueError(f"query {i} ({q!r}): {why} {c}, but there is no {c} model: pass --finetune_{c}"
                             + ("" if category else " (or --category to choose the model yourself)"))
    return cats


@dataclass
class CategorySearcher:
    """One :class:`Searcher` per category: each query is answered by the model of its category (the text rule of
    :func:`traffic_retrieval.categories.text_category`), as stage 5 does, so a mixed camera folder is searched with
    the car and the people model in one run. Results keep the order of the queries."""

    searchers: dict[str, Searcher]

    @property
    def info(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c, s in self.searchers.items():
            out.update((f"{k} ({c} queries)" if k in ("checkpoint", "gallery") else k, v) for k, v in s.info.items())
        return out

    def search(self, queries: Sequence[str], k: int = 10, category: str | None = None) -> list[QueryResult]:
        """The top ``k`` per query from the model of its category (``category`` for every query when given, else
        the text rule); each result names the category that answered it."""
        cats = route_queries(queries, self.searchers, category)
        out: list[QueryResult | None] = [None] * len(queries)
        for c, searcher in self.searchers.items():
            idx = [i for i, x in enumerate(cats) if x == c]
            if idx:
                for i, r in zip(idx, searcher.search([queries[i] for i in idx], k)):
                    r.category = c
                    out[i] = r
        return out  # type: ignore[return-value]  # every query had a model


def default_cache_dir(images: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """``<output_dir>/cache`` when an output folder is given, else ``<images>/../.search_cache``."""
    if output_dir is not None:
        return Path(output_dir) / "cache"
    return Path(images).resolve().parent / ".search_cache"


def cache_file(cache_dir: str | os.PathLike, images: str | os.PathLike, spec: FeatureSpec) -> Path:
    """One cache file per folder and feature setting (every :class:`FeatureSpec` field but the checkpoint file's
    size and mtime), so that e.g. ``search.py`` (the checkpoint's validated padding) and ``extract_features.py`` (no
    padding) keep their own instead of replacing each other's; a retrained checkpoint at the same path overwrites
    its file."""
    setting = {k: v for k, v in asdict(spec).items() if k not in ("checkpoint_size", "checkpoint_mtime_ns")}
    return Path(cache_dir) / (folder_key("gallery", images, *(f"{k}={v}" for k, v in setting.items())) + ".pt")


def folder_images(images: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``images``; FileNotFoundError / ValueError for a missing / empty folder."""
    paths = list_images(images)
    if not paths:
        raise ValueError(f"no image file (.jpg, .png, ...) directly inside {images}")
    return paths


def encode_folder(model: torch.nn.Module, images: str | os.PathLike, spec: FeatureSpec, *,
                  cache_dir: str | os.PathLike | None = None, use_cache: bool = True, batch_size: int = 64,
                  device: torch.device | str = "cpu", num_workers: int = 0) -> ImageFeatures:
    """Features of every image directly inside ``images`` under ``spec``, through the folder's feature cache
    (:func:`cache_file` in ``cache_dir``, default :func:`default_cache_dir`): a repeated or interrupted run encodes
    only new, changed or not yet encoded images. Unreadable images are reported and returned in ``failed``.

    Raises:
        FileNotFoundError: the folder is missing. ValueError: it holds no image file.
    """
    paths = folder_images(images)
    cache = cache_file(cache_dir or default_cache_dir(images), images, spec) if use_cache else None
    return encode_gallery(model, paths, spec, cache, batch_size=batch_size, device=torch.device(device),
                          precision=spec.precision, num_workers=num_workers, desc=f"gallery {Path(images).name}")


def encode_crops(model: torch.nn.Module, crops: FrameCrops, categories: Sequence[str], spec: FeatureSpec, *,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True, batch_size: int = 64,
                 device: torch.device | str = "cpu", num_workers: int = 0) -> ImageFeatures:
    """Features of the detected objects of ``categories``, through a feature cache per category folder (as
    :func:`encode_folder`; ``cache_dir`` defaults to the folder above the crops)."""
    parts = []
    for c in categories:
        paths = sorted(crops.folder(c) / x.name for x in crops.of(c))
        if paths:
            cache = cache_file(cache_dir or crops.root.parent, crops.folder(c), spec) if use_cache else None
            parts.append(encode_gallery(model, paths, spec, cache, batch_size=batch_size, device=torch.device(device),
                                        precision=spec.precision, num_workers=num_workers, desc=f"{c} objects"))
    if not parts:
        dim = model.cfg.embed_dim if hasattr(model, "cfg") else 0
        return ImageFeatures([], torch.empty(0, dim))
    return ImageFeatures([p for part in parts for p in part.paths], torch.cat([part.features for part in parts]),
                         [f for part in parts for f in part.failed])


def build_searcher(images: str | os.PathLike, model_name: str, checkpoint: str | os.PathLike,
                   sentencepiece_model: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                   use_cache: bool = True, input_size: int | None = None, device: str = "auto",
                   precision: str | None = None, batch_size: int = 64, num_workers: int = 0,
                   pad: int | None = None, flag: str = "--finetune", crops: FrameCrops | None = None,
                   categories: Sequence[str] = CATEGORIES) -> Searcher:
    """Load the model and encode (or reuse the cached features of) every image directly inside ``images``, or,
    with ``crops`` (:func:`traffic_retrieval.crops.detect_crops` of that folder), its detected objects of
    ``categories``.

    ``pad`` (black pixels left and right before resizing) defaults to the padding the checkpoint was validated with;
    ``flag`` names the checkpoint in messages.

    Raises:
        FileNotFoundError: the folder, checkpoint or tokenizer is missing.
        ValueError: the folder has no image, or the checkpoint does not fit the model (the message names it).
    """
    if crops is None:
        folder_images(images)  # a missing or empty folder fails before the model is loaded
    dev = resolve_device(device)
    precision = precision or default_precision(dev)
    tokenizer = Tokenizer(sentencepiece_model)
    ckpt = resolve_checkpoint_path(checkpoint)
    what = f"{flag} {ckpt}"
    model, trained = load_model(model_name, ckpt, dev, input_size, tokenizer.vocab_size, what=what)
    spec = FeatureSpec.create(ckpt, model_name, model.cfg.img_size, precision, resolve_pad(pad, trained, what))
    opts = dict(cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size, device=dev, num_workers=num_workers)
    if crops is None:
        gallery = encode_folder(model, images, spec, **opts)
        described = f"{len(gallery.paths)} images"
    else:
        gallery = encode_crops(model, crops, categories, spec, **opts)
        n_frames = len({crops.crops[p.name].frame for p in gallery.paths})
        described = (f"{len(gallery.paths)} detected {' and '.join(categories)} objects in {n_frames} of "
                     f"{len(crops.frames)} frames")
    if gallery.failed:
        described += f" ({len(gallery.failed)} unreadable)"
    info = {"images": str(images), "model": model_name, "checkpoint": str(ckpt), "gallery": described}
    return Searcher(model, tokenizer, gallery, dev, precision, batch_size=4 * batch_size, info=info, crops=crops)


def build_category_searcher(images: str | os.PathLike, model_name: str,
                            checkpoints: Mapping[str, str | os.PathLike], sentencepiece_model: str | os.PathLike,
                            **kwargs) -> CategorySearcher:
    """A :class:`CategorySearcher` with one model per category in ``checkpoints`` (``{"car": path, ...}``); the
    other arguments are those of :func:`build_searcher`. Each model has its own feature cache and, unless ``pad``
    is given, the padding its checkpoint was validated with; with ``crops``, each searches the objects of its own
    category."""
    unknown = set(checkpoints) - set(CATEGORIES)
    if unknown or not checkpoints:
        raise ValueError(f"checkpoints per category: expected some of {', '.join(CATEGORIES)}, got "
                         f"{', '.join(sorted(checkpoints)) or 'none'}")
    return CategorySearcher({c: build_searcher(images, model_name, checkpoints[c], sentencepiece_model,
                                               flag=f"--finetune_{c}", categories=[c], **kwargs)
                             for c in CATEGORIES if c in checkpoints})


# ------------------------------------------------------------------------------------------------ ground truth
def read_queries(path: str | os.PathLike) -> list[str]:
    """One query per line (the test_text.txt rules: no blank line in the middle, no '$')."""
    queries = read_test_text(path)
    if not queries:
        raise ValueError(f"{path}: no query")
    return queries


def read_relevance(path: str | os.PathLike) -> dict[str, set[str]]:
    """Ground truth ``text$img1$img2...`` as ``{text: relevant names}`` (repeated texts: their union)."""
    out: dict[str, set[str]] = {}
    for text, names in read_ground_truth(path):
        out.setdefault(text, set()).update(names)
    return out


def mark_hits(results: Sequence[QueryResult], relevance: Mapping[str, set[str]]) -> None:
    """Set hit/miss and the APs of every result whose text is in ``relevance`` (in place)."""
    for r in results:
        rel = relevance.get(r.text)
        if rel is None:
            continue
        names = [h.name for h in r.hits]
        for h in r.hits:
            h.relevant = h.name in rel
        r.official_ap = official_ap(names, rel)
        r.ap_at_k = average_precision_at_k(names, rel, len(names))
        r.num_relevant = len(rel)


# ------------------------------------------------------------------------------------------------ output
def format_results(results: Sequence[QueryResult]) -> str:
    """A plain-text table per query: rank, score, hit/miss (with ground truth) and image name."""
    blocks = []
    for qi, r in enumerate(results, start=1):
        head = f"query {qi}/{len(results)}{f' ({r.category} model)' if r.category else ''}: {r.text}"
        if r.official_ap is not None:
            head += f"\n  official AP {r.official_ap:.4f}, AP@{len(r.hits)} {r.ap_at_k:.4f}, {r.num_relevant} relevant"
        lines = [head, f"  {'rank':>4}  {'score':>7}  {'mark':<4}  image"]
        for h in r.hits:
            mark = "-" if h.relevant is None else ("hit" if h.relevant else "miss")
            lines.append(f"  {h.rank:>4}  {h.score:>7.4f}  {mark:<4}  {h.name}{_where(h)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _where(hit: Hit) -> str:
    """Which object of the frame matched, when searching detected objects: ``  (car at x1,y1,x2,y2)``."""
    if hit.obj is None:
        return ""
    return f"  ({hit.obj.category} at {','.join(map(str, hit.obj.box))})"


def thumbnail_data_uri(path: Path, size: int = THUMB_SIZE, box: Sequence[int] | None = None) -> str | None:
    """A small JPEG of ``path`` as a ``data:`` URI, with ``box`` (x1, y1, x2, y2 in image pixels) drawn in red, or
    None if the image cannot be read any more."""
    try:
        im = load_rgb(path)
    except ImageReadError as e:
        log.warning("no thumbnail: %s", e)
        return None
    width = im.width
    im.thumbnail((size, size))
    if box is not None:
        f = im.width / width
        x1, y1, x2, y2 = (v * f for v in box)
        ImageDraw.Draw(im).rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=(255, 0, 0), width=2)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } .meta { color: #555; font-size: 0.9em; }
section { margin: 1.5em 0; } h2 { font-size: 1.05em; margin: 0.3em 0; } .ap { color: #555; font-weight: normal; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 140px; padding: 4px; border: 4px solid #ccc; border-radius: 6px; text-align: center; }
figure.hit { border-color: #2a9d3a; } figure.miss { border-color: #d33; }
figure img { max-width: 128px; max-height: 128px; display: block; margin: 0 auto; } img.frame { margin-top: 4px; }
figcaption { font-size: 0.75em; word-break: break-all; } .mark { font-weight: bold; }
.hit .mark { color: #2a9d3a; } .miss .mark { color: #d33; }
"""


def render_html(results: Sequence[QueryResult], title: str = "Text-to-image search",
                info: Mapping[str, str] | None = None, thumb_size: int = THUMB_SIZE) -> str:
    """The contact sheet as one self-contained HTML string (thumbnails embedded)."""
    e = html.escape
    thumbs: dict[Path, str | None] = {}
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>\n<h1>{e(title)}</h1>"]
    if info:
        parts.append('<p class="meta">' + "<br>".join(f"{e(k)}: {e(v)}" for k, v in info.items()) + "</p>")
    scored = [r.official_ap for r in results if r.official_ap is not None]
    if scored:
        parts.append(f'<p class="meta">mean official AP over {len(scored)} queries with ground truth: '
                     f"{sum(scored) / len(scored):.4f}</p>")
    for qi, r in enumerate(results, start=1):
        ap = (f' <span class="ap">official AP {r.official_ap:.4f} &middot; AP@{len(r.hits)} {r.ap_at_k:.4f} '
              f"&middot; {r.num_relevant} relevant</span>") if r.official_ap is not None else ""
        model = f' <span class="ap">({e(r.category)} model)</span>' if r.category else ""
        parts.append(f"<section><h2>{qi}. {e(r.text)}{model}{ap}</h2><div class=\"grid\">")
        for h in r.hits:
            if h.path not in thumbs:
                thumbs[h.path] = thumbnail_data_uri(h.path, thumb_size)
            cls = "" if h.relevant is None else (" hit" if h.relevant else " miss")
            word = "&#10003; hit" if h.relevant else "&#10007; miss"
            mark = "" if h.relevant is None else f' <span class="mark">{word}</span>'
            img = f'<img src="{thumbs[h.path]}" alt="{e(h.name)}">' if thumbs[h.path] else "<p>(unreadable)</p>"
            if h.obj is not None and h.frame_path is not None:  # the object in its frame
                framed = thumbnail_data_uri(h.frame_path, thumb_size, h.obj.box)
                img += f'<img class="frame" src="{framed}" alt="{e(h.name)}">' if framed else ""
            where = f"<br>{e(_where(h).strip())}" if h.obj is not None else ""
            parts.append(f'<figure class="result{cls}">{img}<figcaption>#{h.rank}{mark}<br>{e(h.name)}{where}<br>'
                         f"score {h.score:.4f}</figcaption></figure>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def results_json(results: Sequence[QueryResult], info: Mapping[str, str] | None = None) -> dict:
    """The results as plain JSON data: per query its text, the category whose model answered, the APs (with ground
    truth) and the hits (rank, name, path, score, relevant; with ``--detect`` also the object's box and detector
    score in its frame)."""
    rows = []
    for r in results:
        hits = []
        for h in r.hits:
            hit = {"rank": h.rank, "name": h.name, "path": str(h.frame_path or h.path), "score": h.score,
                   "relevant": h.relevant}
            if h.obj is not None:
                hit["object"] = {"category": h.obj.category, "box": list(h.obj.box), "score": h.obj.score}
            hits.append(hit)
        rows.append({"text": r.text, "category": r.category, "official_ap": r.official_ap, "ap_at_k": r.ap_at_k,
                     "num_relevant": r.num_relevant, "hits": hits})
    return {"info": dict(info or {}), "results": rows}


def write_json_results(path: str | os.PathLike, results: Sequence[QueryResult],
                       info: Mapping[str, str] | None = None) -> None:
    """Write :func:`results_json` atomically."""
    write_json(path, results_json(results, info), indent=1)
    log.info("wrote results %s", path)


def write_html(path: str | os.PathLike, results: Sequence[QueryResult], title: str = "Text-to-image search",
               info: Mapping[str, str] | None = None, thumb_size: int = THUMB_SIZE) -> None:
    """Write :func:`render_html` atomically."""
    write_text(path, render_html(results, title, info, thumb_size))
    log.info("wrote contact sheet %s", path)
