"""ContrastiveLoss in one process: against a plain float64 computation, and the duplicate-aware targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traffic_retrieval.loss import ContrastiveLoss, group_ids_for, stable_group_id


def _features(batch: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return img, txt


def _reference(img: torch.Tensor, txt: torch.Tensor, log_scale: float, ids: list[int] | None = None) -> float:
    """Symmetric cross entropy with float64 numpy loops; targets uniform over the positives of each row."""
    i, t = img.double().numpy(), txt.double().numpy()
    n = len(i)
    ids = list(range(n)) if ids is None else ids
    logits = math.exp(log_scale) * i @ t.T  # [image, text]
    total = 0.0
    for direction in (logits, logits.T):
        for row in range(n):
            lse = np.log(np.exp(direction[row] - direction[row].max()).sum()) + direction[row].max()
            positives = [j for j in range(n) if ids[j] == ids[row]]
            total += sum(lse - direction[row, j] for j in positives) / len(positives) / n
    return total / 2


def test_matches_plain_computation():
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07))
    loss = ContrastiveLoss()(img, txt, scale)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_reference(img, txt, scale.item()), rel=1e-6)


def test_uses_exp_of_logit_scale_and_is_differentiable():
    img, txt = _features()
    img.requires_grad_(True)
    scale = torch.nn.Parameter(torch.tensor(1.5))
    loss = ContrastiveLoss()(img, txt, scale)
    assert loss.item() == pytest.approx(_reference(img.detach(), txt, 1.5), rel=1e-6)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_distinct_group_ids_equal_the_official_loss_and_gradients():
    img, txt = _features(batch=7)
    ids = torch.tensor([5, 9, 2, 11, 3, 8, 40])
    results = []
    for group_ids in (None, ids):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s = torch.nn.Parameter(torch.tensor(2.3))
        loss = ContrastiveLoss()(i, t, s, group_ids)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad, s.grad))
    for official, soft in zip(*results):
        torch.testing.assert_close(soft, official, atol=1e-7, rtol=0)


def test_duplicates_become_positives():
    img, txt = _features(batch=6, seed=3)
    ids = [4, 7, 4, 9, 7, 4]  # rows 0, 2, 5 share a caption; so do rows 1, 4
    scale = torch.tensor(2.0)
    dedup = ContrastiveLoss()(img, txt, scale, torch.tensor(ids))
    assert dedup.item() == pytest.approx(_reference(img, txt, 2.0, ids), rel=1e-6)
    # dedup=False ignores the ids: the official loss
    plain = ContrastiveLoss(dedup=False)(img, txt, scale, torch.tensor(ids))
    assert plain.item() == pytest.approx(_reference(img, txt, 2.0), rel=1e-6)
    assert abs(dedup.item() - plain.item()) > 1e-3


def test_pairs_of_one_group_are_not_pushed_apart():
    """Two pairs share an attribute string (group 1) next to two unrelated pairs.

    Apart: each image sits on its own caption, the two captions orthogonal. Together: all four vectors equal. The
    official loss prefers them apart (it treats the other caption as a negative); with dedup, together is better.
    """
    e = torch.eye(8)
    apart_img = apart_txt = torch.stack([e[0], e[1], e[2], e[3]])
    together_img = together_txt = torch.stack([e[0], e[0], e[2], e[3]])
    ids = torch.tensor([1, 1, 2, 3])
    scale = torch.tensor(math.log(30.0))
    official, dedup = ContrastiveLoss(dedup=False), ContrastiveLoss()
    assert official(apart_img, apart_txt, scale, ids) < official(together_img, together_txt, scale, ids)
    assert dedup(together_img, together_txt, scale, ids) < dedup(apart_img, apart_txt, scale, ids)
    # together, each group row's target and prediction are both (1/2, 1/2): the minimum, log 2, on 2 of 4 rows
    together = dedup(together_img, together_txt, scale, ids).item()
    assert together == pytest.approx(_reference(together_img, together_txt, math.log(30.0), ids.tolist()), rel=1e-6)
    assert together == pytest.approx(0.5 * math.log(2), abs=1e-6)


def test_group_ids_are_stable_string_ids():
    ids = group_ids_for(["a red car", "a red car", "a man in black"])
    assert ids.dtype == torch.long and ids[0] == ids[1] != ids[2]
    assert stable_group_id("a red car") == stable_group_id("a red car") >= 0
    # Fixed across processes and runs (not Python's salted hash): a pinned value.
    assert stable_group_id("a red car") == 3780320526884657393


def test_bf16_autocast_still_computes_float32_logits():
    img, txt = _features(batch=5)
    scale = torch.tensor(2.659)
    ref = ContrastiveLoss()(img, txt, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ContrastiveLoss()(img, txt, scale)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    # bf16 features (what a bf16 model emits) are promoted, not rounded further
    loss16 = ContrastiveLoss()(img.bfloat16(), txt.bfloat16(), scale)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(_reference(img.bfloat16().float(), txt.bfloat16().float(), 2.659), rel=1e-5)


def test_bad_shapes_are_clear_errors():
    img, txt = _features(batch=4)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        ContrastiveLoss()(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="group_ids must be"):
        ContrastiveLoss()(img, txt, torch.tensor(1.0), torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------ relevance targets
def _codes(*on: str, female: bool) -> str:
    """A 21-value pedestrian attribute code with the named attributes (and Female) set."""
    from traffic_retrieval.categories import PEDESTRIAN_ATTRIBUTES, format_pedestrian_code

    return format_pedestrian_code([int(a in on or (a == "Female" and female)) for a in PEDESTRIAN_ATTRIBUTES])


RELEVANCE_ATTRS = [
    _codes("Side", "Backpack", female=True),  # 0
    _codes("Side", "Backpack", "Hat", female=True),  # 1: has all of 0's attributes (and a hat)
    _codes("Side", "Backpack", "Hat", female=False),  # 2: the other gender
    _codes("Side", female=True),  # 3: 0, 1 have all of its attributes
    "white Audi.",  # 4
    "white Audi.",  # 5: equal attribute
    "black Audi.",  # 6
    _codes("Side", "Backpack", female=True),  # 7: equal to 0
]


def test_relevance_mask_is_the_official_rule():
    from traffic_retrieval.categories import is_relevant
    from traffic_retrieval.loss import attribute_codes_for, relevance_mask

    ids = group_ids_for(["attr:" + a for a in RELEVANCE_ATTRS])
    codes = attribute_codes_for(RELEVANCE_ATTRS)
    assert codes.dtype == torch.int8 and codes.shape == (8, 21) and (codes[4:7] == -1).all()
    got = relevance_mask(ids, codes, ids, codes)
    want = torch.tensor([[is_relevant(q, im) for im in RELEVANCE_ATTRS] for q in RELEVANCE_ATTRS])
    assert torch.equal(got, want)
    assert want[3, 1] and not want[1, 3] and not want[0, 2] and want[4, 5]  # one-directional, gender, equality
    # rectangular (local captions x global images), as in the gathered loss
    assert torch.equal(relevance_mask(ids[2:5], codes[2:5], ids, codes), want[2:5])


def test_relevance_targets_match_a_plain_computation():
    from traffic_retrieval.categories import is_relevant
    from traffic_retrieval.loss import attribute_codes_for

    n = len(RELEVANCE_ATTRS)
    img, txt = _features(batch=n, seed=3)
    scale = torch.tensor(2.0)
    ids = group_ids_for(["attr:" + a for a in RELEVANCE_ATTRS])
    got = ContrastiveLoss()(img, txt, scale, ids, attribute_codes_for(RELEVANCE_ATTRS))
    # float64 reference: caption i's positives are the images relevant to it; image j's are the captions it is
    # relevant to
    i, t = img.double().numpy(), txt.double().numpy()
    logits = math.exp(2.0) * i @ t.T  # [image, text]
    rel = [[is_relevant(RELEVANCE_ATTRS[q], RELEVANCE_ATTRS[m]) for m in range(n)] for q in range(n)]  # [text, image]
    total = 0.0
    for row in range(n):
        for scores, positives in ((logits[row], [q for q in range(n) if rel[q][row]]),  # image row -> texts
                                  (logits[:, row], [m for m in range(n) if rel[row][m]])):  # text row -> images
            lse = np.log(np.exp(scores - scores.max()).sum()) + scores.max()
            total += sum(lse - scores[j] for j in positives) / len(positives) / n
    assert got.item() == pytest.approx(total / 2, rel=1e-6)
    # without the codes only equal attributes are positives: another loss
    plain = ContrastiveLoss()(img, txt, scale, ids)
    assert plain.item() != pytest.approx(got.item(), rel=1e-3)
    with pytest.raises(ValueError, match="attr_codes"):
        ContrastiveLoss()(img, txt, scale, None, attribute_codes_for(RELEVANCE_ATTRS))
