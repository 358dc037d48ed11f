"""Stage 5: rank the test images for every query with the car and people models and write the submission.

Reads:  the test index of ``code/jsonl_test.py`` in ``--data_path`` (test_text.txt, test.txt, test_order.json,
        flickr30k.test.jsonl, flickr30k.test_queries.jsonl, test_images/), and the fine-tuned checkpoints
        ``--finetune_car`` / ``--finetune_people`` (a .pth file or a DeepSpeed checkpoint directory).
        Several checkpoints per category make an ensemble: its queries are ranked by the mean of the models'
        cosine similarities.
Writes: ``<output_dir>/infer_json_car.json`` and ``infer_json_people.json`` (each category's queries),
        ``infer_json_all.json`` (the submission: every query in test_text.txt order, 10 unique names each),
        ``<output_dir>/cache/gallery_<category>.pt`` (reused gallery features) and, with ``--eval``,
        ``<output_dir>/infer_metrics.json``. Details: ``traffic_retrieval.inference``.

Examples:
    python code/infer.py --finetune_car code/pt_out_car/checkpoint-best \\
        --finetune_people code/pt_out_people/checkpoint-best --data_path dataset/test
    torchrun --nproc_per_node=2 code/infer.py --dist_eval ...      # encoding sharded over 2 GPUs
    python code/infer.py --finetune_car code/pt_out_car/checkpoint-best code/pt_out_car_seed2/checkpoint-best ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from traffic_retrieval import runtime
from traffic_retrieval.categories import CATEGORIES
from traffic_retrieval.distributed import cleanup, get_world_size, init_distributed, is_main_process
from traffic_retrieval.inference import TASKS, InferConfig, run_inference
from traffic_retrieval.labels import LabelFormatError
from traffic_retrieval.metrics import METRIC_KEYS, OrderError
from traffic_retrieval.modeling import canonical_model_name, list_models
from traffic_retrieval.precision import PRECISIONS

log = logging.getLogger("infer")

DEFAULT_CHECKPOINT = "code/pt_out_{category}/checkpoint-best"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Default paths are relative to the current directory: run it from the "
                                       "repository root.")
    p.add_argument("--model", default="beit3_large_patch16_384", type=canonical_model_name, choices=list_models(),
                   help="(default: %(default)s)")
    p.add_argument("--input_size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--task", default="flickr30k", choices=TASKS, help="index file prefix (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch; texts use 4x (default: %(default)s)")
    p.add_argument("--sentencepiece_model", default="model_pth/beit3.spm", help="(default: %(default)s)")
    for c in CATEGORIES:
        default = DEFAULT_CHECKPOINT.format(category=c)
        p.add_argument(f"--finetune_{c}", nargs="+", default=[default], metavar="CKPT",
                       help=f"checkpoint of the {c} model: a .pth file or a DeepSpeed checkpoint directory; "
                            f"'<dir>/checkpoint-best' also finds '<dir>/checkpoint-best.pth'; several: an ensemble "
                            f"that ranks by their mean cosine similarity (default: {default})")
        p.add_argument(f"--{c}_pad", type=int, default=None,
                       help=f"black pixels padded left and right of each image before the {c} model sees it "
                            "(default: the padding its checkpoint was validated with, else 0)")
    p.add_argument("--data_path", default="dataset/test", help="test folder with the jsonl_test.py index "
                                                               "(default: %(default)s)")
    p.add_argument("--output_dir", default="code", help="where infer_json_*.json go (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--k", type=int, default=10, help="names per query (default: %(default)s)")
    p.add_argument("--restrict_to_category", action="store_true",
                   help="rank a query only among images whose category (from jsonl_test.py --image_categories) "
                        "matches; images of unknown category stay allowed")
    p.add_argument("--faiss", action="store_true", help="search with a FAISS inner-product index (faiss-cpu) "
                                                        "instead of the exact chunked top-k")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write the gallery feature cache")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--compile", action="store_true", help="torch.compile each encoder layer (fastest on a GPU)")
    runtime.add_sdpa_argument(p)
    runtime.add_fused_ffn_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default suits the machine)")
    p.add_argument("--eval", action="store_true", help="score infer_json_all.json against --gt afterwards")
    p.add_argument("--gt", default=None, help="ground truth, text$img1$img2... per line "
                                              "(default: <data_path>/test_gt.txt)")
    p.add_argument("--dist_eval", action="store_true",
                   help="under torchrun: shard the encoding over the ranks; rank 0 ranks and writes")
    args = p.parse_args(argv)
    for name in ("batch_size", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.input_size is not None and args.input_size < 1:
        p.error(f"--input_size must be positive, got {args.input_size}")
    if any((getattr(args, f"{c}_pad") or 0) < 0 for c in CATEGORIES):
        p.error("padding must be >= 0")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not args.dist_eval:
        p.error("launched with several processes (WORLD_SIZE > 1): pass --dist_eval, or every process would "
                "repeat the whole run")
    return args


def to_config(args: argparse.Namespace) -> InferConfig:
    return InferConfig(
        checkpoints={c: getattr(args, f"finetune_{c}") for c in CATEGORIES},
        data_path=args.data_path, sentencepiece_model=args.sentencepiece_model, model=args.model,
        input_size=args.input_size, task=args.task, output_dir=args.output_dir, batch_size=args.batch_size,
        device=args.device, precision=args.precision, k=args.k, restrict_to_category=args.restrict_to_category,
        use_faiss=args.faiss, num_workers=args.num_workers, compile=args.compile,
        pads={c: getattr(args, f"{c}_pad") for c in CATEGORIES},
        use_cache=not args.no_cache, evaluate=args.eval, gt=args.gt,
    )


def format_metrics(metrics: dict, counts: dict[str, int]) -> str:
    """One row per group (all, car, people), values in percent."""
    head = f"{'category':<10}{'queries':>8}" + "".join(f"{k:>16}" for k in METRIC_KEYS)
    rows = [head]
    for name in ["all", *[c for c in CATEGORIES if c in metrics]]:
        m = metrics if name == "all" else metrics[name]
        n = sum(counts.values()) if name == "all" else counts[name]
        rows.append(f"{name:<10}{n:>8}" + "".join(f"{100 * m[k]:>16.2f}" for k in METRIC_KEYS))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runtime.setup(args.threads, args.sdpa)
    runtime.use_fused_ffn(args.fused_ffn, args.device)
    if args.dist_eval:
        info = init_distributed()
        if not info.distributed:
            log.info("--dist_eval without torchrun: running as a single process")
        elif not is_main_process():
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress log, from rank 0
    try:
        summary = run_inference(to_config(args))
    except OrderError as e:
        raise SystemExit(f"infer.py: error: --eval: {e}") from None
    except (FileNotFoundError, ValueError, LabelFormatError) as e:
        raise SystemExit(f"infer.py: error: {e}") from None
    finally:
        if get_world_size() > 1:
            cleanup()
    if is_main_process():
        for path in summary["outputs"].values():
            print(f"wrote {path}")
        if summary["failed_images"]:
            print(f"{len(summary['failed_images'])} unreadable image(s) were not ranked, e.g. "
                  f"{summary['failed_images'][0][0]} ({summary['failed_images'][0][1]})")
        if summary["metrics"] is not None:
            print(format_metrics(summary["metrics"], summary["queries"]))
            print(json.dumps({k: summary["metrics"][k] for k in METRIC_KEYS}))
    return summary


if __name__ == "__main__":
    main()
