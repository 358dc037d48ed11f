"""Stage 3: fine-tune BEiT-3 for text-to-image retrieval on one category (car or people).

Reads ``<data_path>/flickr30k_<category>.{train,val}.jsonl`` (from ``code/data2flickr30k.py``) and their images;
writes checkpoints, ``log.txt``, ``best.json``, ``args.json``, ``deepspeed_config.json``, ``training_curves.png``
into ``--output_dir`` and TensorBoard scalars into ``--log_dir``. Details: ``traffic_retrieval.train``.

The official flags of the 4th place's command are accepted as they were. Examples:
    torchrun --nproc_per_node=2 code/run_beit3_finetuning.py --category car --model beit3_large_patch16_384 \
        --input_size 384 --task flickr30k --batch_size 80 --layer_decay 0.85 --lr 3e-5 --epochs 17 \
        --warmup_epochs 3 --drop_path 0.2 --sentencepiece_model model_pth/beit3.spm \
        --finetune model_pth/beit3_large_patch16_384_f30k_retrieval.pth --data_path dataset/train \
        --output_dir code/pt_out_car --weight_decay 0.05 --seed 42 --save_ckpt_freq 5 --enable_deepspeed \
        --checkpoint_activations
    python code/run_beit3_finetuning.py --category car --model beit3_tiny_patch8_64 --data_path dataset/demo/train \
        --sentencepiece_model model_pth/demo/beit3_demo.spm --batch_size 32 --epochs 10 --warmup_epochs 1 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from traffic_retrieval import runtime
from traffic_retrieval.checkpoint import CheckpointError
from traffic_retrieval.data import DEDUP_MODES
from traffic_retrieval.engine import NonFiniteLossError
from traffic_retrieval.modeling import canonical_model_name, list_models
from traffic_retrieval.precision import PRECISIONS
from traffic_retrieval.train import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
    check_config,
    run,
    run_eval,
)
from traffic_retrieval.transforms import TRAIN_CROPS

log = logging.getLogger("run_beit3_finetuning")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d, m, o, r = DataConfig(), ModelConfig(), OptimConfig(), RuntimeConfig()
    g = p.add_argument_group("data")
    g.add_argument("--category", choices=("car", "people"), required=True)
    g.add_argument("--data_path", default=d.data_path, help="folder with the jsonl index files and images")
    g.add_argument("--task", choices=("flickr30k",), default=d.task,
                   help="the official flag, accepted for its command line: flickr30k is the only task (the index "
                        "files are flickr30k_<category>.{train,val}.jsonl)")
    g.add_argument("--sentencepiece_model", default=d.sentencepiece_model,
                   help="tokenizer the index was built with; its vocabulary must fit the model")
    g.add_argument("--num_max_bpe_tokens", type=int, default=d.num_max_bpe_tokens)
    g.add_argument("--train_crop", choices=("auto", *TRAIN_CROPS), default=d.train_crop,
                   help="auto = the 4th place's crop per category (car: scale 0.2-1; people: padded, centre-biased)")
    g.add_argument("--people_pad", type=int, default=d.people_pad,
                   help="black pixels left and right of people images, in training and validation")
    g.add_argument("--randaug", action="store_true", help="official RandAugment")
    g.add_argument("--dedup", choices=DEDUP_MODES, default=d.dedup,
                   help="which pairs of a batch are positives besides the diagonal: relevance = those the "
                        "official relevance rule calls relevant (equal attribute; for pedestrians also an image "
                        "with every attribute of a caption of its gender); attribute = equal attribute; caption = "
                        "identical text; none = the official loss (default: %(default)s)")
    g.add_argument("--num_workers", type=int, default=None, help="loader workers per process (default: by CPUs)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=canonical_model_name, choices=list_models(), default=m.model)
    g.add_argument("--input_size", type=int, default=None, help="image side (default: the model's)")
    g.add_argument("--drop_path", type=float, default=m.drop_path)
    g.add_argument("--vocab_size", type=int, default=None, help="text embedding rows (non-official configs only)")
    g.add_argument("--finetune", default=None, help="starting checkpoint (default: none, train from scratch)")
    g.add_argument("--model_key", default=m.model_key)
    g.add_argument("--checkpoint_activations", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile each encoder layer")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=o.epochs)
    g.add_argument("--warmup_epochs", type=int, default=o.warmup_epochs)
    g.add_argument("--lr", type=float, default=o.lr)
    g.add_argument("--min_lr", type=float, default=o.min_lr)
    g.add_argument("--weight_decay", type=float, default=o.weight_decay)
    g.add_argument("--layer_decay", type=float, default=o.layer_decay)
    g.add_argument("--batch_size", type=int, default=o.batch_size, help="per process")
    g.add_argument("--eval_batch_size", type=int, default=None, help="default: 1.5 x batch_size")
    g.add_argument("--update_freq", type=int, default=o.update_freq, help="gradient accumulation steps")
    g.add_argument("--clip_grad", type=_optional_float, default=None,
                   help="max grad norm, > 0 (None: no clipping)")
    g.add_argument("--opt_betas", type=float, nargs=2, default=list(o.opt_betas))
    g.add_argument("--opt_eps", type=float, default=o.opt_eps)
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap (smoke runs)")
    g = p.add_argument_group("runtime")
    g.add_argument("--output_dir", default=None, help="default: code/pt_out_<category>")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output_dir>/tb)")
    g.add_argument("--seed", type=int, default=r.seed)
    g.add_argument("--save_ckpt_freq", type=int, default=r.save_ckpt_freq)
    g.add_argument("--enable_deepspeed", action="store_true")
    g.add_argument("--zero_stage", type=int, choices=(0, 1, 2), default=r.zero_stage,
                   help="DeepSpeed ZeRO stage (with --enable_deepspeed; fixed for a resumed run)")
    g.add_argument("--initial_scale_power", type=int, default=r.initial_scale_power,
                   help="DeepSpeed fp16 initial loss scale 2**power (with --enable_deepspeed in fp16)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: fp16 with DeepSpeed on cuda, bf16 on cuda, fp32 on cpu")
    g.add_argument("--device", default=r.device, help="cpu, cuda or auto")
    runtime.add_sdpa_argument(g)
    runtime.add_fused_ffn_argument(g)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default suits the machine)")
    g.add_argument("--auto_resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    g.add_argument("--eval", action="store_true", help="only print the val metrics of --finetune (or the best)")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> :class:`TrainConfig`."""
    p = _parser()
    a = p.parse_args(argv)
    cfg = TrainConfig(
        data=DataConfig(a.data_path, a.category, a.task, a.sentencepiece_model, a.num_max_bpe_tokens, a.train_crop,
                        a.people_pad, a.randaug, a.dedup, a.num_workers),
        model=ModelConfig(a.model, a.input_size, a.drop_path, a.vocab_size, a.finetune or None, a.model_key,
                          a.checkpoint_activations, a.compile),
        optim=OptimConfig(a.epochs, a.warmup_epochs, a.lr, a.min_lr, a.weight_decay, a.layer_decay, a.batch_size,
                          a.eval_batch_size, a.update_freq, a.clip_grad, tuple(a.opt_betas), a.opt_eps,
                          a.max_steps_per_epoch),
        runtime=RuntimeConfig(a.output_dir, a.log_dir, a.seed, a.save_ckpt_freq, a.enable_deepspeed, a.zero_stage,
                              a.initial_scale_power, a.precision, a.device, a.threads, a.sdpa, a.auto_resume,
                              a.eval, a.fused_ffn),
    )
    try:
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    runtime.setup(cfg.runtime.threads, cfg.runtime.sdpa)
    runtime.use_fused_ffn(cfg.runtime.fused_ffn, cfg.runtime.device)
    try:
        if cfg.runtime.eval:
            metrics = run_eval(cfg)
            if os.environ.get("RANK", "0") == "0":
                print(json.dumps(metrics))  # the result of --eval, on stdout
            return metrics
        return run(cfg)
    except (FileNotFoundError, ValueError, CheckpointError, NonFiniteLossError) as e:
        raise SystemExit(f"run_beit3_finetuning: {e}") from None


if __name__ == "__main__":
    main()
