"""Shared test fixtures: a tiny generated dataset, a tokenizer trained on it, and file-hash helpers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from traffic_retrieval.demo_data import generate

TINY_COUNTS = {"n_train": 24, "n_val": 12, "n_test": 16}


def tree_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path (to prove a stage changed nothing)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo-style dataset (read-only: copy it with ``dataset_copy`` before running a stage that writes)."""
    root = tmp_path_factory.mktemp("tiny") / "demo"
    generate(root, seed=0, style="demo", min_size=48, max_size=64, **TINY_COUNTS)
    return root


@pytest.fixture()
def dataset_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``tiny_dataset``."""
    dst = tmp_path / "demo"
    shutil.copytree(tiny_dataset, dst)
    return dst


@pytest.fixture()
def gallery_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny test images at ``<tmp>/gallery/photos`` (caches next to it and added files must
    not touch the shared dataset)."""
    dst = tmp_path / "gallery" / "photos"
    shutil.copytree(tiny_dataset / "test" / "test_images", dst)
    return dst


@pytest.fixture(scope="session")
def tiny_spm(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sentencepiece model trained on the tiny dataset's captions and queries."""
    from traffic_retrieval.labels import read_label_file_strict, read_test_text
    from traffic_retrieval.tokenizer import train_sentencepiece

    texts = [r.caption for split in ("train", "val")
             for r in read_label_file_strict(tiny_dataset / "train" / f"{split}_label.txt")]
    texts += read_test_text(tiny_dataset / "test" / "test_text.txt")
    return train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "tiny.spm", vocab_size=120)


@pytest.fixture()
def hash_tree():
    """The :func:`tree_hashes` helper as a fixture, so test modules need not import conftest."""
    return tree_hashes


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """Load a stage script ``code/<name>.py`` (not a package module) and return its namespace dict."""
    import runpy

    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = runpy.run_path(str(REPO_ROOT / "code" / f"{name}.py"), run_name=f"{name}_under_test")
        return cache[name]

    return load
