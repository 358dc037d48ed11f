"""Chunked top-k against a brute-force full-matrix ranking; masks, groups, ties; the FAISS index."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from traffic_retrieval.retrieval import FaissIndex, topk_similarity


def _int_features(seed: int, n: int, d: int = 6) -> torch.Tensor:
    # Small integers: every dot product is exact in fp32 (and bf16 holds the inputs exactly), so the reference
    # needs no tolerance, and many scores tie, which exercises the index tie-break.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).float()


def _brute_force(q: torch.Tensor, g: torch.Tensor, k: int, ok: np.ndarray | None = None):
    """Full score matrix, then per row order by (score desc, index asc) with numpy's lexsort."""
    s = (q.double() @ g.double().T).numpy()  # [Q, G]
    if ok is not None:
        s = np.where(ok, s, -np.inf)
    idx = np.stack([np.lexsort((np.arange(s.shape[1]), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1, 1), (3, 5), (7, 16), (1024, 65536), (50, 3)])
def test_matches_brute_force_for_chunk_sizes(query_chunk, gallery_chunk):
    q, g = _int_features(0, 37), _int_features(1, 53)
    want_s, want_i = _brute_force(q, g, 10)
    s, i = topk_similarity(q, g, 10, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    assert i.dtype == torch.int64 and s.dtype == torch.float32 and s.shape == (37, 10)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_array_equal(s.numpy(), want_s)


def test_ties_broken_by_gallery_index():
    q = torch.ones(2, 4)
    g = torch.zeros(9, 4)
    g[[2, 5, 7]] = 1.0  # three equal best scores, the rest equal zeros
    for gc in (1, 2, 4, 100):
        s, i = topk_similarity(q, g, 6, gallery_chunk=gc)
        assert i[0].tolist() == [2, 5, 7, 0, 1, 3], gc
        assert s[0].tolist() == [4.0, 4.0, 4.0, 0.0, 0.0, 0.0]


def test_allowed_mask():
    q, g = _int_features(2, 20), _int_features(3, 30)
    allowed = torch.from_numpy(np.random.default_rng(0).random(30) < 0.5)
    want_s, want_i = _brute_force(q, g, 10, ok=np.broadcast_to(allowed.numpy(), (20, 30)))
    s, i = topk_similarity(q, g, 10, query_chunk=6, gallery_chunk=7, allowed=allowed)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_array_equal(s.numpy(), want_s)


def test_group_masks_with_unknowns_and_small_groups():
    rng = np.random.default_rng(1)
    q, g = _int_features(4, 25), _int_features(5, 40)
    qg = rng.integers(-1, 3, 25)  # -1 unknown query: ranked among all images
    gg = rng.integers(0, 3, 40)
    gg[:5] = -1  # unknown images: allowed for every query
    gg[gg == 2] = -1
    gg[10] = 2  # group 2 has a single image: the other 9 results are -inf, in gallery order
    ok = (qg[:, None] == gg[None, :]) | (qg[:, None] == -1) | (gg[None, :] == -1)
    want_s, want_i = _brute_force(q, g, 10, ok=ok)
    s, i = topk_similarity(q, g, 10, query_chunk=4, gallery_chunk=9,
                           query_groups=torch.from_numpy(qg), gallery_groups=torch.from_numpy(gg))
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_array_equal(s.numpy(), want_s)
    # every allowed image precedes every excluded one
    for row in range(25):
        allowed_row = ok[row, i[row].numpy()]
        assert not np.any(allowed_row[1:] & ~allowed_row[:-1])


def test_group_ranking_tail_is_minus_inf():
    q = torch.eye(3)
    g = torch.eye(3).repeat(2, 1)  # [6, 3]
    s, i = topk_similarity(q, g, 4, query_groups=torch.tensor([0, 1, 1]),
                           gallery_groups=torch.tensor([0, 1, 1, 1, 0, 0]))
    assert i[0].tolist() == [0, 4, 5, 1] and s[0, 3] == float("-inf")  # group 0 = images 0, 4, 5
    assert i[1].tolist() == [1, 2, 3, 0] and s[1, :3].tolist() == [1.0, 0.0, 0.0]


def test_low_precision_inputs_and_explicit_device():
    q, g = _int_features(6, 12), _int_features(7, 20)
    s32, i32 = topk_similarity(q, g, 5)
    for dtype in (torch.bfloat16, torch.float16):
        s, i = topk_similarity(q.to(dtype), g.to(dtype), 5, query_chunk=5, gallery_chunk=6, device="cpu")
        assert s.dtype == torch.float32
        assert torch.equal(i, i32) and torch.equal(s, s32)


def test_errors():
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="k=6 .* only 5 items"):
        topk_similarity(q, g, 6)
    with pytest.raises(ValueError, match="feature sizes differ"):
        topk_similarity(q, torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="together"):
        topk_similarity(q, g, 2, query_groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        topk_similarity(torch.full((1, 4), float("nan")), g, 2)
    with pytest.raises(ValueError, match="allowed"):
        topk_similarity(q, g, 2, allowed=torch.ones(4, dtype=torch.bool))


def _normalised(seed: int, n: int, d: int = 16) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def test_faiss_equals_topk_similarity_and_round_trips(tmp_path):
    q, g = _normalised(0, 30), _normalised(1, 200)
    index = FaissIndex(16)
    index.add(g[:120])
    index.add(g[120:])  # ids continue
    assert len(index) == 200
    s, i = index.search(q, 10)
    ref_s, ref_i = topk_similarity(q, g, 10, gallery_chunk=64)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-5)

    path = tmp_path / "sub" / "gallery.faiss"
    index.save(path)
    loaded = FaissIndex.load(path)
    assert len(loaded) == 200 and loaded.dim == 16
    s2, i2 = loaded.search(q.numpy(), 10)  # numpy input works too
    assert torch.equal(i2, i) and torch.equal(s2, s)
    # features are normalised by the index: scaling a query changes nothing
    assert torch.equal(index.search(q * 3.0, 10)[1], i)


def test_faiss_errors(tmp_path, monkeypatch):
    index = FaissIndex(4)
    index.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="index holds 3"):
        index.search(torch.randn(1, 4), 4)
    with pytest.raises(ValueError, match="D=5"):
        index.add(torch.randn(2, 5))
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a FAISS index"):
        FaissIndex.load(bad)
    with pytest.raises(FileNotFoundError):
        FaissIndex.load(tmp_path / "missing.faiss")
    monkeypatch.setitem(sys.modules, "faiss", None)  # simulate faiss-cpu not installed
    with pytest.raises(ImportError, match="faiss-cpu"):
        FaissIndex(4)
