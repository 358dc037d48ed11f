"""traffic_retrieval.data: reading the jsonl index (and its errors), pairs and collate, samplers, validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from traffic_retrieval.categories import is_relevant
from traffic_retrieval.data import (
    DataError,
    EvalSplit,
    IndexRow,
    PairDataset,
    check_token_ids,
    collate_pairs,
    group_key,
    index_file,
    read_index,
    steps_per_epoch,
    train_sampler,
)
from traffic_retrieval.distributed import shard
from traffic_retrieval.loss import ContrastiveLoss, group_ids_for
from traffic_retrieval.tokenizer import batch_inputs
from traffic_retrieval.transforms import eval_transform

from test_data2flickr30k import fake_cleaning  # the suite's stand-in for the detection stage

CAR, PED_A, PED_B = "red BMW SUV.", "1,0,1,0,1,0,0,0,0,0,0,1,0,1,0,0,0,0,0,0,0", "1,0,1,0,1,0,0,1,0,0,0,1,0,1,0,0,0,0,0,0,0"


def _row(image_id: int, attribute: str = CAR, text: str = "A red BMW SUV.", seg=(5, 6, 7)) -> dict:
    return {"image_path": f"val_images/img{image_id}.jpg", "text_segment": list(seg), "image_id": image_id,
            "attribute": attribute, "text": text}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def indexed(tiny_dataset: Path, tiny_spm: Path, tmp_path_factory, load_script) -> Path:
    """A copy of the tiny dataset with cleaned labels and the jsonl indexes built by data2flickr30k."""
    import shutil

    root = tmp_path_factory.mktemp("indexed") / "demo"
    shutil.copytree(tiny_dataset, root)
    fake_cleaning(root / "train")
    load_script("data2flickr30k")["main"](["--data_path", str(root / "train"), "--sentencepiece_model", str(tiny_spm)])
    return root / "train"


def test_read_index_of_data2flickr30k(indexed: Path) -> None:
    path = index_file(indexed, "car", "train")
    assert path == indexed / "flickr30k_car.train.jsonl"
    rows = read_index(path)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(raw) == 12
    for row, r in zip(rows, raw):
        assert row == IndexRow(r["image_path"], tuple(r["text_segment"]), r["image_id"], r["attribute"], r["text"])


def test_read_index_errors_name_file_and_line(tmp_path: Path) -> None:
    missing = tmp_path / "flickr30k_car.val.jsonl"
    with pytest.raises(FileNotFoundError, match="index file not found.*data2flickr30k"):
        read_index(missing)
    bad = _write(tmp_path / "bad.jsonl", [
        _row(0),
        "{not json",
        {k: v for k, v in _row(1).items() if k != "attribute"},
        _row(2, seg=()),
        {**_row(3), "image_id": -1},
        {**_row(0), "image_path": "val_images/other.jpg"},  # image id 0 already names another file
        ["a list"],
    ])
    with pytest.raises(DataError) as err:
        read_index(bad)
    msg = str(err.value)
    assert msg.startswith(f"6 bad line(s) in {bad}")
    for line, what in ((2, "not valid JSON"), (3, "missing key(s) attribute"), (4, "text_segment must be"),
                       (5, "image_id must be"), (6, "image_id 0 is val_images/img0.jpg on an earlier line"),
                       (7, "expected a JSON object")):
        assert f"{bad}:{line}: {what}" in msg
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: empty split"):
        read_index(empty)


def test_token_ids_must_fit_the_vocabulary(tmp_path: Path) -> None:
    rows = read_index(_write(tmp_path / "x.jsonl", [_row(0), _row(1, seg=(5, 1024))]))
    check_token_ids(rows, 1025, "x.jsonl")
    with pytest.raises(DataError, match="x.jsonl: row 2 has token id 1024 but the model's text embedding has 1024 rows"):
        check_token_ids(rows, 1024, "x.jsonl")


def test_pairs_collate_trims_padding_and_keeps_group_keys(indexed: Path) -> None:
    rows = read_index(index_file(indexed, "people", "train"))
    ds = PairDataset(rows, indexed, eval_transform(32), dedup="attribute")
    items = [ds[i] for i in range(4)]
    assert items[0]["image"].shape == (3, 32, 32) and items[2]["index"] == 2
    batch = collate_pairs(items, max_len=64)
    full_tokens, full_mask = batch_inputs([r.text_segment for r in rows[:4]], 64)
    longest = max(len(r.text_segment) for r in rows[:4]) + 2  # bos + eos
    assert batch["tokens"].shape == (4, longest)
    assert torch.equal(batch["tokens"], full_tokens[:, :longest]) and torch.equal(batch["padding_mask"],
                                                                                    full_mask[:, :longest])
    assert not full_mask[:, longest:].eq(0).any()  # only padding was cut
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["group_keys"] == ["attr:" + r.attribute for r in rows[:4]]
    assert torch.equal(batch["index"], torch.arange(4))
    short = collate_pairs(items, max_len=6)  # truncation to max_len still happens
    assert short["tokens"].shape[1] <= 6


def test_group_keys_mark_duplicates_for_the_loss() -> None:
    rows = [IndexRow("a.jpg", (4,), 0, CAR, "This is a red BMW SUV."),
            IndexRow("b.jpg", (5,), 1, CAR, "A red BMW SUV."),  # same attribute, other words
            IndexRow("c.jpg", (4,), 2, "blue BMW SUV.", "This is a red BMW SUV."),  # same words, other attribute
            IndexRow("d.jpg", (6,), 3, PED_A, "A woman.")]
    by_attr = group_ids_for([group_key(r, "attribute") for r in rows])
    by_text = group_ids_for([group_key(r, "caption") for r in rows])
    assert by_attr[0] == by_attr[1] and len(set(by_attr.tolist())) == 3
    assert by_text[0] == by_text[2] and len(set(by_text.tolist())) == 3
    assert len(set(group_ids_for([group_key(r, "none") for r in rows]).tolist())) == 4
    with pytest.raises(ValueError, match="unknown dedup mode"):
        group_key(rows[0], "image")

    # With attribute dedup, rows 0 and 1 are each other's positives: the loss is the CE against a target spread
    # over both (hand-computed here), not the plain diagonal CE that would push them apart.
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    pos = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float)
    target = pos / pos.sum(1, keepdim=True)
    logits = scale.exp() * img @ txt.T
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    got = ContrastiveLoss(dedup=True)(img, txt, scale, by_attr)
    torch.testing.assert_close(got, expected)
    plain = ContrastiveLoss(dedup=True)(img, txt, scale, None)
    assert not torch.allclose(got, plain)


def test_train_order_depends_only_on_seed_and_epoch() -> None:
    data = list(range(23))

    def order(world: int, rank: int, seed: int, epoch: int) -> list[int]:
        s = train_sampler(data, world, rank, seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0, 42, 3) == order(1, 0, 42, 3)  # a resumed run sees the same order
    assert order(1, 0, 42, 3) != order(1, 0, 42, 4) and order(1, 0, 42, 3) != order(1, 0, 7, 3)
    assert sorted(order(1, 0, 42, 0)) == data
    r0, r1 = order(2, 0, 42, 1), order(2, 1, 42, 1)
    assert len(r0) == len(r1) == 11 and not set(r0) & set(r1)  # drop_last: equal shares, no duplicates
    assert steps_per_epoch(23, batch_size=4, world_size=2, update_freq=1) == 2
    assert steps_per_epoch(145000, 96, 32, 1) == 47  # the official Flickr30k large recipe (beit3.md 5.3)


def test_shards_concatenate_to_the_whole() -> None:
    for n in (0, 1, 5, 12):
        for world in (1, 2, 3):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
    tokens, mask = batch_inputs([], 64)
    assert tokens.shape == mask.shape == (0, 64)


def test_eval_split_gallery_queries_and_relevance() -> None:
    rows = [IndexRow(**{**_row(i, a), "text_segment": (4,)}) for i, a in ((0, CAR), (1, PED_A), (1, PED_A),
                                                                           (2, PED_B), (3, CAR), (4, "blue BMW SUV."))]
    split = EvalSplit.from_rows(rows)
    assert split.image_paths == [f"val_images/img{i}.jpg" for i in range(5)]
    assert split.image_attributes == [CAR, PED_A, PED_B, CAR, "blue BMW SUV."]
    assert split.query_image == [0, 1, 1, 2, 3, 4] and len(split.query_segments) == 6
    relevant, num_relevant = split.relevance(is_relevant)
    q = torch.arange(6)
    g = torch.arange(5).expand(6, 5)
    got = relevant(q, g)
    brute = torch.tensor([[is_relevant(qa, ga) for ga in split.image_attributes] for qa in split.query_attributes])
    assert torch.equal(got, brute)
    assert torch.equal(num_relevant, brute.sum(1))
    assert brute[1].tolist() == [False, True, True, False, False]  # PED_B includes every bit of PED_A, same gender
    assert brute[3].tolist() == [False, False, True, False, False]  # but not the other way round


def test_resize_train_crop_keeps_the_whole_image() -> None:
    from PIL import Image

    from traffic_retrieval.transforms import eval_transform, train_transform

    img = Image.new("RGB", (30, 60), (10, 200, 30))
    img.paste((250, 0, 0), (0, 0, 30, 6))  # a red "hat" band at the top that a crop could cut off
    out = train_transform(32, crop="resize")(img)
    ref = eval_transform(32)(img)
    assert out.shape == (3, 32, 32)
    # identical up to the random horizontal flip (the image is symmetric left-right)
    assert torch.allclose(out, ref, atol=1e-6)


def test_people_crop_is_the_4th_place_random_resized_crop() -> None:
    """CentreBiasedCrop.get_params as the 4th place's XCenterResizeCropAndInterpolation: area 0.5 to 1, aspect ratio
    log-uniform in [3/4, 4/3], vertical offset uniform, horizontal offset Binomial(W - w, 0.5), centre fallback."""
    import random

    import numpy as np

    from traffic_retrieval.transforms import CentreBiasedCrop, train_transform

    random.seed(0)
    np.random.seed(0)
    width, height = 240, 300  # a padded pedestrian crop
    top, left, h, w = np.array([CentreBiasedCrop.get_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3))
                                for _ in range(4000)], dtype=float).T
    ratio, area = w / h, w * h / (width * height)
    assert ratio.min() >= 0.74 and ratio.max() <= 1.34  # within [3/4, 4/3] up to rounding to whole pixels
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # the ratio is drawn, not the image's own (0.8)
    assert area.min() >= 0.49 and area.max() <= 1.0
    assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()
    room = height - h > 20  # where a vertical position is meaningful
    u = top[room] / (height - h[room])
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.006  # uniform: variance 1/12
    assert np.allclose(np.histogram(u, bins=5, range=(0, 1))[0] / room.sum(), 0.2, atol=0.03)
    n = width - w  # Binomial(n, 0.5): mean n/2, variance n/4, so the standardised offset has mean 0, variance 1
    z = (left[n > 0] - n[n > 0] / 2) / np.sqrt(n[n > 0] / 4)
    assert abs(z.mean()) < 0.1 and 0.9 < z.var() < 1.1
    # no candidate fits a 100:1 image: the largest centred crop of ratio 4/3 (3/4 for the tall one)
    assert CentreBiasedCrop.get_params(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)
    assert CentreBiasedCrop.get_params(10, 1000, (0.5, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)

    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 30, 3), dtype=np.uint8))
    t = train_transform(32, crop="people", people_pad=7)

    def draw(seed: int) -> torch.Tensor:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return t(img)

    assert draw(1).shape == (3, 32, 32) and torch.equal(draw(1), draw(1))  # reproducible under the seeding


def _bilinear(src, source_of, fill: float = 128.0):
    """``out[y, x]`` = ``src`` sampled bilinearly at ``source_of(x, y)`` (pixel centres at integer coordinates),
    ``fill`` outside: what cv2.warpAffine computes, written out independently."""
    import numpy as np

    h, w, c = src.shape
    padded = np.full((h + 4, w + 4, c), fill)
    padded[2:-2, 2:-2] = src
    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    sx, sy = source_of(xs, ys)
    inside = (sx > -1) & (sx < w) & (sy > -1) & (sy < h)
    sx, sy = np.where(inside, sx, 0.0), np.where(inside, sy, 0.0)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    x0, y0 = x0 + 2, y0 + 2
    out = (padded[y0, x0] * (1 - fx) * (1 - fy) + padded[y0, x0 + 1] * fx * (1 - fy)
           + padded[y0 + 1, x0] * (1 - fx) * fy + padded[y0 + 1, x0 + 1] * fx * fy)
    return np.where(inside[..., None], out, fill)


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_randaug_geometry_is_the_official_warp(op: str) -> None:
    """beit3/randaug.py at magnitude 7: cv2.warpAffine, bilinear, grey fill, with forward matrices ShearX
    [[1, 0.21, 0], [0, 1, 0]] (about the top-left pixel, not the centre), TranslateX [[1, 0, -7], [0, 1, 0]] and
    cv2.getRotationMatrix2D((W/2, H/2), 21, 1); each output pixel samples the inverse map."""
    import math

    import numpy as np
    from PIL import Image

    from traffic_retrieval.transforms import RandAugment

    src = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)  # noise: nearest would be far off
    h, w = src.shape[:2]
    f, cos, sin, cx, cy = 0.21, math.cos(math.radians(21)), math.sin(math.radians(21)), w / 2, h / 2
    source_of = {
        "ShearX": lambda x, y: (x - f * y, y),
        "ShearY": lambda x, y: (x, y - f * x),
        "TranslateX": lambda x, y: (x + 7, y),
        "TranslateY": lambda x, y: (x, y + 7),
        "Rotate": lambda x, y: (cx + cos * (x - cx) - sin * (y - cy), cy + sin * (x - cx) + cos * (y - cy)),
    }[op]
    got = np.asarray(RandAugment(2, 7)._apply(Image.fromarray(src), op, sign=1.0)).astype(float)
    assert got.shape == src.shape
    assert np.abs(got - _bilinear(src.astype(float), source_of)).max() <= 1.0  # cv2 rounds to whole levels
