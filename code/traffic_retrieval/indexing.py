"""Index files for training and inference: Karpathy-style json and BEiT-3 jsonl (``code/data2flickr30k.py``,
``code/jsonl_test.py``).

Training/validation (per category and split), from the cleaned labels ``<data_path>/fliter_{split}_labels.txt``
(``name$attribute$caption`` with category-coded names ``car_xxx.jpg`` / ``people_000123.jpg`` that exist in
``<data_path>/{split}_images/``), written into ``data_path``:

- ``{split}_{category}.json``: Karpathy/Flickr30k style ``{"images": [{"filename", "filepath": "<split>_images",
  "imgid", "split", "sentids", "sentences": [{"raw", "tokens", "imgid", "sentid"}], "attribute"}], "dataset":
  "traffic"}``;
- ``flickr30k_{category}.{split}.jsonl``: the official BEiT-3 index, one row per caption, captions of an image
  consecutive: ``{"image_path": "<split>_images/<coded name>", "text_segment": [XLM-R ids without bos/eos],
  "image_id": 0-based index of the image in this file, "attribute": str, "text": str}``. The two extra keys feed the
  duplicate-aware loss and attribute relevance at validation; official readers ignore them.

Test (all images, all queries), from ``<data_path>/test_text.txt`` (or another query file in ``data_path``) and
``<data_path>/test_images/``:

- ``test.txt``: the queries grouped by category, ``car`` first, then ``people``, stable within a group (the input
  is never assumed to be grouped already); ``test_order.json`` maps each line back to the query file it names:
  ``{"text_file": "test_text.txt", "original_index": [...], "category": [...]}``;
- ``test.json``: ``{"images": [{"filename", "filepath": "test_images", "imgid", "split": "test", "category",
  "sentids": [], "sentences": []}], "queries": [{"sentid", "raw", "tokens", "category", "original_index"}],
  "dataset": "traffic"}``;
- ``flickr30k.test.jsonl``: one row per usable test image, sorted by name: ``{"image_path": "test_images/<name>",
  "text_segment": [], "image_id": i, "category": "car" | "people" | null}``;
- ``flickr30k.test_queries.jsonl``: one row per line of ``test.txt``: ``{"text", "text_segment", "category",
  "original_index"}``.

A query's category comes from :func:`traffic_retrieval.categories.text_category`. An image's category is only
known when the detection stage's ``name$category`` file is given (real test names need not reveal it), else null.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tqdm import tqdm

from .categories import CATEGORIES, attribute_category, split_coded_name, text_category
from .fileio import write_json, write_jsonl, write_text
from .images import check_image
from .labels import (
    SEP,
    LabelFormatError,
    LabelRecord,
    LineProblem,
    format_problems,
    read_label_file,
    read_test_text,
    text_lines,
)
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DATASET_NAME = "traffic"
TEST_IMAGE_DIR = "test_images"
DEFAULT_TEXT_FILE = "test_text.txt"  # the challenge's query file


class IndexBuildError(ValueError):
    """Input that cannot be indexed (missing image, empty category, ...); the message names file and line."""


def cleaned_label_path(data_path: str | os.PathLike, split: str) -> Path:
    """``<data_path>/fliter_<split>_labels.txt`` (the spelling of the original pipeline)."""
    return Path(data_path) / f"fliter_{split}_labels.txt"


def json_index_path(data_path: str | os.PathLike, split: str, category: str) -> Path:
    return Path(data_path) / f"{split}_{category}.json"


def jsonl_index_path(data_path: str | os.PathLike, split: str, category: str) -> Path:
    return Path(data_path) / f"flickr30k_{category}.{split}.jsonl"


def simple_tokens(text: str) -> list[str]:
    """Karpathy-style word tokens: lower case, split on spaces, commas and full stops (as the 4th place did)."""
    return [t for t in re.split(r"[ ,.]+", text.lower()) if t]


@dataclass
class ImageEntry:
    """One image of an index with its captions in file order."""

    filename: str
    attribute: str
    captions: list[str] = field(default_factory=list)


def group_by_image(records: Iterable[LabelRecord]) -> list[ImageEntry]:
    """Group label records by image name, keeping the order of first appearance (captions stay in file order)."""
    entries: dict[str, ImageEntry] = {}
    for r in records:
        entry = entries.setdefault(r.name, ImageEntry(r.name, r.attribute))
        entry.captions.append(r.caption)
    return list(entries.values())


def karpathy_json(entries: Sequence[ImageEntry], split: str, filepath: str) -> dict[str, Any]:
    """A Karpathy/Flickr30k-style dataset json for ``entries`` (image ids and sentence ids 0-based, in order)."""
    images = []
    sentid = 0
    for imgid, e in enumerate(entries):
        sentences = []
        for raw in e.captions:
            sentences.append({"raw": raw, "tokens": simple_tokens(raw), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({
            "filename": e.filename, "filepath": filepath, "imgid": imgid, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences, "attribute": e.attribute,
        })
    return {"images": images, "dataset": DATASET_NAME}


def jsonl_rows(karpathy: Mapping[str, Any], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """BEiT-3 index rows from a Karpathy json: one per caption; ``image_id`` counts images in order from 0."""
    rows = []
    for image_id, img in enumerate(karpathy["images"]):
        for s in img["sentences"]:
            rows.append({
                "image_path": f"{img['filepath']}/{img['filename']}",
                "text_segment": tokenizer.encode(s["raw"]),
                "image_id": image_id,
                "attribute": img.get("attribute", ""),
                "text": s["raw"],
            })
    return rows


# ------------------------------------------------------------------------------------------------ train / val
def read_cleaned_labels(
    data_path: str | os.PathLike, split: str, check_images: bool = False, tokenizer: Tokenizer | None = None
) -> dict[str, list[LabelRecord]]:
    """Read ``fliter_<split>_labels.txt`` and split it by the category coded in each name.

    With ``tokenizer``, a caption that encodes to no token at all (only characters sentencepiece normalises away,
    such as U+200B) is a problem too: training cannot use an empty text.

    Raises:
        FileNotFoundError: the label file or the ``<split>_images`` folder is missing.
        IndexBuildError: bad lines, names without a category code, captions without tokens, or image files that are
            missing (or unreadable, with ``check_images``); the message lists them as ``file:line: problem``.
    """
    path = cleaned_label_path(data_path, split)
    records, problems = read_label_file(path)
    image_dir = Path(data_path) / f"{split}_images"
    if records and not image_dir.is_dir():  # else every line would be reported as a missing image
        raise FileNotFoundError(f"image folder not found: {image_dir} (the images of {path})")
    by_category: dict[str, list[LabelRecord]] = {c: [] for c in CATEGORIES}
    mismatched = 0
    items = tqdm(records, desc=f"check {split} images", unit="img", disable=not check_images or len(records) < 500)
    for r in items:
        try:
            category, _ = split_coded_name(r.name)
        except ValueError as e:
            problems.append(LineProblem(str(path), r.line_no, str(e), r.to_line()))
            continue
        if tokenizer is not None and not tokenizer.encode(r.caption):
            problems.append(LineProblem(str(path), r.line_no, "caption has no tokens", r.to_line()))
            continue
        image = image_dir / r.name
        reason = check_image(image) if check_images else (None if image.exists() else "missing")
        if reason is not None:
            problems.append(LineProblem(str(path), r.line_no, f"image {image} is {reason}", r.to_line()))
            continue
        if attribute_category(r.attribute) not in (category, None):
            mismatched += 1  # the detection stage decided from the picture; its category wins
        by_category[category].append(r)
    if problems:
        problems.sort(key=lambda p: p.line_no)
        raise IndexBuildError(f"{len(problems)} problem(s) in {path}:\n{format_problems(problems)}")
    if mismatched:
        log.warning("%s: %d image(s) are coded with another category than their attribute suggests; "
                    "the coded category is used", path, mismatched)
    return by_category


def build_flickr30k_indexes(
    data_path: str | os.PathLike,
    tokenizer: Tokenizer,
    categories: Sequence[str] = CATEGORIES,
    splits: Sequence[str] = ("train", "val"),
    check_images: bool = False,
) -> dict[str, dict[str, dict[str, int]]]:
    """Write ``{split}_{category}.json`` and ``flickr30k_{category}.{split}.jsonl`` for every pair.

    Everything is read and checked before anything is written, so a bad input leaves no partial index behind.

    Returns:
        ``{split: {category: {"images": n, "captions": n}}}``.

    Raises:
        FileNotFoundError, IndexBuildError: see :func:`read_cleaned_labels`; also when a requested category has no
            image in a split.
    """
    for c in categories:
        if c not in CATEGORIES:
            raise IndexBuildError(f"unknown category {c!r}; expected some of {CATEGORIES}")
    data = {split: read_cleaned_labels(data_path, split, check_images, tokenizer) for split in splits}
    empty = [(split, c) for split in splits for c in categories if not data[split][c]]
    if empty:
        present = [c for c in CATEGORIES if all(data[split][c] for split in splits)]
        what = ", ".join(f"no '{c}' image in {cleaned_label_path(data_path, split)}" for split, c in empty)
        hint = (f"; categories present in every split: {present}" if present
                else "; no category has images in every split")
        raise IndexBuildError(
            f"empty category/split: {what}{hint}. Pass --categories with only the categories you have."
        )
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for split in splits:
        summary[split] = {}
        for c in categories:
            entries = group_by_image(data[split][c])
            kj = karpathy_json(entries, split, f"{split}_images")
            rows = jsonl_rows(kj, tokenizer)
            write_json(json_index_path(data_path, split, c), kj)
            write_jsonl(jsonl_index_path(data_path, split, c), rows)
            summary[split][c] = {"images": len(entries), "captions": len(rows)}
            log.info("%s/%s: %d images, %d captions -> %s", split, c, len(entries), len(rows),
                     jsonl_index_path(data_path, split, c))
    return summary


# ------------------------------------------------------------------------------------------------ test
def group_queries(queries: Sequence[str]) -> tuple[list[int], list[str]]:
    """Order that puts ``car`` queries first, then ``people``, stable within a group; and each query's category.

    Returns:
        ``(original_index, category)`` for the lines of the grouped file: line k of ``test.txt`` is
        ``queries[original_index[k]]`` and has category ``category[k]``.
    """
    cats = [text_category(q) for q in queries]
    order = sorted(range(len(queries)), key=lambda i: CATEGORIES.index(cats[i]))  # sorted() is stable
    return order, [cats[i] for i in order]


def list_test_images(image_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """Usable image file names in ``image_dir`` (sorted) and the excluded ones with their reason.

    Every regular, non-hidden file is decoded with :func:`check_image`; unreadable or unsupported files are
    excluded. Sub-directories and hidden files (``.DS_Store``) are ignored.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"test image directory not found: {image_dir}")
    names = sorted(p.name for p in image_dir.iterdir() if not p.name.startswith(".") and not p.is_dir())
    good, bad = [], []
    for name in tqdm(names, desc="check test images", unit="img", disable=len(names) < 500):
        reason = check_image(image_dir / name)
        if reason is None:
            good.append(name)
        else:
            bad.append((name, reason))
    return good, bad


def read_image_categories(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``name$category`` file (e.g. from the detection stage).

    Raises:
        FileNotFoundError: the file is missing.
        LabelFormatError: a line without exactly two fields, an unknown category or a repeated name (file:line).
    """
    p = Path(path)
    out: dict[str, str] = {}
    problems: list[LineProblem] = []
    for i, text in text_lines(p, "image category file", problems):
        fields = text.split(SEP)
        if len(fields) != 2 or not fields[0]:
            problems.append(LineProblem(str(p), i, "expected 'name$category'", text))
        elif fields[1] not in CATEGORIES:
            problems.append(LineProblem(str(p), i, f"unknown category {fields[1]!r} (expected one of {CATEGORIES})",
                                        text))
        elif fields[0] in out:
            problems.append(LineProblem(str(p), i, f"duplicate image name {fields[0]!r}", text))
        else:
            out[fields[0]] = fields[1]
    if problems:
        raise LabelFormatError(f"{len(problems)} bad line(s) in {p}:\n{format_problems(problems)}")
    return out


def build_test_index(
    data_path: str | os.PathLike,
    tokenizer: Tokenizer,
    image_categories: Mapping[str, str] | None = None,
    text_file: str = DEFAULT_TEXT_FILE,
    images: tuple[list[str], list[tuple[str, str]]] | None = None,
) -> dict[str, Any]:
    """Write the test index files (see the module docstring) into ``data_path``. ``images``: the
    :func:`list_test_images` of ``test_images/`` when the caller already has it (checking decodes every image).

    Returns:
        A summary: numbers of queries and images per category (``None`` for unknown) and the excluded images.

    Raises:
        FileNotFoundError: the query file (``text_file``) or ``test_images/`` is missing.
        LabelFormatError: a bad query line (file:line).
        IndexBuildError: no query, or no usable test image.
    """
    data_path = Path(data_path)
    text_path = data_path / text_file
    queries = read_test_text(text_path)
    if not queries:
        raise IndexBuildError(f"{text_path} has no query")
    good, bad = images if images is not None else list_test_images(data_path / TEST_IMAGE_DIR)
    if bad:
        log.warning("excluded %d unusable test image(s) from the gallery:\n%s", len(bad),
                    format_problems([f"{data_path / TEST_IMAGE_DIR / n}: {why}" for n, why in bad], limit=50))
    if not good:
        raise IndexBuildError(f"no usable image in {data_path / TEST_IMAGE_DIR}"
                          + (f" ({len(bad)} unusable file(s))" if bad else ""))
    cats_of_images: dict[str, str | None] = {n: None for n in good}
    if image_categories is not None:
        unknown = [n for n in image_categories if n not in cats_of_images]
        if unknown:
            log.warning("%d name(s) in the image category file are not usable test images (first: %s)",
                        len(unknown), unknown[0])
        for n in good:
            cats_of_images[n] = image_categories.get(n)
        missing = sum(c is None for c in cats_of_images.values())
        if missing:
            log.warning("%d test image(s) have no category in the image category file", missing)

    order, qcats = group_queries(queries)
    grouped = [queries[i] for i in order]
    segments = [tokenizer.encode(q) for q in grouped]
    write_text(data_path / "test.txt", "".join(q + "\n" for q in grouped))
    write_json(data_path / "test_order.json", {"text_file": text_file, "original_index": order, "category": qcats})
    images_json = [{"filename": n, "filepath": TEST_IMAGE_DIR, "imgid": i, "split": "test",
                    "category": cats_of_images[n], "sentids": [], "sentences": []} for i, n in enumerate(good)]
    queries_json = [{"sentid": k, "raw": q, "tokens": simple_tokens(q), "category": c, "original_index": o}
                    for k, (q, c, o) in enumerate(zip(grouped, qcats, order))]
    write_json(data_path / "test.json", {"images": images_json, "queries": queries_json, "dataset": DATASET_NAME})
    write_jsonl(data_path / "flickr30k.test.jsonl",
                ({"image_path": f"{TEST_IMAGE_DIR}/{n}", "text_segment": [], "image_id": i,
                  "category": cats_of_images[n]} for i, n in enumerate(good)))
    write_jsonl(data_path / "flickr30k.test_queries.jsonl",
                ({"text": q, "text_segment": seg, "category": c, "original_index": o}
                 for q, seg, c, o in zip(grouped, segments, qcats, order)))

    def count(values: Iterable[str | None]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            key = "unknown" if v is None else v
            out[key] = out.get(key, 0) + 1
        return out

    summary = {"queries": count(qcats), "images": count(cats_of_images.values()), "excluded": bad}
    log.info("test index: %d queries %s, %d images %s, %d excluded", len(queries), summary["queries"], len(good),
             summary["images"], len(bad))
    return summary
