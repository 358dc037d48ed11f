"""code/data2flickr30k.py (and code/train_tokenizer.py) on a tiny generated dataset, including bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from traffic_retrieval.categories import attribute_category, coded_name, split_coded_name
from traffic_retrieval.labels import LabelRecord, read_label_file_strict, write_label_file
from traffic_retrieval.tokenizer import UNK_ID, Tokenizer


def fake_cleaning(train_dir: Path, splits=("train", "val"), categories=("car", "people")) -> dict[str, list]:
    """Stand-in for the detection stage: category-coded links and ``fliter_*_labels.txt`` from the true labels."""
    out = {}
    for split in splits:
        recs = []
        for r in read_label_file_strict(train_dir / f"{split}_label.txt"):
            cat = attribute_category(r.attribute)
            if cat not in categories:
                continue
            coded = coded_name(cat, r.name)
            (train_dir / f"{split}_images" / coded).symlink_to(r.name)
            recs.append(LabelRecord(coded, r.attribute, r.caption))
        write_label_file(train_dir / f"fliter_{split}_labels.txt", recs)
        out[split] = recs
    return out


@pytest.fixture()
def script(load_script):
    return load_script("data2flickr30k")


def _run(script, data_path: Path, spm: Path, *extra: str) -> dict:
    return script["main"](["--data_path", str(data_path), "--sentencepiece_model", str(spm), *extra])


def _error(script, data_path: Path, spm: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as err:
        _run(script, data_path, spm, *extra)
    return str(err.value.code)


def test_indexes_per_category(dataset_copy: Path, tiny_spm: Path, script, hash_tree) -> None:
    train_dir = dataset_copy / "train"
    cleaned = fake_cleaning(train_dir)
    before = hash_tree(train_dir)
    summary = _run(script, train_dir, tiny_spm)
    assert summary == {"train": {"car": {"images": 12, "captions": 12}, "people": {"images": 12, "captions": 12}},
                       "val": {"car": {"images": 6, "captions": 6}, "people": {"images": 6, "captions": 6}}}
    after = hash_tree(train_dir)
    assert {k: after[k] for k in before} == before  # nothing the user gave is changed
    assert sorted(set(after) - set(before)) == sorted(
        [f"{s}_{c}.json" for s in ("train", "val") for c in ("car", "people")]
        + [f"flickr30k_{c}.{s}.jsonl" for s in ("train", "val") for c in ("car", "people")])

    tok = Tokenizer(tiny_spm)
    for split in ("train", "val"):
        for cat in ("car", "people"):
            expected = [r for r in cleaned[split] if split_coded_name(r.name)[0] == cat]
            kj = json.loads((train_dir / f"{split}_{cat}.json").read_text())
            assert kj["dataset"] == "traffic"
            assert [im["filename"] for im in kj["images"]] == [r.name for r in expected]
            for i, (im, r) in enumerate(zip(kj["images"], expected)):
                assert im["filepath"] == f"{split}_images" and im["imgid"] == i and im["split"] == split
                assert im["attribute"] == r.attribute
                assert im["sentids"] == [i] and im["sentences"][0]["raw"] == r.caption
                assert im["sentences"][0]["imgid"] == i and im["sentences"][0]["sentid"] == i
                assert im["sentences"][0]["tokens"] == [t for t in r.caption.lower().replace(",", " ")
                                                        .replace(".", " ").split()]
            rows = [json.loads(line) for line in (train_dir / f"flickr30k_{cat}.{split}.jsonl").read_text()
                    .splitlines()]
            assert [row["image_id"] for row in rows] == list(range(len(expected)))
            for row, r in zip(rows, expected):
                assert list(row) == ["image_path", "text_segment", "image_id", "attribute", "text"]
                assert row["image_path"] == f"{split}_images/{r.name}"
                assert (train_dir / row["image_path"]).is_file()
                assert row["text"] == r.caption and row["attribute"] == r.attribute
                assert row["text_segment"] == tok.encode(r.caption) and row["text_segment"]
                assert attribute_category(row["attribute"]) == cat


def test_missing_image_names_file_and_line(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    cleaned = fake_cleaning(train_dir)
    victim = cleaned["val"][3].name
    (train_dir / "val_images" / victim).unlink()
    msg = _error(script, train_dir, tiny_spm)
    assert f"{train_dir / 'fliter_val_labels.txt'}:4: image {train_dir / 'val_images' / victim} is missing" in msg
    assert not list(train_dir.glob("*.jsonl")) and not list(train_dir.glob("*_car.json"))  # nothing half-written


def test_bad_label_lines_are_errors(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    fake_cleaning(train_dir)
    path = train_dir / "fliter_train_labels.txt"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].rsplit(b"$", 1)[0]  # two fields
    lines[2] = lines[2].rsplit(b"$", 1)[0] + b"$"  # empty caption
    lines[4] = lines[3]  # duplicate name
    lines[5] = lines[5].split(b"_", 1)[1]  # no category code
    path.write_bytes(b"\n".join(lines))
    msg = _error(script, train_dir, tiny_spm)
    assert f"{path}:2: expected 3" in msg and f"{path}:3: empty caption" in msg
    assert f"{path}:5: duplicate image name" in msg and f"{path}:6: " in msg and "not a category-coded name" in msg


def test_bom_crlf_and_trailing_blank_lines(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    fake_cleaning(train_dir)
    for split in ("train", "val"):
        path = train_dir / f"fliter_{split}_labels.txt"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n") + b"\r\n\r\n")
    summary = _run(script, train_dir, tiny_spm)
    assert summary["train"]["car"]["images"] == 12
    rows = (train_dir / "flickr30k_car.train.jsonl").read_text().splitlines()
    assert "\\r" not in rows[0] and json.loads(rows[0])["image_path"].startswith("train_images/car_")


def test_empty_category_and_split(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    fake_cleaning(train_dir, categories=("car",))
    msg = _error(script, train_dir, tiny_spm)
    assert "no 'people' image in" in msg and "fliter_train_labels.txt" in msg and "--categories" in msg
    assert not list(train_dir.glob("*.jsonl"))
    summary = _run(script, train_dir, tiny_spm, "--categories", "car")  # asked only for what exists: fine
    assert set(summary["train"]) == {"car"}
    (train_dir / "fliter_val_labels.txt").write_bytes(b"")  # an empty split
    msg = _error(script, train_dir, tiny_spm, "--categories", "car")
    assert "no 'car' image in" in msg and "fliter_val_labels.txt" in msg
    assert _run(script, train_dir, tiny_spm, "--categories", "car", "--splits", "train")["train"]["car"]["images"] == 12


def test_missing_inputs(dataset_copy: Path, tiny_spm: Path, script, tmp_path: Path) -> None:
    train_dir = dataset_copy / "train"
    assert "fliter_train_labels.txt" in _error(script, train_dir, tiny_spm)  # the cleaning stage has not run
    fake_cleaning(train_dir)
    assert "sentencepiece model not found" in _error(script, train_dir, tmp_path / "none.spm")


def test_check_images_accepts_odd_formats_and_rejects_broken(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    cleaned = fake_cleaning(train_dir)
    names = [r.name.split("_", 1)[1] for r in cleaned["train"]]
    img_dir = train_dir / "train_images"
    Image.open(img_dir / names[0]).convert("CMYK").save(img_dir / names[0], format="JPEG")
    Image.open(img_dir / names[1]).convert("L").save(img_dir / names[1], format="JPEG")
    Image.open(img_dir / names[2]).save(img_dir / names[2], format="PNG")  # PNG bytes under a .jpg name
    assert _run(script, train_dir, tiny_spm, "--check_images")["train"]["car"]["images"] == 12
    data = (img_dir / names[3]).read_bytes()
    (img_dir / names[3]).write_bytes(data[: len(data) // 2])  # truncated
    msg = _error(script, train_dir, tiny_spm, "--check_images")
    assert f"fliter_train_labels.txt:4: image {img_dir / ('car_' + names[3])} is truncated" in msg


def test_train_tokenizer(tiny_dataset: Path, tmp_path: Path, load_script) -> None:
    main = load_script("train_tokenizer")["main"]
    out = tmp_path / "m" / "demo.spm"
    labels = tiny_dataset / "train" / "train_label.txt"
    queries = tiny_dataset / "test" / "test_text.txt"
    assert main(["--labels", str(labels), str(queries), "--out", str(out), "--vocab_size", "150"]) == out
    tok = Tokenizer(out)
    for q in queries.read_text().splitlines():
        ids = tok.encode(q)
        assert ids and UNK_ID not in ids and tok.decode(ids) == q
    with pytest.raises(SystemExit, match="text file not found"):
        main(["--labels", str(tmp_path / "nope.txt"), "--out", str(out)])
    # fewer pieces than distinct characters: sentencepiece's own error, as one line and not a traceback
    with pytest.raises(SystemExit, match=r"train_tokenizer: .*vocab_size 20.*smaller than required_chars") as err:
        main(["--labels", str(labels), "--out", str(tmp_path / "small.spm"), "--vocab_size", "20"])
    assert "\n" not in str(err.value.code) and not (tmp_path / "small.spm").exists()


def test_caption_without_tokens_is_an_error(dataset_copy: Path, tiny_spm: Path, script) -> None:
    """A caption of characters sentencepiece normalises away passes the label reader but would give an empty
    text_segment, which training rejects: it is reported as file:line before anything is written."""
    train_dir = dataset_copy / "train"
    cleaned = fake_cleaning(train_dir)
    assert Tokenizer(tiny_spm).encode("\u200b\u200b") == []
    path = train_dir / "fliter_val_labels.txt"
    recs = cleaned["val"]
    recs[2] = LabelRecord(recs[2].name, recs[2].attribute, "\u200b\u200b")
    write_label_file(path, recs)
    msg = _error(script, train_dir, tiny_spm)
    assert f"{path}:3: caption has no tokens" in msg
    assert not list(train_dir.glob("*.jsonl")) and not list(train_dir.glob("*_car.json"))  # nothing half-written


def test_empty_category_hint_names_the_categories_of_every_split(dataset_copy: Path, tiny_spm: Path,
                                                                 script) -> None:
    train_dir = dataset_copy / "train"
    fake_cleaning(train_dir, splits=("train",))  # train has both categories
    fake_cleaning(train_dir, splits=("val",), categories=("car",))  # val only cars
    msg = _error(script, train_dir, tiny_spm)
    assert "no 'people' image in" in msg and "fliter_val_labels.txt" in msg
    assert "categories present in every split: ['car']" in msg  # not the union ['car', 'people']
    (train_dir / "fliter_train_labels.txt").write_bytes(
        b"".join(line for line in (train_dir / "fliter_train_labels.txt").read_bytes().splitlines(True)
                 if line.startswith(b"people_")))  # train only people: nothing is in both
    assert "no category has images in every split" in _error(script, train_dir, tiny_spm)


def test_missing_image_folder_is_named(dataset_copy: Path, tiny_spm: Path, script) -> None:
    train_dir = dataset_copy / "train"
    fake_cleaning(train_dir)
    (train_dir / "val_images").rename(train_dir / "val_images_moved")
    msg = _error(script, train_dir, tiny_spm)
    assert f"image folder not found: {train_dir / 'val_images'}" in msg and "is missing" not in msg
