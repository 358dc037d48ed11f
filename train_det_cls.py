"""Stage 1 for the train split: clean train_label.txt with RTMDet (people or car per image) and code the names.

Writes fliter_train_labels.txt, train_images/<category>_<name> links, det_train_report.{jsonl,txt},
det_train_cache.jsonl and, where the links must be copies, det_train_copies.json into --data_path; the rule and the
formats are in traffic_retrieval.cleaning.

Example (the demo detector on the synthetic data):
    python train_det_cls.py --data_path dataset/demo/train \
        --det_config model_pth/demo/rtmdet_tiny_demo.py --det_checkpoint model_pth/demo/rtmdet_tiny_demo.pth
"""

from __future__ import annotations

from traffic_retrieval import cleaning

SPLIT = "train"


def parse_args(argv: list[str] | None = None) -> cleaning.CleaningConfig:
    return cleaning.parse_args(argv, split=SPLIT)


def main(argv: list[str] | None = None) -> cleaning.CleaningResult:
    return cleaning.main(argv, split=SPLIT)


if __name__ == "__main__":
    main()
