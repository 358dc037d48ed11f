"""Metrics: hand-computed official-scorer cases, the standard mAP@K/R@K, and the vectorised versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traffic_retrieval.metrics import (
    OrderError,
    average_precision_at_k,
    map_at_k,
    official_ap,
    official_map,
    recall_at_k,
    retrieval_metrics,
    retrieval_metrics_from_hits,
)

EPS = 1e-6  # the official hit counter's start value


# ---- official scorer, one query ---------------------------------------------------------------------------------

def test_official_single_top1_hit_then_junk_is_one():
    # hits = 1e-6 + 1 at rank 1; sum = hits / 1; AP = sum / hits = 1 exactly. Junk after the last hit costs nothing.
    assert official_ap(["a", "x", "y", "z"], {"a", "b", "c"}) == 1.0


def test_official_late_hit():
    # only hit at rank 4: sum = (1 + 1e-6) / 4, hits = 1 + 1e-6 -> AP = 1/4
    assert official_ap(["x", "y", "z", "a"], {"a"}) == pytest.approx(0.25, abs=1e-15)


def test_official_two_hits():
    # ranks 1 and 3: sum = (1+e)/1 + (2+e)/3, hits = 2+e -> AP = (1+e + (2+e)/3) / (2+e) ~= 5/6
    want = ((1 + EPS) / 1 + (2 + EPS) / 3) / (2 + EPS)
    got = official_ap(["a", "x", "b"], {"a", "b"})
    assert got == want  # same float operations as the official code
    assert got == pytest.approx(5 / 6, abs=1e-6)
    assert got != 5 / 6  # the 1e-6 start really is there


def test_official_no_hit_is_zero():
    # sum = 0, hits = 1e-6 -> 0
    assert official_ap(["x", "y"], {"a"}) == 0.0
    assert official_ap([], {"a"}) == 0.0


def test_official_repeated_relevant_name_counts_again():
    # [x, a, a] with {a}: (1+e)/2 + (2+e)/3 over (2+e) ~= (1/2 + 2/3) / 2 = 7/12; without the repeat it would be 1/2
    want = ((1 + EPS) / 2 + (2 + EPS) / 3) / (2 + EPS)
    assert official_ap(["x", "a", "a"], {"a"}) == want
    assert want == pytest.approx(7 / 12, abs=1e-6)
    # [a, a]: (1+e)/1 + (2+e)/2 over (2+e) = 1 + e/(2(2+e)): a hair above 1, as the official code gives
    assert official_ap(["a", "a"], {"a"}) > 1.0


def test_official_walks_hits_beyond_ten():
    # 10 misses then a hit at rank 11: AP = 1/11 (the scorer never truncates); truncated to 10 it is 0
    names = [f"x{i}" for i in range(10)] + ["a"]
    assert official_ap(names, {"a"}) == pytest.approx(1 / 11, abs=1e-15)
    results, gt = [("t", names)], [("t", ["a"])]
    assert official_map(results, gt) == pytest.approx(1 / 11, abs=1e-15)
    assert official_map(results, gt, k=10) == 0.0


# ---- official scorer, whole file --------------------------------------------------------------------------------

def test_official_map_is_mean_ap():
    gt = [("car one", ["a", "b"]), ("person two", ["p"]), ("car three", ["c"])]
    results = [("car one", ["a", "x", "b"]), ("person two", ["x", "p"]), ("car three", ["x", "y"])]
    # APs ~ 5/6, 1/2, 0 -> mean ~ 4/9
    want = (((1 + EPS) + (2 + EPS) / 3) / (2 + EPS) + 0.5 + 0.0) / 3
    assert official_map(results, gt) == pytest.approx(want, abs=1e-15)
    assert official_map(results, gt) == pytest.approx(4 / 9, abs=1e-6)


def test_official_map_order_error_names_index_and_texts():
    gt = [("A white Audi.", ["a"]), ("A red BMW.", ["b"])]
    results = [("A white Audi.", ["a"]), ("A red BMW. ", ["b"])]  # trailing space: not the same text
    with pytest.raises(OrderError) as e:
        official_map(results, gt)
    msg = str(e.value)
    assert "The order of texts is wrong" in msg and "index 1" in msg
    assert "'A red BMW. '" in msg and "'A red BMW.'" in msg


def test_official_map_count_mismatch_is_order_error():
    gt = [("t1", ["a"]), ("t2", ["b"])]
    with pytest.raises(OrderError, match="1 texts but the ground truth has 2"):
        official_map([("t1", ["a"])], gt)
    with pytest.raises(OrderError, match="3 texts"):
        official_map([("t1", ["a"]), ("t2", ["b"]), ("t3", [])], gt)


# ---- standard metrics -------------------------------------------------------------------------------------------

def test_standard_ap_hand_computed():
    # ranked a x b y, relevant {a, b, c}: precision 1/1 at rank 1, 2/3 at rank 3 -> (1 + 2/3) / min(10, 3) = 5/9
    assert average_precision_at_k(["a", "x", "b", "y"], {"a", "b", "c"}, k=10) == pytest.approx(5 / 9)
    # k=2: only a in the top 2 -> 1 / min(2, 3) = 1/2
    assert average_precision_at_k(["a", "x", "b", "y"], {"a", "b", "c"}, k=2) == pytest.approx(1 / 2)
    # a repeated name counts once: [a, a] with {a, b} -> 1 / 2
    assert average_precision_at_k(["a", "a"], {"a", "b"}, k=10) == pytest.approx(1 / 2)
    # late single hit with one relevant: 1/4 (same as official here)
    assert average_precision_at_k(["x", "y", "z", "a"], {"a"}) == pytest.approx(1 / 4)
    assert average_precision_at_k(["x"], set()) == 0.0


def test_standard_vs_official_differ_on_unretrieved_relevant():
    # one correct top-1, 4 relevant in total: official 1.0, standard 1/4
    ranked, rel = ["a"] + [f"x{i}" for i in range(9)], {"a", "b", "c", "d"}
    assert official_ap(ranked, rel) == 1.0
    assert average_precision_at_k(ranked, rel, 10) == pytest.approx(1 / 4)


def test_recall_at_k_hand_computed():
    ranked = [["a", "x", "y"], ["x", "y", "b"], ["x", "y", "z"], ["c"] + ["x"] * 9]
    rel = [{"a"}, {"b"}, {"q"}, {"c"}]
    # first hits at ranks 1, 3, none, 1 -> R@1 = 2/4, R@3 = 3/4
    assert recall_at_k(ranked, rel, ks=(1, 3, 10)) == {1: 0.5, 3: 0.75, 10: 0.75}
    assert map_at_k(ranked, rel, k=10) == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)


def _brute_force_metrics(hits: np.ndarray, n_rel: np.ndarray) -> dict[str, float]:
    """Independent per-query loops over a 0/1 matrix, written from the definitions."""
    q = hits.shape[0]
    ap_std, ap_off, r = [], [], {1: 0, 5: 0, 10: 0}
    for i in range(q):
        row = hits[i, :10]
        prec = [row[: j + 1].sum() / (j + 1) for j in range(len(row))]
        ap_std.append(sum(p for p, h in zip(prec, row) if h) / min(10, n_rel[i]) if n_rel[i] else 0.0)
        n_hit = row.sum()
        # official: sum over hits of (count incl. this hit + eps)/rank, over (hits + eps)
        ap_off.append(sum((row[: j + 1].sum() + EPS) / (j + 1) for j in range(len(row)) if row[j]) / (n_hit + EPS))
        for kk in r:
            r[kk] += bool(hits[i, :kk].any())
    return {"official_map10": float(np.mean(ap_off)), "map10": float(np.mean(ap_std)),
            **{f"r{kk}": v / q for kk, v in r.items()}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_brute_force_and_list_versions(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g = 40, 60
    labels_q = rng.integers(0, 6, n_q)
    labels_g = rng.integers(0, 6, n_g)
    relevant = torch.from_numpy(labels_q[:, None] == labels_g[None, :])  # [Q, G]
    topk = torch.from_numpy(np.stack([rng.permutation(n_g)[:10] for _ in range(n_q)]))  # [Q, 10] unique per row
    got = retrieval_metrics(topk, relevant)
    assert set(got) == {"official_map10", "map10", "r1", "r5", "r10"}

    hits = relevant.numpy()[np.arange(n_q)[:, None], topk.numpy()]
    want = _brute_force_metrics(hits, relevant.numpy().sum(1))
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key

    # the list-based functions on the same data
    names = [[f"g{j}" for j in row] for row in topk.tolist()]
    rel_sets = [{f"g{j}" for j in np.flatnonzero(relevant[i].numpy())} for i in range(n_q)]
    texts = [f"q{i}" for i in range(n_q)]
    assert official_map(list(zip(texts, names)), list(zip(texts, rel_sets))) == pytest.approx(got["official_map10"], abs=1e-12)
    assert map_at_k(names, rel_sets, 10) == pytest.approx(got["map10"], abs=1e-12)
    rec = recall_at_k(names, rel_sets)
    assert [rec[1], rec[5], rec[10]] == pytest.approx([got["r1"], got["r5"], got["r10"]], abs=1e-12)

    # a relevance function gives the same numbers as the matrix
    lq, lg = torch.from_numpy(labels_q), torch.from_numpy(labels_g)
    fn = lambda rows, cols: lq[rows][:, None] == lg[cols]  # noqa: E731
    assert retrieval_metrics(topk, fn, num_gallery=n_g) == pytest.approx(got)
    assert retrieval_metrics(topk, fn, num_relevant=relevant.sum(1)) == pytest.approx(got)
    with pytest.raises(ValueError, match="num_relevant or num_gallery"):
        retrieval_metrics(topk, fn)


def test_vectorised_hand_case_and_short_lists():
    # query 0: hits at ranks 1, 3 of 10 with 2 relevant; query 1: no hit with 1 relevant
    hits = torch.zeros(2, 10, dtype=torch.bool)
    hits[0, 0] = hits[0, 2] = True
    m = retrieval_metrics_from_hits(hits, torch.tensor([2, 1]))
    assert m["map10"] == pytest.approx((1 + 2 / 3) / 2 / 2)
    assert m["official_map10"] == pytest.approx((5 / 6) / 2, abs=1e-6)
    assert (m["r1"], m["r5"], m["r10"]) == (0.5, 0.5, 0.5)
    # a gallery of 3 (K=3): the rows are complete rankings
    m = retrieval_metrics_from_hits(torch.tensor([[False, False, True]]), torch.tensor([1]))
    assert (m["r1"], m["r5"], m["r10"]) == (0.0, 1.0, 1.0)
    assert m["map10"] == pytest.approx(1 / 3)


def test_vectorised_bad_shapes():
    with pytest.raises(ValueError, match=r"\[Q=2, G\]"):
        retrieval_metrics(torch.zeros(2, 10, dtype=torch.long), torch.zeros(3, 5, dtype=torch.bool))


def test_random_baseline_matches_closed_form():
    from traffic_retrieval.metrics import random_baseline

    # one relevant image among 20, 10 drawn at random: R@10 = P(hit in top 10) = 10/20; official AP given a hit at
    # rank r is 1/r, so official mAP = (1/20) * sum_{r=1..10} 1/r
    gallery = [f"{i}.jpg" for i in range(20)]
    gt = [("q", ["3.jpg"])]
    base = random_baseline(gt, gallery, trials=4000, seed=1)
    assert abs(base["r10"] - 0.5) < 0.03
    assert abs(base["official_map10"] - sum(1 / r for r in range(1, 11)) / 20) < 0.02
    cats = random_baseline(gt * 2, gallery, categories=["car", "people"], trials=10)
    assert set(cats) >= {"car", "people", "official_map10"}
