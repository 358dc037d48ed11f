"""Train the small RTMDet the demo's cleaning stage uses, and ship it under ``model_pth/demo/``.

No COCO weights can be downloaded here, so the demo detector is mmdet's packaged RTMDet-tiny trained from scratch on
the synthetic dataset's true boxes (``annotations/train_boxes.json``; classes person, car) with mmengine's own
training loop: 128 px inputs, no Mosaic/MixUp, AdamW, batch 16, a short warmup and cosine for the few epochs.
Writes ``rtmdet_tiny_demo.py`` (self-contained inference config) and ``rtmdet_tiny_demo.pth`` (weights only,
fp16 when that keeps the val accuracy) into ``--out``, mmengine's logs into ``--work_dir``, and prints the
val accuracy of the cleaning stage's per-image decision.

Example:
    python code/make_demo_dataset.py --out dataset/demo --seed 0
    python code/train_demo_detector.py --data dataset/demo --out model_pth/demo --epochs 6
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from traffic_retrieval import runtime
from traffic_retrieval.detection import DEFAULT_SCORE_THR, DemoTrainConfig, DetectorError, build_demo_detector

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> tuple[DemoTrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dataset/demo", help="demo dataset root (default: %(default)s)")
    p.add_argument("--out", default="model_pth/demo", help="where the config and weights go (default: %(default)s)")
    p.add_argument("--work_dir", default="runs/demo_detector", help="mmengine logs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--img_size", type=int, default=128, help="square network input in pixels")
    p.add_argument("--lr", type=float, default=0.004, help="AdamW learning rate")
    p.add_argument("--warmup_iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp32", action="store_true", help="store fp32 weights even if fp16 keeps the accuracy")
    p.add_argument("--score_thr", type=float, default=DEFAULT_SCORE_THR, help="threshold of the accuracy check")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on small machines)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.img_size % 32:
        p.error("--img_size must be a multiple of 32 (RTMDet's largest stride)")
    tc = DemoTrainConfig(
        data=Path(args.data), out=Path(args.out), work_dir=Path(args.work_dir), epochs=args.epochs,
        batch_size=args.batch_size, img_size=args.img_size, lr=args.lr, warmup_iters=args.warmup_iters,
        seed=args.seed, fp16=not args.fp32,
    )
    return tc, args


def main(argv: list[str] | None = None) -> dict:
    tc, args = parse_args(argv)
    runtime.setup(args.threads)
    try:
        result = build_demo_detector(tc, score_thr=args.score_thr)
    except DetectorError as e:
        raise SystemExit(f"train_demo_detector: {e}") from None
    summary = {k: v for k, v in result.items() if k not in ("val", "val_fp32")}
    for key in ("val", "val_fp32"):
        summary[key] = {k: v for k, v in result[key].items() if k != "wrong"}
    log.info("demo detector: %s", json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
