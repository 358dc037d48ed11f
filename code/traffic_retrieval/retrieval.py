"""Top-k retrieval over embedding galleries: an exact chunked search in torch and an optional FAISS index.

:func:`topk_similarity` never builds the full query x gallery score matrix: it scores one
``[query_chunk, gallery_chunk]`` block at a time (in float32, on any device) and merges it into a running top-k.
The ranking is fully deterministic: higher score first, equal scores by lower gallery index, so a CPU run, a GPU run
and any chunk sizes give the same indices for the same scores.

Category restriction is data, not code: ``allowed`` masks gallery items for every query, and
``query_groups``/``gallery_groups`` (any integer ids, ``-1`` = unknown, allowed everywhere) rank each query only among
the images of its group. Excluded images are not dropped: they score ``-inf`` and fill the tail of a query's list in
gallery order, so every query always gets exactly ``k`` results even when its group has fewer than ``k`` images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .fileio import atomic_open

log = logging.getLogger(__name__)

UNKNOWN_GROUP = -1


def _ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row of ``scores`` [q, g], ordered by (score desc, column asc); returns (values, columns).

    ``torch.topk`` picks arbitrarily among equal values, so rows where ties may matter are fixed up: rows whose
    k-th value also occurs outside the selection are re-ranked with a stable full sort (rare with real features,
    common only for rows with many ``-inf`` masked entries), and ties inside a selection are reordered by column.
    """
    n = scores.shape[1]
    # One extra candidate shows whether a tie straddles the cut: the (k+1)-th value equals the k-th. This is
    # cheaper than counting the values >= the k-th over the whole row (one fewer pass over the block).
    vals, cols = scores.topk(min(k + 1, n), dim=1)  # [q, k(+1)]
    if n > k:
        ambiguous = vals[:, k - 1] == vals[:, k]  # [q]
        vals, cols = vals[:, :k], cols[:, :k]
    else:
        ambiguous = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    # Within the selection, sort by column then stable-sort by value: equal values end up in column order.
    cols, order = cols.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    cols = cols.gather(1, order)
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        v, c = scores[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], cols[rows] = v[:, :k], c[:, :k]
    return vals, cols


def _check_features(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, D], got {type(x).__name__} "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def topk_similarity(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    query_chunk: int = 1024,
    gallery_chunk: int = 65536,
    device: str | torch.device | None = None,
    allowed: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` gallery items per query by dot product (cosine for L2-normalised features).

    Args:
        queries: [Q, D] float features (fp32/bf16/fp16; scores are computed in fp32).
        gallery: [G, D] float features.
        k: results per query, ``1 <= k <= G``.
        query_chunk, gallery_chunk: block sizes; peak extra memory is about ``query_chunk * gallery_chunk`` floats.
        device: where to compute (e.g. ``"cuda"``); default: the device of ``queries``.
        allowed: optional BoolTensor [G]; ``False`` excludes an image for every query.
        query_groups, gallery_groups: optional LongTensors [Q] and [G] (given together); a query is ranked only
            among images of its own group; ``-1`` on either side means unknown, compatible with every group.
        progress: show a tqdm bar over gallery chunks.

    Returns:
        ``(scores [Q, k] float32, indices [Q, k] int64)`` on the compute device, best first; excluded images
        (masks) have score ``-inf`` and come after every allowed one, in gallery order.
    """
    _check_features("queries", queries)
    _check_features("gallery", gallery)
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"feature sizes differ: queries have D={queries.shape[1]}, gallery has D={gallery.shape[1]}")
    if n_g == 0:
        raise ValueError("the gallery is empty")
    if not 1 <= k <= n_g:
        raise ValueError(f"k={k} results per query requested but the gallery has only {n_g} items (need 1 <= k <= G)")
    if query_chunk < 1 or gallery_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got query_chunk={query_chunk}, gallery_chunk={gallery_chunk}")
    if (query_groups is None) != (gallery_groups is None):
        raise ValueError("query_groups and gallery_groups must be given together")
    dev = torch.device(device) if device is not None else queries.device
    if allowed is not None:
        if allowed.shape != (n_g,) or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a BoolTensor [{n_g}], got {allowed.dtype} {tuple(allowed.shape)}")
        allowed = allowed.to(dev)
    if query_groups is not None:
        if query_groups.shape != (n_q,) or gallery_groups.shape != (n_g,):
            raise ValueError(f"query_groups must be [{n_q}] and gallery_groups [{n_g}], got "
                             f"{tuple(query_groups.shape)} and {tuple(gallery_groups.shape)}")
        query_groups, gallery_groups = query_groups.to(dev).long(), gallery_groups.to(dev).long()

    best_v = torch.full((n_q, 0), float("-inf"), device=dev)  # running top-k, (score desc, index asc) per row
    best_i = torch.zeros((n_q, 0), dtype=torch.long, device=dev)
    starts = range(0, n_g, gallery_chunk)
    for g0 in tqdm(starts, desc="top-k", unit="chunk", disable=not progress):
        g = gallery[g0 : g0 + gallery_chunk].to(dev, torch.float32)  # [g, D]
        g_mask = allowed[g0 : g0 + gallery_chunk] if allowed is not None else None
        gg = gallery_groups[g0 : g0 + gallery_chunk] if gallery_groups is not None else None
        new_v, new_i = [], []
        for q0 in range(0, n_q, query_chunk):
            q = queries[q0 : q0 + query_chunk].to(dev, torch.float32)  # [q, D]
            s = q @ g.T  # [q, g] fp32
            if g_mask is not None:
                s.masked_fill_(~g_mask[None, :], float("-inf"))
            if gg is not None:
                qg = query_groups[q0 : q0 + query_chunk]
                ok = (qg[:, None] == gg[None, :]) | (qg[:, None] == UNKNOWN_GROUP) | (gg[None, :] == UNKNOWN_GROUP)
                s.masked_fill_(~ok, float("-inf"))
            v, c = _ordered_topk(s, min(k, s.shape[1]))
            new_v.append(v)
            new_i.append(c + g0)
        # Merge: the running lists hold only lower gallery indices than this chunk, and both parts are ordered by
        # (score desc, index asc), so a stable sort of [running, new] keeps equal scores in index order.
        cand_v = torch.cat([best_v, torch.cat(new_v)], dim=1)
        cand_i = torch.cat([best_i, torch.cat(new_i)], dim=1)
        cand_v, order = cand_v.sort(dim=1, descending=True, stable=True)
        best_v, best_i = cand_v[:, :k], cand_i.gather(1, order[:, :k])
    return best_v, best_i


def _import_faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported only when an index is used
    except ImportError as e:
        raise ImportError(
            "FaissIndex needs the faiss-cpu package (listed in requirements.txt): pip install faiss-cpu"
        ) from e
    return faiss


def _to_numpy_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {x.shape}")
    return x


class FaissIndex:
    """Exact inner-product FAISS index over L2-normalised features (so scores are cosine similarities).

    Features are normalised on :meth:`add` and :meth:`search`, so for already-normalised model outputs the results
    equal :func:`topk_similarity` (up to float rounding of near-equal scores).
    """

    def __init__(self, dim: int) -> None:
        faiss = _import_faiss()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.index = faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        return self.index.ntotal

    def _prepare(self, x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
        x = _to_numpy_f32(x)
        if x.shape[1] != self.dim:
            raise ValueError(f"{what} have D={x.shape[1]} but the index has D={self.dim}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        x = x.copy()
        _import_faiss().normalize_L2(x)
        return x

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        """Append gallery features [N, D]; their ids continue from the current size."""
        self.index.add(self._prepare(features, "gallery features"))

    def search(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` by cosine similarity: ``(scores [Q, k] float32, indices [Q, k] int64)`` as torch tensors."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} results per query requested but the index holds {len(self)} items")
        scores, idx = self.index.search(self._prepare(queries, "queries"), k)
        return torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64))

    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically (FAISS's own serialisation)."""
        data = _import_faiss().serialize_index(self.index)  # uint8 numpy array
        with atomic_open(path, "wb") as f:
            f.write(data.tobytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaissIndex":
        """Read an index written by :meth:`save`."""
        faiss = _import_faiss()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index not found: {path}")
        try:
            index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"{path}: not a FAISS index ({e})") from None
        obj = cls.__new__(cls)
        obj.dim, obj.index = index.d, index
        return obj
