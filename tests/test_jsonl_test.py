"""code/jsonl_test.py and the image checks on a tiny generated test set, including bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from traffic_retrieval.categories import attribute_category, text_category
from traffic_retrieval.images import ImageReadError, check_image, load_rgb
from traffic_retrieval.inference import InferenceError, load_test_index
from traffic_retrieval.labels import read_label_file_strict, read_test_text
from traffic_retrieval.tokenizer import Tokenizer


@pytest.fixture()
def script(load_script):
    return load_script("jsonl_test")


def _run(script, test_dir: Path, spm: Path, *extra: str) -> dict:
    return script["main"](["--data_path", str(test_dir), "--sentencepiece_model", str(spm), *extra])


def _error(script, test_dir: Path, spm: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as err:
        _run(script, test_dir, spm, *extra)
    return str(err.value.code)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _interleave(test_dir: Path) -> list[str]:
    """Rewrite test_text.txt with people and car queries mixed (people first), CRLF and a BOM; return the queries."""
    q = read_test_text(test_dir / "test_text.txt")
    mixed = [x for pair in zip(q[len(q) // 2:], q[: len(q) // 2]) for x in pair]
    (test_dir / "test_text.txt").write_bytes(b"\xef\xbb\xbf" + "".join(x + "\r\n" for x in mixed).encode() + b"\r\n")
    return mixed


def test_grouped_queries_and_gallery(dataset_copy: Path, tiny_spm: Path, script, hash_tree) -> None:
    test_dir = dataset_copy / "test"
    queries = _interleave(test_dir)
    before = hash_tree(test_dir)
    summary = _run(script, test_dir, tiny_spm)
    assert summary["queries"] == {"car": 8, "people": 8} and summary["images"] == {"unknown": 16}
    after = hash_tree(test_dir)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["flickr30k.test.jsonl", "flickr30k.test_queries.jsonl", "test.json",
                                                "test.txt", "test_order.json"]

    grouped = (test_dir / "test.txt").read_text().split("\n")[:-1]
    order = json.loads((test_dir / "test_order.json").read_text())
    assert [queries[i] for i in order["original_index"]] == grouped  # maps back, strings verbatim
    assert order["category"] == ["car"] * 8 + ["people"] * 8
    assert order["original_index"] == [i for i in range(16) if i % 2 == 1] + [i for i in range(16) if i % 2 == 0]
    assert [text_category(q) for q in grouped] == order["category"]

    names = sorted(p.name for p in (test_dir / "test_images").iterdir())
    gallery = _jsonl(test_dir / "flickr30k.test.jsonl")
    assert gallery == [{"image_path": f"test_images/{n}", "text_segment": [], "image_id": i, "category": None}
                       for i, n in enumerate(names)]
    tok = Tokenizer(tiny_spm)
    qrows = _jsonl(test_dir / "flickr30k.test_queries.jsonl")
    assert [r["text"] for r in qrows] == grouped
    assert [r["original_index"] for r in qrows] == order["original_index"]
    assert all(r["text_segment"] == tok.encode(r["text"]) and r["text_segment"] for r in qrows)
    assert [r["category"] for r in qrows] == order["category"]
    tj = json.loads((test_dir / "test.json").read_text())
    assert [im["filename"] for im in tj["images"]] == names and tj["images"][3]["imgid"] == 3
    assert tj["images"][0]["filepath"] == "test_images" and tj["images"][0]["category"] is None
    assert [q["raw"] for q in tj["queries"]] == grouped and tj["queries"][5]["sentid"] == 5


def test_another_query_file_is_the_one_inference_ranks(dataset_copy: Path, tiny_spm: Path, script) -> None:
    test_dir = dataset_copy / "test"
    queries = read_test_text(test_dir / "test_text.txt")
    second = queries[::-1][:5]  # another leaderboard's queries: fewer, in another order
    (test_dir / "queries_B.txt").write_text("".join(q + "\n" for q in second))
    _run(script, test_dir, tiny_spm, "--text_file", "queries_B.txt")
    assert json.loads((test_dir / "test_order.json").read_text())["text_file"] == "queries_B.txt"
    index = load_test_index(test_dir)  # test_text.txt is still there, with other queries
    assert index.texts == second and index.text_file == "queries_B.txt"
    assert index.categories == [text_category(q) for q in second]
    (test_dir / "queries_B.txt").write_text("".join(q + "\n" for q in second[:4]))
    with pytest.raises(InferenceError, match="re-run .*--text_file queries_B.txt"):
        load_test_index(test_dir)

    _run(script, test_dir, tiny_spm)  # the default query file; an index without "text_file" means it too
    order_path = test_dir / "test_order.json"
    order = json.loads(order_path.read_text())
    assert order.pop("text_file") == "test_text.txt"
    order_path.write_text(json.dumps(order))
    assert load_test_index(test_dir).texts == queries


def test_image_categories_file(dataset_copy: Path, tiny_spm: Path, script) -> None:
    test_dir = dataset_copy / "test"
    truth = read_label_file_strict(dataset_copy / "annotations" / "test_labels.txt")
    cats = test_dir.parent / "test_image_categories.txt"
    cats.write_text("".join(f"{r.name}${attribute_category(r.attribute)}\n" for r in truth))
    summary = _run(script, test_dir, tiny_spm, "--image_categories", str(cats))
    assert summary["images"] == {"car": 8, "people": 8}
    for row in _jsonl(test_dir / "flickr30k.test.jsonl"):
        name = row["image_path"].split("/")[1]
        assert row["category"] == ("car" if name.startswith("vehicle_") else "people")
    cats.write_text(f"{truth[0].name}$car\n{truth[1].name}$bicycle\n")
    assert f"{cats}:2: unknown category 'bicycle'" in _error(script, test_dir, tiny_spm, "--image_categories",
                                                             str(cats))


def test_unusable_images_are_reported_and_excluded(dataset_copy: Path, tiny_spm: Path, script, caplog) -> None:
    img_dir = dataset_copy / "test" / "test_images"
    names = sorted(p.name for p in img_dir.iterdir())
    Image.open(img_dir / names[0]).convert("CMYK").save(img_dir / names[0], format="JPEG")
    Image.open(img_dir / names[1]).convert("L").save(img_dir / names[1], format="JPEG")
    Image.open(img_dir / names[2]).save(img_dir / names[2], format="PNG")  # PNG named .jpg
    data = (img_dir / names[3]).read_bytes()
    (img_dir / names[3]).write_bytes(data[: len(data) // 2])  # truncated
    (img_dir / "notes.jpg").write_text("not an image")
    (img_dir / "empty.jpg").write_bytes(b"")
    (img_dir / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored silently
    with caplog.at_level(logging.WARNING):
        summary = _run(script, dataset_copy / "test", tiny_spm)
    excluded = dict(summary["excluded"])
    assert set(excluded) == {names[3], "notes.jpg", "empty.jpg"}
    assert excluded[names[3]].startswith("truncated") and excluded["empty.jpg"] == "empty file"
    assert excluded["notes.jpg"].startswith("unreadable")
    assert "excluded 3 unusable test image(s)" in caplog.text and names[3] in caplog.text
    gallery = [r["image_path"] for r in _jsonl(dataset_copy / "test" / "flickr30k.test.jsonl")]
    assert gallery == [f"test_images/{n}" for n in names if n != names[3]]  # CMYK, L and PNG-as-JPEG kept


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "has no query"), (b"A red car.\n\nA blue car.\n", ":2: blank line"),
     (b"A red car.\nA $ car.\n", ":2: a query must not contain '$'"), (b"A caf\xe9.\n", ":1: not valid UTF-8")],
)
def test_bad_query_files(dataset_copy: Path, tiny_spm: Path, script, content: bytes, expected: str) -> None:
    (dataset_copy / "test" / "test_text.txt").write_bytes(content)
    assert expected in _error(script, dataset_copy / "test", tiny_spm)
    assert not (dataset_copy / "test" / "test.txt").exists()


def test_empty_or_missing_gallery(dataset_copy: Path, tiny_spm: Path, script) -> None:
    img_dir = dataset_copy / "test" / "test_images"
    for p in img_dir.iterdir():
        p.unlink()
    assert "no usable image in" in _error(script, dataset_copy / "test", tiny_spm)
    img_dir.rmdir()
    assert "test image directory not found" in _error(script, dataset_copy / "test", tiny_spm)


def test_check_image_and_load_rgb(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (20, 10), (200, 30, 30))
    rgb.save(tmp_path / "ok.jpg", quality=90)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("L").save(tmp_path / "gray.jpg")
    rgb.save(tmp_path / "png.jpg", format="PNG")
    Image.new("P", (20, 10)).save(tmp_path / "pal.png")
    for name in ("ok.jpg", "cmyk.jpg", "gray.jpg", "png.jpg", "pal.png"):
        assert check_image(tmp_path / name) is None, name
        im = load_rgb(tmp_path / name)
        assert im.mode == "RGB" and im.size == (20, 10)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dir.jpg").mkdir()
    assert check_image(tmp_path / "missing.jpg") == "missing"
    assert check_image(tmp_path / "empty.jpg") == "empty file"
    assert check_image(tmp_path / "dir.jpg") == "not a regular file"
    assert check_image(tmp_path / "trunc.jpg").startswith("truncated")
    assert check_image(tmp_path / "text.jpg").startswith("unreadable")
    with pytest.raises(ImageReadError, match=r"trunc\.jpg: truncated"):
        load_rgb(tmp_path / "trunc.jpg")


def test_detect_classifies_test_images_with_the_shipped_detector(dataset_copy: Path, tiny_spm: Path, script,
                                                                  monkeypatch) -> None:
    import traffic_retrieval.indexing as indexing
    from traffic_retrieval.detection import DEMO_DET_CHECKPOINT, DEMO_DET_CONFIG, load_true_categories

    root = Path(__file__).resolve().parents[1]
    test_dir = dataset_copy / "test"
    args = ("--detect", "--det_config", str(root / DEMO_DET_CONFIG), "--det_checkpoint", str(root / DEMO_DET_CHECKPOINT))
    checked: list[str] = []
    real_check = indexing.check_image
    monkeypatch.setattr(indexing, "check_image", lambda p: checked.append(Path(p).name) or real_check(p))
    summary = _run(script, test_dir, tiny_spm, *args)
    assert sorted(checked) == sorted(p.name for p in (test_dir / "test_images").iterdir())  # each image checked once
    truth = {Path(k).name: v for k, v in load_true_categories(dataset_copy / "annotations" / "test_boxes.json").items()}
    written = dict(line.split("$") for line in (test_dir / "test_image_categories.txt").read_text().splitlines())
    rows = {Path(r["image_path"]).name: r["category"] for r in _jsonl(test_dir / "flickr30k.test.jsonl")}
    assert rows == {n: written.get(n) for n in rows}  # the index carries what the detector decided
    correct = sum(written.get(n) == c for n, c in truth.items())
    assert correct >= 0.9 * len(truth), (correct, len(truth))
    assert sum(summary["images"].values()) == 16
    # a second run is served from the cache: no detector is loaded
    cache = (test_dir / "det_test_cache.jsonl").read_text()
    _run(script, test_dir, tiny_spm, *args)
    assert (test_dir / "det_test_cache.jsonl").read_text() == cache
