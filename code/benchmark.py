"""Benchmark the project's BEiT-3 against the official implementation, side by side in one process.

Prints one JSON line per (setting, implementation): pairs/s for a full training step (both encoders, contrastive
loss, backward, AdamW), images/s and texts/s for encoding, peak memory, MFU, and ``ratio`` = ours / official.

    python code/benchmark.py --model beit3_nano_patch16_32 --device cpu                    # any machine
    python code/benchmark.py --model beit3_large_patch16_384 --batch_size 80 --device cuda --precision bf16 \
        --settings train train_ckpt encode_image encode_text infer_stage --compile           # one GPU
"""

from __future__ import annotations

import argparse

import torch

from traffic_retrieval import runtime
from traffic_retrieval.bench import add_gelu_cdf_argument, run
from traffic_retrieval.modeling import canonical_model_name, list_models, set_fused_ffn
from traffic_retrieval.precision import PRECISIONS, default_precision

SETTINGS = ("train", "train_ckpt", "encode_image", "encode_text", "infer_stage", "attention", "ffn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="beit3_nano_patch16_32", type=canonical_model_name, choices=list_models())
    p.add_argument("--input_size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per training step")
    p.add_argument("--encode_batch", type=int, default=None, help="images per encoding batch (default: 4x batch)")
    p.add_argument("--text_batch", type=int, default=None, help="texts per encoding batch (default: 16x batch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--settings", nargs="+", default=["train", "encode_image", "encode_text"], choices=SETTINGS)
    p.add_argument("--reference", default="torchscale", choices=["torchscale", "none"])
    p.add_argument("--compile", action="store_true", help="torch.compile each encoder layer of our model")
    runtime.add_fused_ffn_argument(p)  # our model's; the official model runs its own code
    add_gelu_cdf_argument(p)  # with --compile
    p.add_argument("--drop_path", type=float, default=0.0,
                   help="stochastic depth of the last layer in the training settings, for both models (the recipe "
                        "uses 0.2; default: %(default)s)")
    p.add_argument("--infer_gallery", type=int, default=17611, help="images (and queries) for infer_stage")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--peak_n", type=int, default=None, help="matmul size for the MFU peak (default 8192 cuda, 1024 cpu)")
    runtime.add_sdpa_argument(p)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or default_precision(args.device)
    args.encode_batch = args.encode_batch or 4 * args.batch_size
    args.text_batch = args.text_batch or 16 * args.batch_size
    args.peak_n = args.peak_n or (8192 if cuda else 1024)
    if not 0 <= args.drop_path < 1:
        p.error("--drop_path must be in [0, 1)")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda given but no GPU is available")
    if args.gelu_cdf != "auto" and not args.compile:
        p.error("--gelu_cdf chooses what inductor compiles: give --compile too")
    if args.gelu_cdf == "fitted" and args.fused_ffn:
        p.error("--gelu_cdf fitted and --fused_ffn replace the same GELU: give one of them")
    if args.fused_ffn and not cuda:
        p.error("--fused_ffn is a GPU kernel: give --device cuda (the CPU runs the unfused ops)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runtime.setup(args.threads, args.sdpa)
    set_fused_ffn(args.fused_ffn)
    run(args)


if __name__ == "__main__":
    main()
