"""The synthetic dataset: layout, formats, determinism, relevance, boxes, and the script's behaviour."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from traffic_retrieval.categories import (
    CATEGORIES,
    VEHICLE_BRANDS,
    attribute_category,
    is_relevant,
    text_category,
)
from traffic_retrieval.demo_data import DEMO_BRANDS, DEMO_COLOURS, DEMO_TYPES, _brand_mark, generate, is_demo_dataset
from traffic_retrieval.labels import read_ground_truth, read_label_file_strict, read_test_text

TINY = {"n_train": 24, "n_val": 12, "n_test": 16}


def _labels(root: Path, split: str):
    if split == "test":
        return read_label_file_strict(root / "annotations" / "test_labels.txt")
    return read_label_file_strict(root / "train" / f"{split}_label.txt")


def test_layout_and_label_formats(tiny_dataset: Path) -> None:
    root = tiny_dataset
    for rel in ("train/train_label.txt", "train/val_label.txt", "test/test_text.txt", "test/test_gt.txt",
                "annotations/train_boxes.json", "annotations/val_boxes.json", "annotations/test_boxes.json",
                "meta.json"):
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["style"] == "demo"
    expected = {"train": {"car": 12, "people": 12}, "val": {"car": 6, "people": 6}, "test": {"car": 8, "people": 8}}
    assert meta["counts"] == expected
    # the vocabulary the demo style draws from, which is what meta.json must list
    assert (meta["colours"], meta["brands"], meta["types"]) == (list(DEMO_COLOURS), list(DEMO_BRANDS), list(DEMO_TYPES))
    all_names: set[str] = set()
    dirs = (("train", "train/train_images"), ("val", "train/val_images"), ("test", "test/test_images"))
    for split, image_dir in dirs:
        recs = _labels(root, split)
        cats = [attribute_category(r.attribute) for r in recs]
        assert Counter(cats) == expected[split]
        assert cats == sorted(cats)  # vehicles first, then pedestrians ("car" < "people")
        files = sorted(p.name for p in (root / image_dir).iterdir())
        assert files == sorted(r.name for r in recs)
        assert not all_names & set(files)
        all_names |= set(files)
        for r, cat in zip(recs, cats):
            assert text_category(r.caption) == cat, r.caption
            if split == "test":
                pattern = r"vehicle_\d{7}\.jpg" if cat == "car" else r"09\d{4}\.jpg"
            else:
                pattern = r"[a-z]{10}\.jpg" if cat == "car" else r"\d{6}\.jpg"
            assert re.fullmatch(pattern, r.name), r.name
            if cat == "car":
                # demo style: train captions composed like the test queries, attribute "colour Brand Type."
                words = r.attribute[:-1].split(" ")
                assert r.attribute.endswith(".") and len(words) == 3
                assert words[0] in meta["colours"] and words[1] in meta["brands"] and words[2] in meta["types"]
                assert r.caption.endswith(" ".join(words) + ".")
            with Image.open(root / image_dir / r.name) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert 48 <= max(im.size) <= 64
                assert (im.width > im.height) if cat == "car" else (im.height > im.width)


def test_test_queries_and_ground_truth(tiny_dataset: Path) -> None:
    root = tiny_dataset
    labels = _labels(root, "test")
    queries = read_test_text(root / "test" / "test_text.txt")
    assert sorted(queries) == sorted(r.caption for r in labels)  # one query per test image
    assert [text_category(q) for q in queries] == ["car"] * 8 + ["people"] * 8  # vehicles first
    gt = read_ground_truth(root / "test" / "test_gt.txt")
    assert [t for t, _ in gt] == queries
    attr_of: dict[str, set[str]] = {}
    for r in labels:
        attr_of.setdefault(r.caption, set()).add(r.attribute)
    for query, relevant in gt:
        (attribute,) = attr_of[query]  # a demo caption determines its attribute
        brute = sorted(r.name for r in labels if is_relevant(attribute, r.attribute))
        assert relevant == brute
        assert relevant  # the query's own image is always relevant


def test_boxes_are_coco_and_match_the_images(tiny_dataset: Path) -> None:
    root = tiny_dataset
    for split, base in (("train", "train"), ("val", "train"), ("test", "test")):
        coco = json.loads((root / "annotations" / f"{split}_boxes.json").read_text())
        assert coco["categories"] == [{"id": 0, "name": "person"}, {"id": 1, "name": "car"}]
        labels = {r.name: r for r in _labels(root, split)}
        assert len(coco["images"]) == len(labels)
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
            assert a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] > 0
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for img in coco["images"]:
            path = root / base / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
            anns = by_image[img["id"]]  # the tiny dataset has no dirty images: every image shows its object
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            main = max(anns, key=lambda a: a["area"])
            cat = attribute_category(labels[Path(img["file_name"]).name].attribute)
            assert main["category_id"] == {"people": 0, "car": 1}[cat]
            assert main["area"] >= 0.2 * img["width"] * img["height"]  # the object is the image's subject


def test_deterministic_and_dirty_images(tmp_path: Path, hash_tree) -> None:
    kw = dict(style="real", min_size=40, max_size=56, dirty_fraction=0.25, **TINY)
    a = generate(tmp_path / "a", seed=3, **kw)
    generate(tmp_path / "b", seed=3, **kw)
    generate(tmp_path / "c", seed=4, **kw)
    assert a["train"] == {"car": 12, "people": 12}
    ha, hb, hc = (hash_tree(tmp_path / n) for n in "abc")
    assert ha == hb  # byte-identical, images included
    assert ha != hc
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["style"] == "real" and len(meta["dirty"]["train"]) == 6 and len(meta["dirty"]["val"]) == 3
    assert set(meta["dirty"]["train"].values()) == {"empty", "wrong_category"}
    coco = json.loads((tmp_path / "a" / "annotations" / "train_boxes.json").read_text())
    labels = {r.name: r for r in _labels(tmp_path / "a", "train")}
    anns_of = {img["file_name"].split("/")[-1]: [a for a in coco["annotations"] if a["image_id"] == img["id"]]
               for img in coco["images"]}
    for name, kind in meta["dirty"]["train"].items():
        label_cat = {"people": 0, "car": 1}[attribute_category(labels[name].attribute)]
        if kind == "empty":
            assert anns_of[name] == []
        else:  # the picture's main object is of the other category than the label says
            assert max(anns_of[name], key=lambda a: a["area"])["category_id"] == 1 - label_cat
    clean = [n for n in labels if n not in meta["dirty"]["train"]]
    for name in clean:
        label_cat = {"people": 0, "car": 1}[attribute_category(labels[name].attribute)]
        assert max(anns_of[name], key=lambda a: a["area"])["category_id"] == label_cat


def test_real_style_mirrors_the_train_test_mismatch(tmp_path: Path) -> None:
    generate(tmp_path / "r", seed=1, style="real", n_train=120, n_val=0, n_test=40, min_size=32, max_size=40,
             dirty_fraction=0.0)
    train = _labels(tmp_path / "r", "train")
    cars = [r for r in train if attribute_category(r.attribute) == "car"]
    for r in cars:
        colour, brand = r.attribute[:-1].split(" ", 1)
        assert brand in VEHICLE_BRANDS  # train attribute "colour Brand."
        # caption: colour+brand, type only or brand only; never the type together with the brand
        assert not any(r.caption.endswith(f"{brand} {t}.") for t in ("Bus", "Microbus", "Minivan", "SUV", "Sedan",
                                                                      "Truck"))
    assert sum(r.caption.endswith(f"{r.attribute[:-1]}.") for r in cars) >= 0.6 * len(cars)
    test = _labels(tmp_path / "r", "test")
    for r in test:
        if attribute_category(r.attribute) == "car":
            assert len(r.attribute[:-1].split(" ")) >= 3 and r.caption.endswith(r.attribute)
    ped = [r for r in train if attribute_category(r.attribute) == "people"]
    assert any("glasses" in r.caption for r in ped) and any("years old" in r.caption for r in ped)
    assert (tmp_path / "r" / "train" / "val_label.txt").read_bytes() == b""  # an empty split is allowed
    assert not any((tmp_path / "r" / "train" / "val_images").iterdir())


def test_brand_marks_are_distinct() -> None:
    marks = [_brand_mark(i) for i in range(len(VEHICLE_BRANDS))]
    assert len(set(marks)) == len(marks)
    demo = marks[: len(DEMO_BRANDS)]
    assert len({s for s, _ in demo}) == len({c for _, c in demo}) == len(DEMO_BRANDS)


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, load_script) -> None:
    script = load_script("make_demo_dataset")
    out = tmp_path / "ds"
    out.mkdir()  # an existing empty directory is fine
    main_args = ["--out", str(out), "--n_train", "4", "--n_val", "2", "--n_test", "4", "--min_size", "32",
                 "--max_size", "40"]
    counts = script["main"](main_args)
    assert counts["test"] == {"car": 2, "people": 2}
    (out / "user_file.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty; pass --force"):
        script["main"](main_args)
    assert (out / "user_file.txt").read_text() == "keep me"
    script["main"](main_args + ["--force", "--seed", "5"])
    assert not (out / "user_file.txt").exists()
    assert json.loads((out / "meta.json").read_text())["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directories left behind


def test_force_never_replaces_a_folder_it_did_not_generate(tmp_path: Path, load_script) -> None:
    """--force replaces an earlier generated dataset only: a typo'd --out (the real dataset) is kept as it is."""
    script = load_script("make_demo_dataset")
    out = tmp_path / "dataset"
    label = out / "train" / "train_label.txt"
    label.parent.mkdir(parents=True)
    label.write_text("a.jpg$red Audi Sedan.$A red Audi Sedan.\n")
    (out / "meta.json").write_text('{"note": "a meta.json of someone else"}')
    assert not is_demo_dataset(out)
    with pytest.raises(SystemExit, match="holds no generated dataset .*never replaced, not even with --force"):
        script["main"](["--out", str(out), "--n_train", "4", "--n_val", "2", "--n_test", "4", "--force"])
    assert label.read_text().startswith("a.jpg$") and sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train"]


def test_bad_arguments(tmp_path: Path, load_script) -> None:
    script = load_script("make_demo_dataset")
    with pytest.raises(ValueError, match="style"):
        generate(tmp_path / "x", style="fancy")
    with pytest.raises(SystemExit):
        script["parse_args"](["--n_train", "-1"])
    with pytest.raises(SystemExit):
        script["parse_args"](["--min_size", "100", "--max_size", "50"])
    assert not (tmp_path / "x").exists()


def test_categories_cover_both(tiny_dataset: Path) -> None:
    # every category has train and val data, which the later stages need
    for split in ("train", "val"):
        assert {attribute_category(r.attribute) for r in _labels(tiny_dataset, split)} == set(CATEGORIES)
