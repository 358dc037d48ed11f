"""Train a small sentencepiece model on the captions (for the demo: the official beit3.spm cannot be downloaded).

Reads label files (``name$attribute$caption``) and query files (one query per line, e.g. ``test_text.txt``; a file
without any ``$`` is taken as a query file); writes the model to ``--out``. Bad label lines are skipped with a
warning, as the model only needs text.

Example:
    python code/train_tokenizer.py --labels dataset/demo/train/train_label.txt dataset/demo/test/test_text.txt \
        --out model_pth/demo/beit3_demo.spm
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from traffic_retrieval import runtime
from traffic_retrieval.labels import format_problems, read_label_file, read_test_text
from traffic_retrieval.tokenizer import train_sentencepiece

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="+", default=["dataset/demo/train/train_label.txt"],
                   help="label and/or query files to learn from (default: %(default)s)")
    p.add_argument("--out", default="model_pth/demo/beit3_demo.spm", help="model file to write (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, default=400, help="sentencepiece vocabulary size (default: %(default)s)")
    p.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe", help="(default: %(default)s)")
    args = p.parse_args(argv)
    if args.vocab_size < 20:
        p.error("--vocab_size must be at least 20")
    return args


def read_texts(path: str | Path) -> list[str]:
    """Captions of a label file, or the lines of a query file (a file with no '$' at all)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    if b"$" not in p.read_bytes():
        return read_test_text(p)
    records, problems = read_label_file(p)
    if problems:
        log.warning("skipped %d bad line(s) in %s:\n%s", len(problems), p, format_problems(problems))
    return [r.caption for r in records]


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    runtime.setup(1)
    try:
        texts = [t for path in args.labels for t in read_texts(path)]
        out = train_sentencepiece(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train_tokenizer: {e}") from None
    log.info("trained on %d texts from %d file(s) -> %s", len(texts), len(args.labels), out)
    return out


if __name__ == "__main__":
    main()
