"""Build the per-category training/validation index files from the cleaned labels.

Reads ``<data_path>/fliter_{train,val}_labels.txt`` (category-coded names, written by the detection stage) and the
images in ``<data_path>/{split}_images/``; writes ``{split}_{category}.json`` (Karpathy style) and
``flickr30k_{category}.{split}.jsonl`` (BEiT-3 index) into ``data_path``. Formats: ``traffic_retrieval.indexing``.

Example:
    python code/data2flickr30k.py --data_path dataset/train --sentencepiece_model model_pth/beit3.spm
"""

from __future__ import annotations

import argparse
import logging

from traffic_retrieval import runtime
from traffic_retrieval.categories import CATEGORIES
from traffic_retrieval.indexing import build_flickr30k_indexes
from traffic_retrieval.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="dataset/train",
                   help="folder with fliter_*_labels.txt and *_images/ (default: %(default)s)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm",
                   help="sentencepiece model of the text encoder (default: %(default)s)")
    p.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES),
                   help="categories to index (default: all)")
    p.add_argument("--splits", nargs="+", choices=("train", "val"), default=["train", "val"],
                   help="splits to index (default: train val)")
    p.add_argument("--check_images", action="store_true",
                   help="decode every image and fail on unreadable ones (slow on the full data; the detection "
                        "stage already decodes them)")
    args = p.parse_args(argv)
    args.categories = list(dict.fromkeys(args.categories))  # keep order, drop repeats
    args.splits = list(dict.fromkeys(args.splits))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime.setup(1)
    try:
        tokenizer = Tokenizer(args.sentencepiece_model)
        summary = build_flickr30k_indexes(args.data_path, tokenizer, args.categories, args.splits,
                                          check_images=args.check_images)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"data2flickr30k: {e}") from None
    log.info("done: %s", summary)
    return summary


if __name__ == "__main__":
    main()
