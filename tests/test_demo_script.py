"""The demo driver (code/demo.py): dataset reuse rules, and the whole pipeline on a tiny dataset end to end."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY_COUNTS


@pytest.fixture(scope="module")
def demo(load_script):
    return load_script("demo")


def test_dataset_matches_seed_counts_and_version(demo, tiny_dataset: Path, tmp_path: Path) -> None:
    match = demo["dataset_matches"]
    assert match(tiny_dataset, 0, dict(TINY_COUNTS))
    assert not match(tiny_dataset, 1, dict(TINY_COUNTS))  # another seed
    assert not match(tiny_dataset, 0, {**TINY_COUNTS, "n_train": TINY_COUNTS["n_train"] + 2})
    assert not match(tiny_dataset, 0, {k: None for k in TINY_COUNTS})  # the defaults are larger
    old = tmp_path / "old"
    shutil.copytree(tiny_dataset, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "version": meta["version"] - 1}))
    assert not match(old, 0, dict(TINY_COUNTS))  # drawn by an earlier generator
    assert not match(tmp_path / "missing", 0, dict(TINY_COUNTS))


def test_training_runs_of_another_recipe_are_not_resumed(demo, tmp_path: Path) -> None:
    """Finished runs are resumed (nothing to redo) only under the same recipe; else they are removed first."""
    recipe, reset = demo["training_recipe"], demo["reset_training_if_recipe_changed"]
    run = tmp_path / "pt_out_people" / "checkpoint-29.pth"
    run.parent.mkdir()
    run.write_bytes(b"weights")
    reset(tmp_path, recipe(0, {"car": 34, "people": 30}))  # no record: runs of an older demo.py
    assert not run.parent.exists()
    run.parent.mkdir()
    run.write_bytes(b"weights")
    reset(tmp_path, recipe(0, {"car": 34, "people": 30}))
    assert run.is_file()  # same recipe: kept, --auto_resume finds it finished
    reset(tmp_path, recipe(0, {"car": 34, "people": 31}))
    assert not run.parent.exists()
    assert json.loads((tmp_path / "train_recipe.json").read_text())["epochs"] == {"car": 34, "people": 31}

def test_demo_runs_every_stage_and_starts_over_on_a_new_dataset(demo, tmp_path: Path) -> None:
    data, out, spm = tmp_path / "data", tmp_path / "out", tmp_path / "demo.spm"
    out.mkdir()
    stale = out / "pt_out_people" / "checkpoint-7.pth"  # from an earlier dataset: must not be resumed
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    args = ["--data", str(data), "--out", str(out), "--spm", str(spm), "--n_train", "80", "--n_val", "12",
            "--n_test", "16", "--epochs", "1"]
    scores = demo["main"](args)
    assert not stale.exists()
    sub = json.loads((out / "infer_json_all.json").read_text())
    queries = (data / "test" / "test_text.txt").read_text(encoding="utf-8").splitlines()
    assert [r["text"] for r in sub["results"]] == queries
    assert all(len(r["image_names"]) == 10 for r in sub["results"])
    assert json.loads((out / "metrics.json").read_text()) == scores
    for key in ("official_map10", "r1"):
        for part in (scores, scores["car"], scores["people"], scores["random"]):
            assert 0.0 <= part[key] <= 1.0
    for c in ("car", "people"):
        assert (out / f"pt_out_{c}" / "checkpoint-best.pth").is_file()
        assert (out / f"pt_out_{c}" / "training_curves.png").stat().st_size > 0
        first_query = (out / f"queries_{c}.txt").read_text(encoding="utf-8").splitlines()[0]
        assert html.escape(first_query) in (out / f"contact_sheet_{c}.html").read_text(encoding="utf-8")
    assert spm.is_file()
