"""code/search.py on the tiny test images: the ranking, the printed table, the HTML contact sheet, the gallery cache
and bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import traffic_retrieval.inference as inference
from traffic_retrieval.categories import text_category
from traffic_retrieval.checkpoint import load_weights
from traffic_retrieval.encoding import encode_images, encode_texts, list_images
from traffic_retrieval.labels import read_ground_truth, read_test_text
from traffic_retrieval.metrics import official_ap
from traffic_retrieval.modeling import create_model
from traffic_retrieval.search import default_cache_dir
from traffic_retrieval.tokenizer import Tokenizer
from traffic_retrieval.transforms import eval_transform

MODEL = "beit3_nano_patch16_32"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": create_model(MODEL).state_dict()}, path)
    return path


@pytest.fixture()
def images(gallery_copy) -> Path:
    return gallery_copy


@pytest.fixture()
def search(load_script, ckpt, tiny_spm):
    main = load_script("search")["main"]

    def run(images: Path, *extra: str):
        return main(["--images", str(images), "--model", MODEL, "--finetune", str(ckpt), "--sentencepiece_model",
                     str(tiny_spm), "--device", "cpu", *extra])

    return run


@pytest.fixture()
def spy(monkeypatch) -> list[int]:
    """Number of images per real encode_images call made by the gallery cache."""
    calls: list[int] = []
    real = inference.encode_images

    def counting(model, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_images", counting)
    return calls


def _brute_force(ckpt: Path, spm: Path, images: Path, texts: list[str], k: int, pad: int = 0
                 ) -> list[list[tuple[str, float]]]:
    model = create_model(MODEL)
    load_weights(model, ckpt)
    paths = list_images(images)
    img = encode_images(model, paths, eval_transform(32, pad)).features
    sims = encode_texts(model, Tokenizer(spm), texts) @ img.T
    order = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k]
    return [[(paths[j].name, sims[i, j].item()) for j in row] for i, row in enumerate(order.tolist())]


def test_search_table_html_and_hits(tiny_dataset, images, search, ckpt, tiny_spm, tmp_path, capsys):
    queries = read_test_text(tiny_dataset / "test" / "test_text.txt")[:3]
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n")
    gt_file = tiny_dataset / "test" / "test_gt.txt"
    out = tmp_path / "out"
    results = search(images, "--queries", str(qfile), "--k", "5", "--gt", str(gt_file), "--output_dir", str(out),
                     "--json", str(out / "results.json"))

    # the ranking equals a brute-force full score matrix
    ref = _brute_force(ckpt, tiny_spm, images, queries, 5)
    relevant = dict(read_ground_truth(gt_file))
    assert [r.text for r in results] == queries
    for r, want in zip(results, ref):
        assert [h.name for h in r.hits] == [n for n, _ in want]
        assert [h.score for h in r.hits] == pytest.approx([s for _, s in want], abs=1e-5)
        assert [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
        assert [h.relevant for h in r.hits] == [h.name in relevant[r.text] for h in r.hits]
        assert r.official_ap == official_ap([h.name for h in r.hits], relevant[r.text])

    printed = capsys.readouterr().out
    for r in results:
        assert r.text in printed and f"official AP {r.official_ap:.4f}" in printed
        for h in r.hits:
            assert re.search(rf"{h.rank}\s+{h.score:.4f}\s+{'hit' if h.relevant else 'miss'}\s+{re.escape(h.name)}",
                             printed)

    page = (out / "search.html").read_text()
    # self-contained: every image is an embedded JPEG, one per distinct result image, no file references
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 15 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    thumb = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert "file:" not in page and "href=" not in page and "<link" not in page
    n_hits = sum(h.relevant for r in results for h in r.hits)
    assert page.count('class="result hit"') == n_hits and page.count('class="result miss"') == 15 - n_hits
    for r in results:
        assert r.text in page and f"official AP {r.official_ap:.4f}" in page
    assert (out / "cache").is_dir()  # --output_dir also hosts the cache

    # --json: the same results, machine-readable
    data = json.loads((out / "results.json").read_text())
    assert [q["text"] for q in data["results"]] == queries and str(ckpt) in data["info"].values()
    for q, r in zip(data["results"], results):
        assert q["official_ap"] == r.official_ap and q["category"] is None
        assert [(h["rank"], h["name"], h["score"], h["relevant"]) for h in q["hits"]] == \
            [(h.rank, h.name, h.score, h.relevant) for h in r.hits]
        assert all(Path(h["path"]) == images / h["name"] for h in q["hits"])


def test_queries_go_to_the_model_of_their_category(tiny_dataset, images, load_script, ckpt, tiny_spm, tmp_path):
    """--finetune_car / --finetune_people: each query is ranked by its category's model (the people one with the
    padding it was validated with), in the order of the queries; one contact sheet names both checkpoints."""
    torch.manual_seed(3)
    people_ckpt = tmp_path / "people.pth"
    torch.save({"model": create_model(MODEL).state_dict(), "args": {"data": {"category": "people", "people_pad": 6}}},
               people_ckpt)
    texts = read_test_text(tiny_dataset / "test" / "test_text.txt")
    cats = [text_category(t) for t in texts]
    people = [t for t, c in zip(texts, cats) if c == "people"]
    queries = [people[0], texts[cats.index("car")], people[-1]]  # people, car, people: the order must be kept
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(queries) + "\n")
    out = tmp_path / "out"
    results = load_script("search")["main"](
        ["--images", str(images), "--queries", str(qfile), "--model", MODEL, "--finetune_car", str(ckpt),
         "--finetune_people", str(people_ckpt), "--sentencepiece_model", str(tiny_spm), "--device", "cpu", "--k", "4",
         "--output_dir", str(out)])
    assert [r.text for r in results] == queries
    for r, q in zip(results, queries):
        want = (_brute_force(people_ckpt, tiny_spm, images, [q], 4, pad=6) if text_category(q) == "people"
                else _brute_force(ckpt, tiny_spm, images, [q], 4))[0]
        assert [h.name for h in r.hits] == [n for n, _ in want]
        assert [h.score for h in r.hits] == pytest.approx([sc for _, sc in want], abs=1e-5)
    assert [r.category for r in results] == [text_category(q) for q in queries]  # says which model answered
    page = (out / "search.html").read_text()
    assert str(people_ckpt) in page and str(ckpt) in page and "(people model)" in page and "(car model)" in page
    assert len(list((out / "cache").glob("gallery_*.pt"))) == 2  # one cache per model

    # --category: the user chooses the model, e.g. for a query the text rule cannot place
    forced = load_script("search")["main"](
        ["--images", str(images), "--queries", str(qfile), "--model", MODEL, "--finetune_car", str(ckpt),
         "--finetune_people", str(people_ckpt), "--sentencepiece_model", str(tiny_spm), "--device", "cpu", "--k", "4",
         "--output_dir", str(out), "--category", "car"])
    assert [r.category for r in forced] == ["car"] * 3
    want = _brute_force(ckpt, tiny_spm, images, queries, 4)
    assert [[h.name for h in r.hits] for r in forced] == [[n for n, _ in w] for w in want]
    # no query for the people model: it is not loaded and the gallery is not encoded with it
    assert str(people_ckpt) not in (out / "search.html").read_text()


def test_a_query_without_its_category_model_fails_before_loading(tiny_dataset, images, load_script, ckpt,
                                                                 tiny_spm, tmp_path):
    main = load_script("search")["main"]
    people_query = next(t for t in read_test_text(tiny_dataset / "test" / "test_text.txt")
                        if text_category(t) == "people")
    argv = ["--images", str(images), "--query", people_query, "--model", MODEL, "--sentencepiece_model",
            str(tiny_spm), "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--finetune_car", str(ckpt)])
    assert "query 1" in str(e.value.code) and "no people model" in str(e.value.code)
    assert "--finetune_people" in str(e.value.code) and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--finetune", str(ckpt), "--finetune_people", str(ckpt)])
    assert e.value.code == 2


def test_gallery_cache_is_reused(images, search, spy, tmp_path):
    cache_dir = tmp_path / "cache"
    args = ("--query", "A red BMW Sedan.", "--cache_dir", str(cache_dir), "--html", str(tmp_path / "a.html"))
    first = search(images, *args)
    assert spy == [16]
    (cache_file,) = cache_dir.iterdir()
    mtime = cache_file.stat().st_mtime_ns

    spy.clear()
    second = search(images, *args)
    assert spy == [] and cache_file.stat().st_mtime_ns == mtime  # nothing encoded, cache untouched
    assert [(h.name, h.score) for h in second[0].hits] == [(h.name, h.score) for h in first[0].hits]

    # A new image in the folder: only it is encoded, and it can be found.
    shutil.copy(images / first[0].hits[0].name, images / "zz_copy.jpg")
    spy.clear()
    third = search(images, *args, "--k", "16")
    assert spy == [1]
    assert "zz_copy.jpg" in [h.name for h in third[0].hits]



def test_interrupted_gallery_encoding_resumes(images, ckpt, spy, tmp_path):
    """Progress is saved while encoding and on Ctrl-C: a rerun encodes only the rest and gets a clean run's features."""
    model = create_model(MODEL)
    load_weights(model, ckpt)
    paths = list_images(images)
    spec = inference.FeatureSpec.create(ckpt, MODEL, 32, "fp32")
    cache = tmp_path / "cache.pt"
    real_encode, seen = model.encode_image, []

    def encode_then_stop(x):
        if len(seen) == 2:  # third batch: stop, after noting what the periodic saves have written so far
            seen.append(len(torch.load(cache, weights_only=True)["entries"]))
            raise KeyboardInterrupt
        seen.append(len(x))
        return real_encode(x)

    model.encode_image = encode_then_stop
    with pytest.raises(KeyboardInterrupt):
        inference.encode_gallery(model, paths, spec, cache, batch_size=4, device=torch.device("cpu"),
                                 precision="fp32", save_every_s=0)
    assert seen[:2] == [4, 4] and seen[2] in (4, 8)  # saved after batch 1 (and 2, unless saving was the slower)
    assert [e[0] for e in torch.load(cache, weights_only=True)["entries"]] == [p.name for p in paths[:8]]

    model.encode_image = real_encode
    spy.clear()
    resumed = inference.encode_gallery(model, paths, spec, cache, batch_size=4, device=torch.device("cpu"),
                                       precision="fp32")
    assert spy == [len(paths) - 8]
    clean = encode_images(model, paths, eval_transform(32), batch_size=4)
    assert resumed.paths == clean.paths
    torch.testing.assert_close(resumed.features, clean.features, rtol=0, atol=1e-6)



def test_unwritable_cache_is_reported_not_fatal(images, search, tmp_path, caplog):
    """A cache folder that cannot be made (here: under a file; a read-only mount alike) costs only the caching."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level("WARNING"):
        results = search(images, "--query", "A red BMW Sedan.", "--cache_dir", str(blocker / "cache"),
                         "--html", str(tmp_path / "p.html"), "--k", "3")
    assert len(results[0].hits) == 3 and (tmp_path / "p.html").is_file()
    assert caplog.text.count("cannot write the feature cache") == 1 and str(blocker / "cache") in caplog.text

def test_default_cache_dir(images, search, tmp_path):
    assert default_cache_dir(images) == images.resolve().parent / ".search_cache"
    assert default_cache_dir(images, tmp_path / "o") == tmp_path / "o" / "cache"
    search(images, "--query", "A man with a hat.", "--html", str(tmp_path / "p.html"))
    assert len(list((images.parent / ".search_cache").glob("gallery_photos_*.pt"))) == 1


def test_the_best_checkpoint_of_a_plain_training_run_by_its_tag_name(images, search, ckpt, tmp_path):
    run = tmp_path / "pt_out_car"
    run.mkdir()
    shutil.copy(ckpt, run / "checkpoint-best.pth")  # what run_beit3_finetuning.py writes without DeepSpeed
    common = ["--query", "A white Audi Sedan.", "--no_cache", "--html", str(tmp_path / "p.html")]
    by_tag = search(images, *common, "--finetune", str(run / "checkpoint-best"))
    by_file = search(images, *common)
    assert [h.name for h in by_tag[0].hits] == [h.name for h in by_file[0].hits]


def test_query_without_ground_truth_has_no_marks(tiny_dataset, images, search, tmp_path, capsys):
    results = search(images, "--query", "A purple unicorn.", "--gt", str(tiny_dataset / "test" / "test_gt.txt"),
                     "--html", str(tmp_path / "p.html"), "--k", "3")
    assert results[0].official_ap is None and all(h.relevant is None for h in results[0].hits)
    assert "class=\"result hit\"" not in (tmp_path / "p.html").read_text()
    assert "  -   " in capsys.readouterr().out


def test_a_query_loses_its_outer_whitespace_as_query_files_do(load_script):
    args = load_script("search")["parse_args"](["--images", "d", "--query", "  A white Audi Sedan. ", "--finetune",
                                                "c.pth"])
    assert args.query == "A white Audi Sedan."


def test_bad_input(search, load_script, tmp_path, tiny_spm):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        search(empty, "--query", "x", "--html", str(tmp_path / "p.html"))
    assert "no image file" in str(e.value.code) and str(empty) in str(e.value.code)

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (40, 30), "red").save(images / "a.jpg")
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": create_model("beit3_tiny_patch8_64").state_dict()}, wrong)
    main = load_script("search")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--images", str(images), "--query", "x", "--model", MODEL, "--finetune", str(wrong),
              "--sentencepiece_model", str(tiny_spm), "--device", "cpu", "--html", str(tmp_path / "p.html")])
    assert "--finetune" in str(e.value.code) and "does not fit the model" in str(e.value.code)

    with pytest.raises(SystemExit):  # neither --query nor --queries
        load_script("search")["parse_args"](["--images", str(images), "--finetune", str(wrong)])
