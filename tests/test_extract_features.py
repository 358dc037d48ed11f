"""code/extract_features.py on a tiny checkpoint, a folder with a bad image, and a text file with empty lines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from traffic_retrieval.modeling import create_model
from traffic_retrieval.tokenizer import Tokenizer
from traffic_retrieval.transforms import eval_transform


@pytest.fixture()
def setup(tmp_path, tiny_spm):
    torch.manual_seed(0)
    model = create_model("beit3_nano_patch16_32").eval()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.jpg", "a.png"):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(imgs / name)
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).convert("L").save(imgs / "c_gray.jpg")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (imgs / "notes.txt").write_text("not an image")
    texts = tmp_path / "q.txt"
    texts.write_bytes("\ufeffA black BESTUNE Sedan.\r\n\r\nA walking man with a backpack.\r\n\n\n".encode())
    return model, tmp_path


def test_writes_normalised_features_equal_to_the_model(setup, tiny_spm, load_script, caplog):
    model, tmp = setup
    main = load_script("extract_features")["main"]
    out = tmp / "out" / "f.npz"
    main(["--model", "beit3_nano_patch16_32", "--finetune", str(tmp / "ckpt.pth"), "--sentencepiece_model",
          str(tiny_spm), "--images", str(tmp / "imgs"), "--texts", str(tmp / "q.txt"), "--out", str(out),
          "--device", "cpu", "--batch_size", "2", "--threads", "1"])
    f = np.load(out)
    assert f["image_names"].tolist() == ["a.png", "b.jpg", "c_gray.jpg"]  # broken.jpg reported, notes.txt ignored
    assert f["texts"].tolist() == ["A black BESTUNE Sedan.", "A walking man with a backpack."]
    assert f["image_features"].dtype == np.float32 and f["image_features"].shape == (3, 64)
    assert np.allclose(np.linalg.norm(f["image_features"], axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(f["text_features"], axis=1), 1, atol=1e-5)
    assert "broken.jpg" in caplog.text and "q.txt:2: blank line" in caplog.text
    # the same numbers as encoding directly with the eval transform
    from traffic_retrieval.images import load_rgb

    x = torch.stack([eval_transform(32)(load_rgb(tmp / "imgs" / n)) for n in ("a.png", "b.jpg", "c_gray.jpg")])
    tokens, mask = Tokenizer(tiny_spm)(f["texts"].tolist())
    with torch.no_grad():
        assert np.allclose(f["image_features"], model.encode_image(x).numpy(), atol=1e-5)
        assert np.allclose(f["text_features"], model.encode_text(tokens, mask).numpy(), atol=1e-5)


def test_wrong_checkpoint_is_a_clear_error(setup, tiny_spm, load_script):
    _, tmp = setup
    main = load_script("extract_features")["main"]
    with pytest.raises(SystemExit, match="model size differs"):
        main(["--model", "beit3_tiny_patch8_64", "--finetune", str(tmp / "ckpt.pth"), "--texts", str(tmp / "q.txt"),
              "--sentencepiece_model", str(tiny_spm), "--out", str(tmp / "x.npz"), "--device", "cpu"])
    assert not (tmp / "x.npz").exists()


def test_texts_split_on_line_feeds_only_and_bad_input_fails_before_encoding(setup, tiny_spm, load_script, caplog,
                                                                             monkeypatch):
    import traffic_retrieval.inference as inference

    _, tmp = setup
    main = load_script("extract_features")["main"]
    texts = tmp / "t.txt"
    texts.write_bytes("A white Audi.\u2028continued\x0b here\n".encode() + b"bad \xff byte\nA man.\n")
    common = ["--model", "beit3_nano_patch16_32", "--finetune", str(tmp / "ckpt.pth"), "--sentencepiece_model",
              str(tiny_spm), "--device", "cpu", "--out", str(tmp / "t.npz")]
    main([*common, "--texts", str(texts)])
    assert np.load(tmp / "t.npz")["texts"].tolist() == ["A white Audi.\u2028continued\x0b here", "A man."]
    assert f"{texts}:2: not valid UTF-8" in caplog.text

    monkeypatch.setattr(inference, "encode_images", lambda *a, **k: pytest.fail("encoded images before the error"))
    for bad, expected in ((["--texts", str(tmp / "nope.txt")], "text file not found"),
                          (["--texts", str(texts), "--sentencepiece_model", str(tmp / "nope.spm")], "nope.spm")):
        with pytest.raises(SystemExit, match=expected):
            main([*common, "--images", str(tmp / "imgs"), *bad])
    with pytest.raises(SystemExit):
        main([*common, "--images", str(tmp / "imgs"), "--batch_size", "0"])
    mac = tmp / "mac.txt"
    mac.write_bytes(b"A white Audi.\rA man walking.\r")  # old Mac line ends: one line with CRs inside
    with pytest.raises(SystemExit, match=r"no usable text in .*mac.txt .*carriage return inside the line"):
        main([*common, "--images", str(tmp / "imgs"), "--texts", str(mac)])


def test_image_features_are_cached(setup, tiny_spm, load_script, monkeypatch):
    """A rerun reads the cache (shared with search.py, next to the folder) and encodes only a new image."""
    import traffic_retrieval.inference as inference

    _, tmp = setup
    main = load_script("extract_features")["main"]
    calls: list[int] = []
    real = inference.encode_images
    monkeypatch.setattr(inference, "encode_images", lambda m, paths, *a, **k: calls.append(len(paths)) or
                        real(m, paths, *a, **k))
    run = lambda out, *extra: main(["--model", "beit3_nano_patch16_32", "--finetune", str(tmp / "ckpt.pth"),  # noqa
                                    "--images", str(tmp / "imgs"), "--out", str(tmp / out), "--device", "cpu", *extra])
    run("first.npz")
    assert calls == [4] and len(list((tmp / ".search_cache").glob("gallery_imgs_*.pt"))) == 1
    Image.open(tmp / "imgs" / "a.png").save(tmp / "imgs" / "d.png")
    run("second.npz")
    assert calls == [4, 1]  # only the new image (broken.jpg stays recorded as unreadable)
    first, second = np.load(tmp / "first.npz"), np.load(tmp / "second.npz")
    assert second["image_names"].tolist() == ["a.png", "b.jpg", "c_gray.jpg", "d.png"]
    assert np.array_equal(second["image_features"][:3], first["image_features"])
    assert np.allclose(second["image_features"][3], first["image_features"][0], atol=1e-6)  # another batch

    run("third.npz", "--no_cache", "--cache_dir", str(tmp / "unused"))
    assert calls == [4, 1, 5] and not (tmp / "unused").exists()

    (tmp / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image file"):
        main(["--model", "beit3_nano_patch16_32", "--finetune", str(tmp / "ckpt.pth"), "--images", str(tmp / "empty"),
              "--out", str(tmp / "x.npz"), "--device", "cpu"])


def test_search_and_extract_keep_their_own_caches(setup, tiny_spm, load_script, monkeypatch):
    """A people checkpoint validated with side padding: search.py encodes with it, extract_features.py without; each
    keeps its own cache file next to the folder, so alternating between the tools encodes nothing again."""
    import traffic_retrieval.inference as inference

    model, tmp = setup
    ckpt = tmp / "people.pth"
    torch.save({"model": model.state_dict(), "args": {"data": {"category": "people", "people_pad": 4}}}, ckpt)
    calls: list[int] = []
    real = inference.encode_images
    monkeypatch.setattr(inference, "encode_images", lambda m, paths, *a, **k: calls.append(len(paths)) or
                        real(m, paths, *a, **k))
    common = ["--model", "beit3_nano_patch16_32", "--finetune", str(ckpt), "--images", str(tmp / "imgs"),
              "--sentencepiece_model", str(tiny_spm), "--device", "cpu"]
    search = lambda: load_script("search")["main"]([*common, "--query", "A man.", "--k", "2",  # noqa: E731
                                                    "--html", str(tmp / "s.html")])
    extract = lambda: load_script("extract_features")["main"]([*common, "--out", str(tmp / "f.npz")])  # noqa: E731
    search(), extract()
    assert calls == [4, 4] and len(list((tmp / ".search_cache").glob("gallery_imgs_*.pt"))) == 2
    search(), extract()
    assert calls == [4, 4]  # both read their own cache
    pads = sorted(torch.load(f)["spec"]["pad"] for f in (tmp / ".search_cache").glob("gallery_imgs_*.pt"))
    assert pads == [0, 4]
