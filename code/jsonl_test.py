"""Build the test index: grouped queries with their original order, and the image gallery.

Reads ``<data_path>/test_text.txt`` and ``<data_path>/test_images/`` (and optionally a ``name$category`` file from
the detection stage); writes ``test.txt``, ``test_order.json``, ``test.json``, ``flickr30k.test.jsonl`` and
``flickr30k.test_queries.jsonl`` into ``data_path``. Queries are grouped car first, then people, by the text rule of
``traffic_retrieval.categories.text_category``; formats: ``traffic_retrieval.indexing``.

Example:
    python code/jsonl_test.py --data_path dataset/test --sentencepiece_model model_pth/beit3.spm
"""

from __future__ import annotations

import argparse
import logging

from traffic_retrieval import runtime
from traffic_retrieval.indexing import build_test_index, read_image_categories
from traffic_retrieval.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default="dataset/test",
                   help="folder with test_text.txt and test_images/ (default: %(default)s)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm",
                   help="sentencepiece model of the text encoder (default: %(default)s)")
    p.add_argument("--text_file", default="test_text.txt", help="query file inside data_path (default: %(default)s)")
    p.add_argument("--image_categories", default=None,
                   help="optional 'name$category' file (e.g. from the detection stage); without it image "
                        "categories are null")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime.setup(1)
    try:
        tokenizer = Tokenizer(args.sentencepiece_model)
        cats = read_image_categories(args.image_categories) if args.image_categories else None
        summary = build_test_index(args.data_path, tokenizer, image_categories=cats, text_file=args.text_file)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"jsonl_test: {e}") from None
    return summary


if __name__ == "__main__":
    main()
