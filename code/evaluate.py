"""Score a submission against ground truth, with the official scorer's semantics and the standard metrics.

Reads:  a results file ``{"results": [{"text", "image_names"}, ...]}`` (``--results``) and a ground-truth file in the
        official format, ``text$img1$img2...`` per line (``--gt``).
Writes: nothing; prints a table, or with ``--json`` one JSON object with ``official_map10``, ``map10``, ``r1``, ``r5``,
        ``r10`` (fractions in [0, 1]) and the same keys per category (``car``, ``people``; from the query text).

``official_map10`` is exactly ``Open-TransMind/track2/tools/cal_map_json.py``: every submitted name is walked (no
truncation, no de-duplication), the hit counter starts at 1e-6 and AP = sum(hits/rank) / hits. ``map10`` is the
textbook AP@10, normalised by min(10, #relevant). Bad input (missing file, malformed line, texts not in ground-truth
order) exits with status 2 and a message naming the file and line or index.

Example:
    python code/evaluate.py --results code/infer_json_all.json --gt dataset/test/test_gt.txt --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence

from traffic_retrieval.categories import text_category
from traffic_retrieval.labels import LabelFormatError, read_ground_truth
from traffic_retrieval.encoding import list_images
from traffic_retrieval.metrics import METRIC_KEYS, OrderError, random_baseline, score_results
from traffic_retrieval.runtime import setup
from traffic_retrieval.submission import SubmissionError, load_submission

log = logging.getLogger("evaluate")

EXIT_BAD_INPUT = 2
_HEADERS = {"official_map10": "official mAP@10", "map10": "mAP@10", "r1": "R@1", "r5": "R@5", "r10": "R@10"}


@dataclass
class Config:
    results: str  # submission JSON to score
    gt: str  # ground truth, `text$img1$img2...` per line
    json: bool  # print one JSON object instead of a table
    k: int  # the list length a valid submission has (only checked, as a warning: the scorer never truncates)
    gallery: str | None  # image folder: also report the expected scores of a random ranking of it


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="code/infer_json_all.json", help="submission JSON file")
    p.add_argument("--gt", default="dataset/test/test_gt.txt", help="ground truth: text$img1$img2... per line")
    p.add_argument("--json", action="store_true", help="print one JSON object (fractions in [0, 1])")
    p.add_argument("--k", type=int, default=10, help="expected number of unique names per query (warning only)")
    p.add_argument("--gallery", default=None,
                   help="test image folder: also report the random-ranking baseline (key 'random' with --json)")
    a = p.parse_args(argv)
    if a.k < 1:
        p.error(f"--k must be positive, got {a.k}")
    return Config(results=a.results, gt=a.gt, json=a.json, k=a.k, gallery=a.gallery)


def _warn_list_shapes(results: Sequence[tuple[str, list[str]]], k: int) -> None:
    """The official scorer accepts any list; say so when a submission would not pass the format rules."""
    bad_len = [i for i, (_, n) in enumerate(results) if len(n) != k]
    dups = [i for i, (_, n) in enumerate(results) if len(set(n)) != len(n)]
    if bad_len:
        log.warning("%d queries do not have exactly %d names (first: index %d with %d); scored as given",
                    len(bad_len), k, bad_len[0], len(results[bad_len[0]][1]))
    if dups:
        log.warning("%d queries repeat an image name (first: index %d); the official scorer counts repeats again",
                    len(dups), dups[0])


def format_table(scores: dict, counts: dict[str, int]) -> str:
    """A small fixed-width table, one row per group, values in percent."""
    rows = [("all", scores)] + [(c, scores[c]) for c in counts if c != "all"]
    widths = [max(len(_HEADERS[k]), 6) + 2 for k in METRIC_KEYS]
    head = f"{'category':<10}{'queries':>8}" + "".join(f"{_HEADERS[k]:>{w}}" for k, w in zip(METRIC_KEYS, widths))
    lines = [head + "  (%)"]
    for name, s in rows:
        lines.append(f"{name:<10}{counts[name]:>8}"
                     + "".join(f"{100 * s[k]:>{w}.2f}" for k, w in zip(METRIC_KEYS, widths)))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_args(argv)
    setup(threads=1)
    try:
        gt = read_ground_truth(cfg.gt)
        results = load_submission(cfg.results)
        if not gt:
            raise ValueError(f"{cfg.gt}: the ground truth has no queries")
        categories = [text_category(t) for t, _ in gt]
        scores = score_results(results, gt, categories)
        if cfg.gallery:
            names = [p.name for p in list_images(cfg.gallery)]
            scores["random"] = random_baseline(gt, names, categories, k=cfg.k)
    except OrderError as e:
        _fail(f"{cfg.results}: {e}")
    except (FileNotFoundError, LabelFormatError, SubmissionError, ValueError) as e:
        _fail(str(e))
    _warn_list_shapes(results, cfg.k)
    if cfg.json:
        print(json.dumps(scores))
    else:
        counts = {"all": len(gt), **{c: categories.count(c) for c in sorted(set(categories))}}
        print(format_table(scores, counts))
        if "random" in scores:
            print("random ranking of the gallery (expected):")
            print(format_table(scores["random"], counts))
    return scores


def _fail(message: str) -> NoReturn:
    """Bad input: the message on stderr, no traceback, exit status 2."""
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
