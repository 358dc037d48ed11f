"""Encoding image galleries and text queries into L2-normalised features, in batches, with a progress bar.

Unreadable images do not stop the run: they are skipped and returned by name with the reason, so every stage can
report them. Features come back as float32 on the CPU, in input order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .images import IMAGE_EXTENSIONS, load_rgb
from .precision import get_autocast
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_rgb(self.paths[i])), None
        except Exception as e:  # a bad file must not end the run; the caller reports it by name
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    ok = [(i, x) for i, x, err in batch if err is None]
    bad = [(i, err) for i, _, err in batch if err is not None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    images = torch.stack([x for _, x in ok]) if ok else None
    return idx, images, bad


@dataclass
class ImageFeatures:
    paths: list[Path]  # the images that were encoded, in input order
    features: torch.Tensor  # [N, D] float32
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) of skipped images


@torch.no_grad()
def encode_images(model: torch.nn.Module, paths: Sequence[Path], transform: Callable, *, batch_size: int = 64,
                  device: torch.device | str = "cpu", precision: str = "fp32", num_workers: int = 0,
                  desc: str = "images", on_batch: Callable[[ImageFeatures], None] | None = None) -> ImageFeatures:
    """Encode images with ``model.encode_image``; unreadable ones are skipped and listed in ``failed``.

    ``on_batch`` receives each batch's result as soon as it is encoded (the gallery cache saves progress with it).
    """
    device = torch.device(device)
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    model.eval()
    feats: list[torch.Tensor] = []
    kept: list[int] = []
    failed: list[tuple[Path, str]] = []
    for idx, images, bad in tqdm(loader, desc=f"encode {desc}", unit="batch", leave=False):
        batch_failed = [(Path(paths[i]), err) for i, err in bad]
        failed += batch_failed
        new = torch.empty(0, 0)
        if images is not None:
            with get_autocast(precision, device):
                new = model.encode_image(images.to(device, non_blocking=True)).float().cpu()
            feats.append(new)
            kept += idx.tolist()
        if on_batch is not None:
            on_batch(ImageFeatures([Path(paths[i]) for i in idx.tolist()], new, batch_failed))
    for p, err in failed:
        log.warning("skipped unreadable image %s (%s)", p, err)
    dim = model.cfg.embed_dim if hasattr(model, "cfg") else 0
    return ImageFeatures([Path(paths[i]) for i in kept], torch.cat(feats) if feats else torch.empty(0, dim), failed)


@torch.no_grad()
def encode_token_batches(model: torch.nn.Module, tokens: torch.Tensor, padding_mask: torch.Tensor, *,
                         batch_size: int = 256, device: torch.device | str = "cpu", precision: str = "fp32",
                         desc: str | None = None) -> torch.Tensor:
    """Encode tokenized texts [N, L] in batches of similar length, each trimmed to its longest text.

    Text features do not depend on padding (padded keys are masked; a test checks it), so sorting by length and
    cutting the common padding gives the same features for a fraction of the FLOPs: traffic queries range from
    about 8 tokens ("A black BESTUNE Sedan.") to 60 (pedestrian descriptions). Returns [N, D] float32 on ``device``.
    """
    device = torch.device(device)
    model.eval()
    lengths = (padding_mask == 0).sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    dim = model.cfg.embed_dim if hasattr(model, "cfg") else 0
    out = torch.empty(len(tokens), dim, device=device)
    starts = range(0, len(tokens), batch_size)
    for start in tqdm(starts, desc=f"encode {desc}", unit="batch", leave=False) if desc else starts:
        idx = order[start : start + batch_size]
        n = int(lengths[idx[0]])  # the longest text of this batch (sorted descending)
        t = tokens[idx, :n].to(device, non_blocking=True)
        m = padding_mask[idx, :n].to(device, non_blocking=True)
        with get_autocast(precision, device):
            out[idx.to(device)] = model.encode_text(t, m).float()
    return out


def encode_texts(model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                 device: torch.device | str = "cpu", precision: str = "fp32", desc: str = "texts") -> torch.Tensor:
    """Tokenize and encode texts with ``model.encode_text``; returns [len(texts), D] float32 on the CPU."""
    tokens, mask = tokenizer(list(texts))
    return encode_token_batches(model, tokens, mask, batch_size=batch_size, device=device, precision=precision,
                                desc=desc).cpu()
