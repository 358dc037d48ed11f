"""Retrieval metrics: the challenge's official scorer and the standard mAP@K / R@K.

Two families, because they disagree on purpose:

* ``official_*`` reproduces ``Open-TransMind/track2/tools/cal_map_json.py`` exactly. Per query it walks *all*
  submitted names; a hit counter starts at ``1e-6``; on a hit it adds one and adds ``hits / rank`` (rank 1-based) to
  a sum; AP is ``sum / hits``. So AP is normalised by the hits *retrieved* (not by the number of relevant images),
  misses after the last hit cost nothing, a repeated relevant name counts again, and a query without a hit scores 0.
* ``map_at_k`` is the textbook AP@K: the sum of precision@rank over the relevant items in the top K, divided by
  ``min(K, #relevant)``; a name repeated in a ranking counts once.

List-based functions take names (what a submission holds); :func:`retrieval_metrics` takes a top-k index matrix and
a relevance matrix or function (what training-time validation has) and gives the same numbers.
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Collection, Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

# The official scorer's initial hit count: it keeps AP = sum / hits finite when nothing is hit.
OFFICIAL_EPS = 1e-6
DEFAULT_KS = (1, 5, 10)

# relevant(query_rows [q], gallery_cols [q, n]) -> BoolTensor [q, n]: is gallery_cols[i, j] relevant to query_rows[i]?
RelevanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class OrderError(ValueError):
    """The submitted texts differ from the ground-truth texts (the official "The order of texts is wrong.")."""


def official_ap(ranked_names: Sequence[str], relevant: Collection[str]) -> float:
    """Average precision of one query exactly as the official scorer computes it.

    Args:
        ranked_names: the submitted names, best first; all of them are walked, whatever their number.
        relevant: the ground-truth relevant names of the query.
    """
    relevant = relevant if isinstance(relevant, (set, frozenset, dict)) else set(relevant)
    hits = OFFICIAL_EPS
    total = 0.0
    # Same operations in the same order as cal_map_json.py, so the float result is bit-identical.
    for rank, name in enumerate(ranked_names, start=1):
        if name in relevant:
            hits += 1
            total += hits / rank
    return total / hits


def check_order(results_texts: Sequence[str], gt_texts: Sequence[str]) -> None:
    """Raise :class:`OrderError` unless both text lists are equal element by element (the official check)."""
    for i, (got, want) in enumerate(zip(results_texts, gt_texts)):
        if got != want:
            raise OrderError(
                f"The order of texts is wrong: index {i} (line {i + 1}) has text {got!r} but the ground truth has {want!r}"
            )
    if len(results_texts) != len(gt_texts):
        raise OrderError(
            f"The order of texts is wrong: the results have {len(results_texts)} texts but the ground truth has "
            f"{len(gt_texts)}; the first unmatched index is {min(len(results_texts), len(gt_texts))}"
        )


def official_map(
    results: Sequence[tuple[str, Sequence[str]]],
    gt: Sequence[tuple[str, Collection[str]]],
    k: int | None = None,
) -> float:
    """The official score: mean :func:`official_ap` after checking that the texts match the ground truth in order.

    Args:
        results: ``(text, ranked image names)`` per query, in submission order.
        gt: ``(text, relevant image names)`` per query, in ground-truth file order.
        k: ``None`` (the default) walks every submitted name like the official scorer, which never checks the list
            length; an int truncates each list to its first ``k`` names first (the score of a validated 10-name
            submission is the same either way).

    Raises:
        OrderError: a text differs from the ground truth at the same index, or the counts differ.
    """
    check_order([t for t, _ in results], [t for t, _ in gt])
    if not gt:
        raise ValueError("official_map: the ground truth has no queries")
    if k is not None and k < 1:
        raise ValueError(f"official_map: k must be positive or None, got {k}")
    aps = [official_ap(names if k is None else list(names)[:k], rel) for (_, names), (_, rel) in zip(results, gt)]
    return sum(aps) / len(aps)


def average_precision_at_k(ranked_names: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Standard AP@K of one query: sum of precision@rank over relevant hits in the top ``k``, / min(k, #relevant).

    A repeated name counts once (its first occurrence); a query with no relevant item scores 0.
    """
    relevant = relevant if isinstance(relevant, (set, frozenset, dict)) else set(relevant)
    if not relevant:
        return 0.0
    seen: set[str] = set()
    hits = 0
    total = 0.0
    for rank, name in enumerate(list(ranked_names)[:k], start=1):
        if name in relevant and name not in seen:
            seen.add(name)
            hits += 1
            total += hits / rank
    return total / min(k, len(relevant))


def map_at_k(
    ranked_lists: Sequence[Sequence[str]], relevant_sets: Sequence[Collection[str]], k: int = 10
) -> float:
    """Mean standard AP@K over queries (see :func:`average_precision_at_k`)."""
    _check_same_length(ranked_lists, relevant_sets)
    return sum(average_precision_at_k(r, g, k) for r, g in zip(ranked_lists, relevant_sets)) / len(ranked_lists)


def recall_at_k(
    ranked_lists: Sequence[Sequence[str]], relevant_sets: Sequence[Collection[str]], ks: Iterable[int] = DEFAULT_KS
) -> dict[int, float]:
    """Fraction of queries with at least one relevant name in their top ``k``, for each ``k`` in ``ks``."""
    _check_same_length(ranked_lists, relevant_sets)
    ks = tuple(ks)
    # first_hit[i] = 1-based rank of the first relevant name, or None
    first_hit: list[int | None] = []
    for names, rel in zip(ranked_lists, relevant_sets):
        rel = rel if isinstance(rel, (set, frozenset, dict)) else set(rel)
        first_hit.append(next((r for r, n in enumerate(names, start=1) if n in rel), None))
    n = len(first_hit)
    return {k: sum(1 for r in first_hit if r is not None and r <= k) / n for k in ks}


def _check_same_length(ranked_lists: Sequence, relevant_sets: Sequence) -> None:
    if len(ranked_lists) != len(relevant_sets):
        raise ValueError(f"{len(ranked_lists)} ranked lists but {len(relevant_sets)} relevant sets")
    if not ranked_lists:
        raise ValueError("no queries to score")


# ---------------------------------------------------------------------------------------------------------------
# Vectorised versions for training-time validation (top-k indices from retrieval.topk_similarity).


def hit_matrix(
    topk_idx: torch.Tensor, relevant: torch.Tensor | RelevanceFn, chunk: int = 4096
) -> torch.Tensor:
    """``hits[i, j]`` = whether gallery item ``topk_idx[i, j]`` is relevant to query ``i``; BoolTensor [Q, K]."""
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be [Q, K], got shape {tuple(topk_idx.shape)}")
    if isinstance(relevant, torch.Tensor):
        if relevant.dim() != 2 or relevant.shape[0] != topk_idx.shape[0]:
            raise ValueError(
                f"relevant must be a BoolTensor [Q={topk_idx.shape[0]}, G], got shape {tuple(relevant.shape)}"
            )
        return relevant.to(torch.bool).gather(1, topk_idx.to(relevant.device).long()).cpu()
    rows = torch.arange(topk_idx.shape[0])
    out = [relevant(rows[s : s + chunk], topk_idx[s : s + chunk].long()).to(torch.bool).cpu()
           for s in range(0, topk_idx.shape[0], chunk)]
    hits = torch.cat(out) if out else torch.zeros(0, topk_idx.shape[1], dtype=torch.bool)
    if hits.shape != topk_idx.shape:
        raise ValueError(f"the relevance function returned shape {tuple(hits.shape)}, expected {tuple(topk_idx.shape)}")
    return hits


def count_relevant(relevant: torch.Tensor | RelevanceFn, num_queries: int, num_gallery: int | None = None,
                   chunk: int = 256) -> torch.Tensor:
    """Number of relevant gallery items per query, LongTensor [Q]; a function needs ``num_gallery``."""
    if isinstance(relevant, torch.Tensor):
        return relevant.to(torch.bool).sum(1).long().cpu()
    if num_gallery is None:
        raise ValueError("a relevance function needs num_relevant or num_gallery to compute the standard mAP")
    cols = torch.arange(num_gallery)
    counts = []
    for s in range(0, num_queries, chunk):
        rows = torch.arange(s, min(s + chunk, num_queries))
        counts.append(relevant(rows, cols.expand(len(rows), num_gallery)).to(torch.bool).sum(1).long().cpu())
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)


def retrieval_metrics_from_hits(hits: torch.Tensor, num_relevant: torch.Tensor, k: int = 10,
                                ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``official_map{k}``, ``map{k}`` and ``r{k}`` for each of ``ks`` from a hit matrix [Q, K] (best first).

    If K < k the rows are taken as complete rankings (a gallery smaller than k); columns beyond k are ignored.
    """
    if hits.dim() != 2 or hits.shape[0] == 0:
        raise ValueError(f"hits must be a non-empty [Q, K] matrix, got shape {tuple(hits.shape)}")
    q = hits.shape[0]
    h = hits[:, :k].to(torch.float64)  # [Q, k'] ; float64 so the official AP matches the Python scorer to ~1e-15
    ranks = torch.arange(1, h.shape[1] + 1, dtype=torch.float64)  # [k']
    cum = torch.cumsum(h, dim=1)  # [Q, k'] hits so far, including this rank
    # official: hits counter starts at 1e-6; AP = sum over hits of (count / rank) / final count
    official = ((cum + OFFICIAL_EPS) / ranks * h).sum(1) / (cum[:, -1] + OFFICIAL_EPS)
    # standard AP@k: precision@rank at each hit / min(k, #relevant); 0 when nothing is relevant
    denom = num_relevant.to(torch.float64).clamp(max=k)
    std = torch.where(denom > 0, (cum / ranks * h).sum(1) / denom.clamp(min=1), torch.zeros(q, dtype=torch.float64))
    out = {f"official_map{k}": official.mean().item(), f"map{k}": std.mean().item()}
    first_any = torch.cumsum(hits.to(torch.int64), dim=1) > 0  # [Q, K] hit at or before this column
    for kk in ks:
        col = min(kk, hits.shape[1]) - 1
        out[f"r{kk}"] = first_any[:, col].to(torch.float64).mean().item()
    return out


def retrieval_metrics(
    topk_idx: torch.Tensor,
    relevant: torch.Tensor | RelevanceFn,
    num_relevant: torch.Tensor | None = None,
    num_gallery: int | None = None,
) -> dict[str, float]:
    """Validation metrics from a top-k index matrix: keys ``official_map10``, ``map10``, ``r1``, ``r5``, ``r10``.

    Args:
        topk_idx: LongTensor [Q, K] of gallery indices, best first (K >= 10 normally; see
            :func:`retrieval_metrics_from_hits` for smaller galleries).
        relevant: BoolTensor [Q, G] (``relevant[i, g]``: image ``g`` is relevant to query ``i``), or a function
            ``relevant(query_rows [q], gallery_cols [q, n]) -> BoolTensor [q, n]`` when a full matrix is too big.
        num_relevant: LongTensor [Q] of relevant counts, needed by the standard mAP; computed from ``relevant``
            when omitted (a function then also needs ``num_gallery``).
        num_gallery: gallery size, only used to count relevant items through a function.
    """
    hits = hit_matrix(topk_idx, relevant)
    if num_relevant is None:
        num_relevant = count_relevant(relevant, topk_idx.shape[0], num_gallery)
    if num_relevant.shape != (topk_idx.shape[0],):
        raise ValueError(f"num_relevant must have shape [{topk_idx.shape[0]}], got {tuple(num_relevant.shape)}")
    return retrieval_metrics_from_hits(hits, num_relevant.cpu(), k=10, ks=DEFAULT_KS)


# ---------------------------------------------------------------------------------------------------------------
# Scoring a submission against ground truth (code/evaluate.py).

METRIC_KEYS = ("official_map10", "map10", "r1", "r5", "r10")


def _list_metrics(results: Sequence[tuple[str, Sequence[str]]], gt: Sequence[tuple[str, Collection[str]]]
                  ) -> dict[str, float]:
    names = [list(n) for _, n in results]
    rel = [set(r) for _, r in gt]
    rec = recall_at_k(names, rel, DEFAULT_KS)
    return {
        # the official scorer walks every submitted name, so no truncation here
        "official_map10": sum(official_ap(n, r) for n, r in zip(names, rel)) / len(names),
        "map10": map_at_k(names, rel, 10),
        **{f"r{k}": rec[k] for k in DEFAULT_KS},
    }


def score_results(
    results: Sequence[tuple[str, Sequence[str]]],
    gt: Sequence[tuple[str, Collection[str]]],
    categories: Sequence[str] | None = None,
) -> dict[str, float | dict[str, float]]:
    """All metrics of a submission: the :data:`METRIC_KEYS` overall, plus one dict per category when given.

    Args:
        results: ``(text, ranked names)`` per query in submission order.
        gt: ``(text, relevant names)`` per query in ground-truth order.
        categories: one category name per query (e.g. ``"car"``/``"people"``), or None.

    Raises:
        OrderError: the texts differ from the ground truth (the official scorer then gives no score).
    """
    check_order([t for t, _ in results], [t for t, _ in gt])
    if not gt:
        raise ValueError("the ground truth has no queries")
    out: dict[str, float | dict[str, float]] = dict(_list_metrics(results, gt))
    if categories is not None:
        if len(categories) != len(gt):
            raise ValueError(f"{len(categories)} categories for {len(gt)} queries")
        for cat in sorted(set(categories)):
            idx = [i for i, c in enumerate(categories) if c == cat]
            out[cat] = _list_metrics([results[i] for i in idx], [gt[i] for i in idx])
    return out


def random_baseline(
    gt: Sequence[tuple[str, Collection[str]]],
    gallery: Sequence[str],
    categories: Sequence[str] | None = None,
    k: int = 10,
    trials: int = 20,
    seed: int = 0,
) -> dict[str, float | dict[str, float]]:
    """Expected metrics of a random ranking: ``k`` distinct gallery images drawn uniformly per query, averaged over
    ``trials`` seeded draws. The reference a trained model is compared with."""
    if len(gallery) < k:
        raise ValueError(f"the gallery has {len(gallery)} images, fewer than k={k}")
    rng = random.Random(seed)
    pool = list(gallery)
    runs = [score_results([(t, rng.sample(pool, k)) for t, _ in gt], gt, categories) for _ in range(trials)]
    return _mean_scores(runs)


def _mean_scores(runs: Sequence[Mapping]) -> dict:
    out: dict = {}
    for key, value in runs[0].items():
        out[key] = _mean_scores([r[key] for r in runs]) if isinstance(value, Mapping) else \
            sum(r[key] for r in runs) / len(runs)
    return out
