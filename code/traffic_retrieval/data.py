"""Data of the fine-tuning stage: the per-category jsonl index, datasets, collate and samplers.

Reads ``<data_path>/flickr30k_<category>.<split>.jsonl`` (written by ``code/data2flickr30k.py``; format in
:mod:`traffic_retrieval.indexing`): one row per caption, ``{"image_path": path relative to data_path,
"text_segment": [XLM-R ids without bos/eos], "image_id": 0-based image index in the file, "attribute": str,
"text": str}``.

- Training (:class:`PairDataset`): one item per caption row, image through the train transform. The data order of an
  epoch is a function of (seed, epoch) only (:func:`train_sampler`, a ``DistributedSampler`` with ``drop_last`` so
  every rank runs the same number of steps), which makes a resumed run see the same batches as an uninterrupted one.
- Validation (:class:`EvalSplit`): queries = every caption row, gallery = the unique images of the split, in
  ``image_id`` order. Each rank encodes a contiguous shard (:func:`shard`), so gathering the shards in rank order
  restores the full order with no padding duplicates.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .images import load_rgb
from .indexing import jsonl_index_path
from .tokenizer import batch_inputs

log = logging.getLogger(__name__)

DEDUP_MODES = ("relevance", "attribute", "caption", "none")
_MAX_LISTED = 10  # problems spelled out in one error message


class DataError(ValueError):
    """An index file that cannot be trained on; the message names file, line and problem."""


@dataclass(frozen=True)
class IndexRow:
    """One caption row of a jsonl index."""

    image_path: str  # relative to data_path
    text_segment: tuple[int, ...]  # XLM-R ids without bos/eos
    image_id: int  # 0-based index of the image within its file
    attribute: str  # the label's attribute field (vehicle text or 21-bit pedestrian code)
    text: str  # the raw caption


def index_file(data_path: str | os.PathLike, category: str, split: str) -> Path:
    """``<data_path>/flickr30k_<category>.<split>.jsonl``."""
    return jsonl_index_path(data_path, split, category)


def _parse_row(obj: Any) -> IndexRow | str:
    """An :class:`IndexRow`, or the reason the decoded JSON value is not one."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("image_path", "text_segment", "image_id", "attribute", "text") if k not in obj]
    if missing:
        return f"missing key(s) {', '.join(missing)} (rebuild the index with code/data2flickr30k.py)"
    path, seg, image_id = obj["image_path"], obj["text_segment"], obj["image_id"]
    if not isinstance(path, str) or not path:
        return "image_path must be a non-empty string"
    if not isinstance(seg, list) or not seg or not all(isinstance(t, int) and t >= 0 for t in seg):
        return "text_segment must be a non-empty list of non-negative token ids"
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
        return "image_id must be a non-negative integer"
    if not isinstance(obj["attribute"], str) or not isinstance(obj["text"], str):
        return "attribute and text must be strings"
    return IndexRow(path, tuple(seg), image_id, obj["attribute"], obj["text"])


def read_index(path: str | os.PathLike) -> list[IndexRow]:
    """Read and check a jsonl index.

    Raises:
        FileNotFoundError: the file is missing (with a hint to build it).
        DataError: a bad line (``file:line: problem``), an image id that changes its image path, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path} (build it with code/data2flickr30k.py "
                                "--data_path <folder with fliter_*_labels.txt>)")
    rows: list[IndexRow] = []
    problems: list[str] = []
    paths_of_id: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                parsed = _parse_row(json.loads(line))
            except json.JSONDecodeError as e:
                parsed = f"not valid JSON ({e.msg})"
            if isinstance(parsed, str):
                problems.append(f"{path}:{line_no}: {parsed}")
                continue
            known = paths_of_id.setdefault(parsed.image_id, parsed.image_path)
            if known != parsed.image_path:
                problems.append(f"{path}:{line_no}: image_id {parsed.image_id} is {known} on an earlier line "
                                f"but {parsed.image_path} here")
                continue
            rows.append(parsed)
    if problems:
        shown = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                          if len(problems) > _MAX_LISTED else [])
        raise DataError(f"{len(problems)} bad line(s) in {path}:\n  " + "\n  ".join(shown))
    if not rows:
        raise DataError(f"{path}: empty split (no caption rows); check the cleaning stage's output for this "
                        "category and split")
    return rows


def check_token_ids(rows: Sequence[IndexRow], vocab_size: int, path: str | os.PathLike) -> None:
    """Raise :class:`DataError` if a token id does not fit a text embedding of ``vocab_size`` rows."""
    for i, row in enumerate(rows, start=1):
        top = max(row.text_segment)
        if top >= vocab_size:
            raise DataError(
                f"{path}: row {i} has token id {top} but the model's text embedding has {vocab_size} rows; the index "
                "was built with another tokenizer (rebuild it with the --sentencepiece_model you train with)"
            )


def group_key(row: IndexRow, dedup: str) -> str:
    """The string whose equality marks two captions as the same for the loss (``dedup`` mode), or a unique key.
    ``relevance`` also groups by attribute; the loss adds the pedestrian inclusion rule from the attribute codes."""
    if dedup in ("attribute", "relevance"):
        return "attr:" + row.attribute
    if dedup == "caption":
        return "text:" + row.text
    if dedup == "none":
        return f"row:{row.image_id}:{row.text}"  # only used for logging; the loss gets no group ids
    raise ValueError(f"unknown dedup mode {dedup!r}; choose one of {DEDUP_MODES}")


class PairDataset(Dataset):
    """One (image, caption) pair per index row, for training."""

    def __init__(self, rows: Sequence[IndexRow], root: str | os.PathLike, transform: Callable, dedup: str = "relevance"):
        if dedup not in DEDUP_MODES:
            raise ValueError(f"unknown dedup mode {dedup!r}; choose one of {DEDUP_MODES}")
        self.rows, self.root, self.transform, self.dedup = list(rows), Path(root), transform, dedup

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        # A missing or broken image raises ImageReadError naming the file: the index was checked when it was built,
        # so this is a changed dataset and training on should not silently drop it.
        image = self.transform(load_rgb(self.root / row.image_path))
        return {"image": image, "text_segment": row.text_segment, "group_key": group_key(row, self.dedup),
                "attribute": row.attribute, "index": i}


def trim_padding(tokens: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the columns that are padding in every row (text features do not depend on padding: pads are masked)."""
    longest = int((padding_mask == 0).sum(1).max()) if len(tokens) else 0
    return tokens[:, :longest], padding_mask[:, :longest]


def collate_pairs(batch: Sequence[dict[str, Any]], max_len: int) -> dict[str, Any]:
    """Stack a list of :class:`PairDataset` items: images [B,3,H,W], tokens / padding_mask [B, L<=max_len]."""
    tokens, mask = batch_inputs([b["text_segment"] for b in batch], max_len)
    tokens, mask = trim_padding(tokens, mask)
    return {
        "images": torch.stack([b["image"] for b in batch]),
        "tokens": tokens,
        "padding_mask": mask,
        "group_keys": [b["group_key"] for b in batch],
        "attributes": [b["attribute"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
    }


def train_sampler(dataset: Dataset, world_size: int, rank: int, seed: int) -> DistributedSampler:
    """Shuffled sampler whose order depends only on (seed, epoch) (call ``set_epoch``); every rank gets the same
    number of items (``drop_last``), also in a single process."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)


def train_loader(dataset: PairDataset, sampler: DistributedSampler, batch_size: int, max_len: int,
                 num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Training loader; workers are re-created each epoch (not persistent) so that they are seeded from the
    per-epoch RNG state, which keeps augmentations reproducible across an interruption."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      collate_fn=partial(collate_pairs, max_len=max_len), pin_memory=pin_memory,
                      persistent_workers=False)


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int, update_freq: int) -> int:
    """Optimizer steps per epoch, as the official ``len(train) // (batch * update_freq * world)``."""
    return num_pairs // (batch_size * update_freq * world_size)


# ---------------------------------------------------------------------------------------------------- validation
@dataclass
class EvalSplit:
    """A validation split as queries (every caption) against a gallery (every unique image)."""

    image_paths: list[str]  # gallery, in image_id order (relative to data_path)
    image_attributes: list[str]  # attribute of each gallery image
    query_segments: list[tuple[int, ...]]  # one per caption row, file order
    query_attributes: list[str]
    query_image: list[int]  # gallery index of each query's own image

    @classmethod
    def from_rows(cls, rows: Sequence[IndexRow]) -> "EvalSplit":
        by_id: dict[int, IndexRow] = {}
        for r in rows:
            by_id.setdefault(r.image_id, r)
        ids = sorted(by_id)
        position = {image_id: i for i, image_id in enumerate(ids)}
        return cls(
            image_paths=[by_id[i].image_path for i in ids],
            image_attributes=[by_id[i].attribute for i in ids],
            query_segments=[r.text_segment for r in rows],
            query_attributes=[r.attribute for r in rows],
            query_image=[position[r.image_id] for r in rows],
        )

    def relevance(self, rule: Callable[[str, str], bool]) -> tuple[Callable, torch.Tensor]:
        """``(relevant(rows, cols) -> bool [q, n], num_relevant [Q])`` under ``rule(query_attr, image_attr)``.

        The rule is evaluated once per pair of distinct attribute strings (a few hundred), not per query x image.
        """
        q_names, q_ids = _codes(self.query_attributes)
        g_names, g_ids = _codes(self.image_attributes)
        table = torch.tensor([[rule(q, g) for g in g_names] for q in q_names], dtype=torch.bool)  # [Uq, Ug]
        g_count = torch.bincount(g_ids, minlength=len(g_names))  # images per gallery attribute
        num_relevant = (table.long() @ g_count)[q_ids]  # [Q]

        def relevant(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return table[q_ids[rows][:, None], g_ids[cols]]

        return relevant, num_relevant


def _codes(values: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    names: dict[str, int] = {}
    ids = [names.setdefault(v, len(names)) for v in values]
    return list(names), torch.tensor(ids, dtype=torch.long)


class ImageDataset(Dataset):
    """Images by path (the validation gallery), through the eval transform."""

    def __init__(self, paths: Sequence[str], root: str | os.PathLike, transform: Callable) -> None:
        self.paths, self.root, self.transform = list(paths), Path(root), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.root / self.paths[i]))
