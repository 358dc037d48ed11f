"""The demo driver (code/demo.py): dataset reuse rules, and the whole pipeline on a tiny dataset end to end."""

from __future__ import annotations

import html
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_COUNTS


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


class StageCalled(Exception):
    """Raised by the stub runner at the demo's first stage, after it has (or has not) deleted anything."""


@pytest.fixture()
def first_stage(demo, monkeypatch: pytest.MonkeyPatch) -> list:
    """Stops ``demo.main`` at its first stage (the dataset or the tokenizer) and records that stage's arguments."""
    calls: list = []

    class StubRunner(demo["Runner"]):
        def run(self, name: str, script: str, args: list[str], capture: bool = False) -> str:
            calls.append((name, args))
            raise StageCalled(name)

    monkeypatch.setitem(demo["main"].__globals__, "Runner", StubRunner)
    return calls


def _min_args(demo, data: Path, out: Path, *more: str) -> list[str]:
    sizes = [x for k, (least, _) in demo["MIN_IMAGES"].items() for x in (f"--{k}", str(least))]
    return ["--data", str(data), "--out", str(out), *sizes, "--epochs", "1", *more]


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_folders_the_demo_did_not_make_are_refused_and_kept(demo, first_stage, tmp_path: Path, fresh) -> None:
    """A typo'd --data / --out (a user's dataset, the source tree) must never be cleared, with or without --fresh."""
    data, out = tmp_path / "mydata", tmp_path / "myout"
    label = data / "train" / "train_label.txt"
    label.parent.mkdir(parents=True)
    label.write_text("a.jpg$red Audi Sedan.$A red Audi Sedan.\n")
    out.mkdir()
    (out / "my_submission.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--data .*mydata is not empty and holds no demo dataset.*"
                                         r"--out .*myout is not empty and holds no demo outputs"):
        demo["main"](_min_args(demo, data, out, *fresh))
    assert label.read_text().startswith("a.jpg$") and (out / "my_submission.json").read_text() == "{}"
    assert not first_stage and sorted(p.name for p in out.iterdir()) == ["my_submission.json"]
    with pytest.raises(SystemExit, match="separate folders, neither inside the other"):
        demo["main"](_min_args(demo, tmp_path / "new", tmp_path / "new" / "runs", *fresh))
    assert not (tmp_path / "new").exists()


def test_a_tokenizer_the_demo_did_not_train_is_never_overwritten(demo, first_stage, tmp_path: Path) -> None:
    official = tmp_path / "beit3.spm"  # e.g. --spm model_pth/beit3.spm by mistake
    official.write_bytes(b"the official tokenizer")
    with pytest.raises(SystemExit, match=r"--spm .*beit3.spm exists and was not trained by the demo"):
        demo["main"](_min_args(demo, tmp_path / "data", tmp_path / "out", "--spm", str(official)))
    assert official.read_bytes() == b"the official tokenizer" and not first_stage
    (tmp_path / "beit3.spm.demo").write_text("")  # the marker of a tokenizer an earlier demo run trained
    with pytest.raises(StageCalled):
        demo["main"](_min_args(demo, tmp_path / "data", tmp_path / "out", "--spm", str(official)))


def test_outputs_of_older_demos_are_recognised(demo, tmp_path: Path) -> None:
    for name in (demo["OUT_MARKER"], "train_recipe.json", "det_train.log"):  # det_train.log: stopped before training
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("")
        assert demo["is_demo_outputs"](out), name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "det_val.txt").write_text("")
    assert not demo["is_demo_outputs"](tmp_path / "other")


def test_fresh_clears_the_demos_own_folders(demo, first_stage, tiny_dataset: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_dataset, data)
    old = out / "pt_out_car" / "checkpoint-best.pth"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    (out / "train_recipe.json").write_text("{}")  # the outputs of a demo.py older than the marker file
    with pytest.raises(StageCalled, match="dataset"):
        demo["main"](_min_args(demo, data, out, "--fresh"))
    assert not data.exists() and [p.name for p in out.iterdir()] == [demo["OUT_MARKER"]]
    assert "--force" not in first_stage[0][1]  # nothing left to replace


def test_a_new_dataset_replaces_only_a_demo_dataset(demo, first_stage, tiny_dataset: Path, tmp_path: Path) -> None:
    """The tiny dataset does not match the asked sizes: the outputs are cleared and the dataset replaced (--force),
    which the marker files allow; a folder without them is kept (the test above)."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(tiny_dataset, data)
    demo["make_out"](out)
    stale = out / "pt_out_people" / "checkpoint-7.pth"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    with pytest.raises(StageCalled, match="dataset"):
        demo["main"](_min_args(demo, data, out))
    assert not stale.exists() and (out / demo["OUT_MARKER"]).is_file()
    assert "--force" in first_stage[0][1] and (data / "meta.json").is_file()  # replaced by the stage, not before


@pytest.mark.parametrize("argv, message", [
    (["--n_train", "64"], "--n_train must be at least 66"),  # 32 cars, of which a dirty one is dropped: < 1 batch
    (["--n_val", "1"], "--n_val must be at least 2"),
    (["--n_test", "9"], "--n_test must be at least 10"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
])
def test_impossible_arguments_are_refused_before_any_stage(demo, first_stage, argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        demo["main"](argv)
    assert message in capsys.readouterr().err and not first_stage


def test_make_bench_command_line_parses(load_script) -> None:
    """``make bench`` runs benchmark.py with the Makefile's arguments: they must name a registered model."""
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (REPO_ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe, "no bench target in the Makefile"
    cmd = shlex.split(recipe.group(1))
    argv = cmd[cmd.index("code/benchmark.py") + 1:]
    assert not any("$(" in a for a in argv), argv
    args = load_script("benchmark")["parse_args"](argv)
    assert args.model == "beit3_tiny_patch8_64" and args.batch_size == 16  # the README's Performance command


def test_demo_runs_every_stage_and_starts_over_on_a_new_dataset(demo, tmp_path: Path) -> None:
    data, out, spm = tmp_path / "data", tmp_path / "out", tmp_path / "demo.spm"
    demo["make_out"](out)  # outputs of an earlier demo run
    stale = out / "pt_out_people" / "checkpoint-7.pth"  # from an earlier dataset: must not be resumed
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    # the smallest sizes parse_args accepts, which must run through every stage
    args = _min_args(demo, data, out, "--spm", str(spm))
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
