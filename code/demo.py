"""The whole pipeline on a synthetic traffic dataset, on the CPU, with the same scripts a user runs on real data.

Stages, in the original's order (each is a subprocess running the script named in the README):
    0. make_demo_dataset.py      -> dataset/demo/ (raw challenge layout + test ground truth + true boxes)
       train_tokenizer.py        -> model_pth/demo/beit3_demo.spm (beit3.spm cannot be downloaded here)
    1. train_det_cls.py, val_det_cls.py with the shipped demo RTMDet -> cleaned labels, links, reports
    2. data2flickr30k.py         -> per-category Karpathy json + jsonl indexes
    3. run_beit3_finetuning.py --category car (tiny BEiT-3 from scratch), then --category people fine-tuned from the
       car model (it stands in for the pretrained checkpoint a real run starts from)
    4. jsonl_test.py --detect    -> test index; test image categories by the detector
    5. infer.py                  -> runs/demo/infer_json_all.json (+ car / people files)
    then evaluate.py (official mAP@10, R@K, random baseline) and search.py (HTML contact sheets).
Everything is written under ``dataset/demo/`` and ``runs/demo/``. Re-running reuses the dataset and the detection
cache and resumes finished training runs; ``--fresh`` starts over. The demo deletes only folders it made itself (a
dataset with the generator's ``meta.json``, outputs with the demo's marker file): any other non-empty ``--data`` or
``--out`` is refused before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from traffic_retrieval.demo_data import (
    DEFAULT_COUNTS,
    DEFAULT_DIRTY_FRACTION,
    GENERATOR,
    GENERATOR_VERSION,
    dirty_count,
    is_demo_dataset,
    read_meta,
)
from traffic_retrieval.fileio import write_json, write_text

log = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
DET_CONFIG = "model_pth/demo/rtmdet_tiny_demo.py"
DET_CHECKPOINT = "model_pth/demo/rtmdet_tiny_demo.pth"
CATEGORIES = ("car", "people")
# The demo recipe: a 4-layer, 128-wide BEiT-3 at 64 px (car from scratch, people from the car model).
MODEL = "beit3_tiny_patch8_64"
INPUT_SIZE = "64"
EPOCHS = {"car": 34, "people": 30}
# Real runs fine-tune both categories from the pretrained BEiT-3 retrieval checkpoint, which cannot be downloaded
# here. Trained from scratch, the pedestrian model often stalled: its text tower collapsed onto gender alone
# (captions that differ in view, hat or backpack ended at cosine 1.000), a symmetric plateau some seeds never left.
# Started from the car model, whose text tower already reads its tokens, 30 epochs gave 0.984/0.899/0.831 official
# test mAP@10 for people (seeds 0/1/2, this recipe; README, "The demo on a CPU"). So the car model is trained first
# and stands in for the pretrained checkpoint of the pedestrian one.
FINETUNE_FROM = {"people": "car"}
# Vehicles keep the official random crop; pedestrians are only resized, since a crop cuts off the hat a caption names.
TRAIN_CROP = {"car": "official", "people": "resize"}
WARMUP_EPOCHS = 2
BATCH_SIZE = 32
TRAIN_FLAGS = ["--batch_size", str(BATCH_SIZE), "--lr", "5e-4", "--min_lr", "1e-5",
               "--layer_decay", "1.0", "--weight_decay", "0.05", "--drop_path", "0.0", "--save_ckpt_freq", "100",
               "--people_pad", "0", "--dedup", "relevance"]
# Written into --out when the demo makes it: only a folder holding it (or, from a demo.py older than the marker,
# train_recipe.json) is one the demo may clear.
OUT_MARKER = ".demo_outputs"
LEGACY_OUT_MARKER = "train_recipe.json"
DEFAULT_SPM = "model_pth/demo/beit3_demo.spm"
SPM_MARKER = ".demo"  # <spm>.demo next to a tokenizer the demo trained: a later run may overwrite it


def fewest_images(per_category: int) -> int:
    """The smallest split size (half vehicles, rounded down) that leaves every category ``per_category`` images
    after the cleaning stage has dropped the split's deliberately dirty ones, in the worst case all of one category."""
    n = 2 * per_category
    while n // 2 - dirty_count(n, DEFAULT_DIRTY_FRACTION) < per_category:
        n += 1
    return n


# The smallest dataset the pipeline runs through, and why: training stops when a category has fewer images than
# one batch (the loader drops a partial one), indexing when a category has no val image; test images are never dirty.
MIN_IMAGES: dict[str, tuple[int, str]] = {
    "n_train": (fewest_images(BATCH_SIZE), f"each category needs one training batch of {BATCH_SIZE} images after "
                                           "the cleaning stage drops the deliberately mislabelled ones"),
    "n_val": (fewest_images(1), "each category needs a val image after the cleaning stage"),
    "n_test": (10, "the random-ranking baseline draws 10 test images per query"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="dataset/demo", help="where the synthetic dataset goes (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="tokenizer, checkpoints, results, plots (default: %(default)s)")
    p.add_argument("--spm", default=DEFAULT_SPM,
                   help="where the tokenizer trained on the demo captions goes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process; training, which runs alone, gets threads x parallel "
                        "(default: %(default)s)")
    p.add_argument("--parallel", type=int, default=2, choices=(1, 2),
                   help="run the two categories' detection and search stages as parallel processes "
                        "(default: %(default)s)")
    for split in ("train", "val", "test"):
        p.add_argument(f"--n_{split}", type=int, default=None,
                       help=f"override the {split} images (quick runs; at least {MIN_IMAGES[f'n_{split}'][0]}, "
                            f"default {DEFAULT_COUNTS[split]})")
    p.add_argument("--epochs", type=int, default=None, help="override the training epochs (quick runs)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the demo dataset and outputs first (only folders the demo made; others are refused)")
    args = p.parse_args(argv)
    # Checked here, not by the stage that fails on them after minutes of dataset generation and detection.
    limits = {**MIN_IMAGES, "epochs": (1, "nothing would be trained"), "threads": (1, "torch needs a thread"),
              "seed": (0, "the dataset generator takes no negative seed")}
    for name, (least, why) in limits.items():
        value = getattr(args, name)
        if value is not None and value < least:
            p.error(f"--{name} must be at least {least}, got {value}: {why}")
    return args


class Runner:
    """Runs stage scripts as subprocesses from the repository root, logging each command and its time."""

    def __init__(self, out: Path, threads: int) -> None:
        self.out = out
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
        self.times: dict[str, float] = {}

    def _cmd(self, script: str, args: list[str]) -> list[str]:
        return [sys.executable, script, *args]

    def run(self, name: str, script: str, args: list[str], capture: bool = False) -> str:
        cmd = self._cmd(script, args)
        log.info("[%s] %s", name, shlex.join(cmd[1:]))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=self.env, text=True,
                             stdout=subprocess.PIPE if capture else None)
        self.times[name] = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"demo: stage {name!r} failed (exit {res.returncode}): {shlex.join(cmd[1:])}")
        return res.stdout or ""

    def run_parallel(self, jobs: list[tuple[str, str, list[str]]], parallel: int) -> None:
        """Run jobs two at a time (one torch thread each: on 2 cores that beats one job with 2 threads)."""
        if parallel == 1:
            for name, script, args in jobs:
                self.run(name, script, args)
            return
        procs = []
        for name, script, args in jobs:
            cmd = self._cmd(script, args)
            logfile = self.out / f"{name}.log"
            log.info("[%s] %s  (log: %s)", name, shlex.join(cmd[1:]), logfile)
            f = open(logfile, "w")
            procs.append((name, f, time.perf_counter(),
                          subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT)))
        failed = []
        while procs:  # poll, so that each job's own time is recorded, not the time until it was waited for
            time.sleep(0.2)
            for job in [j for j in procs if j[3].poll() is not None]:
                name, f, t0, proc = job
                f.close()
                self.times[name] = time.perf_counter() - t0
                if proc.returncode != 0:
                    failed.append(f"{name} (exit {proc.returncode}, see {self.out / (name + '.log')})")
                procs.remove(job)
        if failed:
            raise SystemExit("demo: failed: " + "; ".join(failed))


def dataset_matches(data: Path, seed: int, counts: dict[str, int | None]) -> bool:
    """Whether ``data`` holds the demo dataset this run asks for (generator version, seed, images per split)."""
    m = read_meta(data)
    if m is None or m.get("generator") != GENERATOR:
        return False
    have = {f"n_{split}": sum(m.get("counts", {}).get(split, {}).values()) for split in ("train", "val", "test")}
    want = {k: DEFAULT_COUNTS[k[2:]] if v is None else v for k, v in counts.items()}
    return (m.get("seed") == seed and m.get("style") == "demo" and m.get("version") == GENERATOR_VERSION
            and have == want)


def is_demo_outputs(out: Path) -> bool:
    """Whether ``out`` is an output folder this script made: its marker file, or from a demo.py older than the marker
    its recipe record, or (interrupted before training) the log of its first detection stage."""
    return any((out / name).is_file() for name in (OUT_MARKER, LEGACY_OUT_MARKER, "det_train.log"))


def check_folders(data: Path, out: Path) -> None:
    """Refuse, before anything is written or deleted, a ``--data`` or ``--out`` the demo may not replace: a file, or
    a non-empty folder it did not make (the demo replaces its dataset and clears its outputs when it starts over)."""
    problems = []
    a, b = data.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        problems.append(f"--data {data} and --out {out} must be separate folders, neither inside the other")
    for flag, path, ours, what in (
            ("--data", data, is_demo_dataset, f"holds no demo dataset (no meta.json written by {GENERATOR})"),
            ("--out", out, is_demo_outputs, f"holds no demo outputs (no {OUT_MARKER} or {LEGACY_OUT_MARKER})")):
        if path.exists() and not path.is_dir():
            problems.append(f"{flag} {path} is not a folder")
        elif path.is_dir() and any(path.iterdir()) and not ours(path):
            problems.append(f"{flag} {path} is not empty and {what}")
    if problems:
        raise SystemExit("demo: " + "; ".join(problems) + ". The demo replaces or deletes only folders it made "
                         "itself and leaves these as they are: choose a new or empty folder.")


def check_tokenizer(spm: Path) -> None:
    """Refuse to overwrite a tokenizer the demo did not train (e.g. ``--spm model_pth/beit3.spm``, the official one):
    only the default demo path, or a file with the demo's ``<spm>.demo`` marker, is rewritten."""
    if spm.exists() and spm.resolve() != (ROOT / DEFAULT_SPM).resolve() and not spm.with_name(
            spm.name + SPM_MARKER).is_file():
        raise SystemExit(f"demo: --spm {spm} exists and was not trained by the demo (no {spm.name}{SPM_MARKER} "
                         "next to it): the demo trains its own tokenizer and would overwrite it; choose another path")


def make_out(out: Path) -> None:
    """Create the output folder (if need be) with the marker that lets a later run clear it."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / OUT_MARKER, "Outputs of code/demo.py: it clears this folder for a new dataset or --fresh.\n")


def training_recipe(seed: int, epochs: dict[str, int]) -> dict:
    """What decides the demo's trained weights (not how many threads compute them)."""
    return {"model": MODEL, "input_size": INPUT_SIZE, "seed": seed, "epochs": epochs, "warmup_epochs": WARMUP_EPOCHS,
            "flags": TRAIN_FLAGS, "train_crop": TRAIN_CROP, "finetune_from": FINETUNE_FROM}


def reset_training_if_recipe_changed(out: Path, recipe: dict) -> None:
    """Training resumes finished runs (``--auto_resume``); runs of another recipe (an older version of this script,
    other ``--epochs``) are removed first, since resuming them would keep their weights under the new settings."""
    path = out / "train_recipe.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old != recipe:
        stale = [out / f"pt_out_{c}" for c in CATEGORIES] + [out / "logs"]
        if any(p.exists() for p in stale):
            log.info("[train] the training recipe changed since %s: training anew", path)
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)
        write_json(path, recipe, indent=1)


def print_summary(metrics: dict, times: dict[str, float], out: Path) -> None:
    rnd = metrics.get("random", {})
    rows = [("all", metrics, rnd)] + [(c, metrics.get(c, {}), rnd.get(c, {})) for c in CATEGORIES]
    print("\n=== demo results on the synthetic test set (official scorer) ===")
    print(f"{'category':<10}{'official mAP@10':>17}{'random':>9}{'x random':>10}{'R@1':>8}{'random R@1':>12}")
    for name, m, r in rows:
        if not m:
            continue
        ratio = m["official_map10"] / r["official_map10"] if r.get("official_map10") else float("nan")
        print(f"{name:<10}{m['official_map10']:>17.3f}{r.get('official_map10', float('nan')):>9.3f}{ratio:>10.1f}"
              f"{m['r1']:>8.3f}{r.get('r1', float('nan')):>12.3f}")
    print("\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"outputs: {out}/infer_json_all.json, {out}/pt_out_*/training_curves.png, {out}/contact_sheet_*.html")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    data, out = Path(args.data), Path(args.out)
    check_folders(ROOT / data, ROOT / out)
    check_tokenizer(ROOT / args.spm)
    if args.fresh:  # both are the demo's own (or empty) after check_folders
        for p in (data, out):
            shutil.rmtree(ROOT / p, ignore_errors=True)
    make_out(ROOT / out)
    r = Runner(ROOT / out, args.threads)
    t_start = time.perf_counter()
    spm = args.spm
    train_dir, test_dir = data / "train", data / "test"

    # 0. data and tokenizer
    counts = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    if dataset_matches(ROOT / data, args.seed, counts):
        log.info("[dataset] reusing %s", data)
    else:
        # Outputs of an earlier dataset belong to it: its checkpoints (which --auto_resume would refuse: other
        # index files), tokenizer and caches. The demo starts its training anew instead of stopping there.
        if any(p.name != OUT_MARKER for p in (ROOT / out).iterdir()):
            log.info("[dataset] new dataset: clearing the earlier outputs in %s", out)
            shutil.rmtree(ROOT / out)
            make_out(ROOT / out)
        extra = [x for k, v in counts.items() if v is not None for x in (f"--{k}", str(v))]
        # --force replaces only an earlier demo dataset (check_folders refused any other non-empty --data)
        force = ["--force"] if is_demo_dataset(ROOT / data) else []
        r.run("dataset", "code/make_demo_dataset.py", ["--out", str(data), "--seed", str(args.seed), *force, *extra])
    r.run("tokenizer", "code/train_tokenizer.py",
          ["--labels", str(train_dir / "train_label.txt"), str(train_dir / "val_label.txt"), "--out", spm])
    write_text(ROOT / (spm + SPM_MARKER), "Trained by code/demo.py, which may overwrite it on a later run.\n")

    # 1. detection and cleaning (train and val in parallel)
    det = ["--data_path", str(train_dir), "--det_config", DET_CONFIG, "--det_checkpoint", DET_CHECKPOINT,
           "--device", "cpu", "--threads", str(args.threads)]
    r.run_parallel([("det_train", "train_det_cls.py", det), ("det_val", "val_det_cls.py", det)], args.parallel)

    # 2. per-category indexes
    r.run("flickr30k_index", "code/data2flickr30k.py", ["--data_path", str(train_dir), "--sentencepiece_model", spm])

    # 3. fine-tuning: car from scratch, then people from the car model; each alone, so with every core
    epochs = {c: args.epochs if args.epochs is not None else EPOCHS[c] for c in CATEGORIES}
    reset_training_if_recipe_changed(ROOT / out, training_recipe(args.seed, epochs))
    for c in CATEGORIES:
        start = ["--finetune", str(out / f"pt_out_{FINETUNE_FROM[c]}" / "checkpoint-best.pth")] if c in FINETUNE_FROM \
            else []
        r.run(f"train_{c}", "code/run_beit3_finetuning.py",
              ["--category", c, "--model", MODEL, "--input_size", INPUT_SIZE, "--task", "flickr30k",
               "--data_path", str(train_dir), "--sentencepiece_model", spm, "--output_dir", str(out / f"pt_out_{c}"),
               "--log_dir", str(out / "logs" / c), "--seed", str(args.seed), "--device", "cpu",
               "--threads", str(args.threads * args.parallel), "--auto_resume", *start, *TRAIN_FLAGS,
               "--train_crop", TRAIN_CROP[c], "--epochs", str(epochs[c]),
               "--warmup_epochs", str(min(WARMUP_EPOCHS, epochs[c] - 1))])

    # 4. test index, with image categories from the detector
    r.run("test_index", "code/jsonl_test.py", ["--data_path", str(test_dir), "--sentencepiece_model", spm, "--detect",
                                               "--det_config", DET_CONFIG, "--det_checkpoint", DET_CHECKPOINT])

    # 5. inference -> submission file
    r.run("infer", "code/infer.py",
          ["--model", MODEL, "--input_size", INPUT_SIZE, "--task", "flickr30k", "--data_path", str(test_dir),
           "--sentencepiece_model", spm, "--finetune_car", str(out / "pt_out_car" / "checkpoint-best.pth"),
           "--finetune_people", str(out / "pt_out_people" / "checkpoint-best.pth"), "--output_dir", str(out),
           "--device", "cpu", "--threads", str(args.threads), "--batch_size", "64", "--restrict_to_category"])

    # scoring, with the random-ranking baseline
    scores = json.loads(r.run("evaluate", "code/evaluate.py",
                              ["--results", str(out / "infer_json_all.json"), "--gt", str(test_dir / "test_gt.txt"),
                               "--gallery", str(test_dir / "test_images"), "--json"], capture=True))
    write_json(ROOT / out / "metrics.json", scores, indent=1)

    # contact sheets: the first few queries of each category with their own model (both categories in parallel)
    queries = json.loads((ROOT / test_dir / "test_order.json").read_text())
    texts = (ROOT / test_dir / "test.txt").read_text(encoding="utf-8").splitlines()
    jobs = []
    for c in CATEGORIES:
        picked = [t for t, cat in zip(texts, queries["category"]) if cat == c][:6]
        qfile = ROOT / out / f"queries_{c}.txt"
        write_text(qfile, "".join(t + "\n" for t in picked))
        jobs.append((f"search_{c}", "code/search.py",
                     ["--images", str(test_dir / "test_images"), "--queries", str(qfile), "--model", MODEL,
                      "--input_size", INPUT_SIZE, "--finetune", str(out / f"pt_out_{c}" / "checkpoint-best.pth"),
                      "--sentencepiece_model", spm, "--gt", str(test_dir / "test_gt.txt"), "--k", "10",
                      "--html", str(out / f"contact_sheet_{c}.html"), "--cache_dir", str(out / "search_cache" / c),
                      "--device", "cpu", "--threads", str(args.threads)]))
    r.run_parallel(jobs, args.parallel)

    r.times["total"] = time.perf_counter() - t_start
    print_summary(scores, r.times, out)
    return scores


if __name__ == "__main__":
    main()
