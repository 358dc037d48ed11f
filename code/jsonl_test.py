"""Build the test index: grouped queries with their original order, and the image gallery.

Reads ``<data_path>/test_text.txt`` and ``<data_path>/test_images/``; writes ``test.txt``, ``test_order.json``,
``test.json``, ``flickr30k.test.jsonl`` and ``flickr30k.test_queries.jsonl`` into ``data_path``. Image categories
(used by ``infer.py --restrict_to_category``) come from a ``name$category`` file (``--image_categories``) or from the
detection stage's detector (``--detect``, which also writes ``test_image_categories.txt`` and a resumable cache
``det_test_cache.jsonl``); without either they are null, since real test file names need not reveal them.
Queries are grouped car first, then people, by the text rule of
``traffic_retrieval.categories.text_category``; formats: ``traffic_retrieval.indexing``.

Example:
    python code/jsonl_test.py --data_path dataset/test --sentencepiece_model model_pth/beit3.spm
"""

from __future__ import annotations

import argparse
import logging

from pathlib import Path

from traffic_retrieval import runtime
from traffic_retrieval.detection import (
    DEFAULT_DET_CHECKPOINT,
    DEFAULT_DET_CONFIG,
    DEFAULT_SCORE_THR,
    DetectorError,
    classify_images,
)
from traffic_retrieval.fileio import atomic_open
from traffic_retrieval.indexing import DEFAULT_TEXT_FILE, build_test_index, list_test_images, read_image_categories
from traffic_retrieval.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="dataset/test",
                   help="folder with test_text.txt and test_images/ (default: %(default)s)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm",
                   help="sentencepiece model of the text encoder (default: %(default)s)")
    p.add_argument("--text_file", default=DEFAULT_TEXT_FILE,
                   help="query file inside data_path; infer.py then ranks its queries (default: %(default)s)")
    p.add_argument("--image_categories", default=None,
                   help="optional 'name$category' file (e.g. from the detection stage); without it image "
                        "categories are null")
    p.add_argument("--detect", action="store_true",
                   help="classify the test images with the detector (the rule of train_det_cls.py)")
    p.add_argument("--det_config", default=DEFAULT_DET_CONFIG, help="detector config (default: %(default)s)")
    p.add_argument("--det_checkpoint", default=DEFAULT_DET_CHECKPOINT, help="detector weights (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="detector device: auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--score_thr", type=float, default=DEFAULT_SCORE_THR,
                   help="box score threshold (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default suits the machine)")
    args = p.parse_args(argv)
    if args.detect and args.image_categories:
        p.error("give --detect or --image_categories, not both")
    return args


def detect_categories(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """Run the detector over the usable test images ``names`` and write ``test_image_categories.txt`` (undetected
    ones left out)."""
    data = Path(args.data_path)
    device = str(runtime.resolve_device(args.device))
    found = classify_images(data / "test_images", names, args.det_config, args.det_checkpoint, device,
                            args.score_thr, cache_path=data / "det_test_cache.jsonl")
    cats = {n: c for n, c in found.items() if c is not None}
    with atomic_open(data / "test_image_categories.txt") as f:
        f.writelines(f"{n}${c}\n" for n, c in sorted(cats.items()))
    return cats


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime.setup(args.threads)
    try:
        tokenizer = Tokenizer(args.sentencepiece_model)
        cats = read_image_categories(args.image_categories) if args.image_categories else None
        images = None
        if args.detect:
            images = list_test_images(Path(args.data_path) / "test_images")  # checked once, for both steps
            cats = detect_categories(args, images[0])
        summary = build_test_index(args.data_path, tokenizer, image_categories=cats, text_file=args.text_file,
                                   images=images)
    except (FileNotFoundError, ValueError, DetectorError) as e:
        raise SystemExit(f"jsonl_test: {e}") from None
    return summary


if __name__ == "__main__":
    main()
