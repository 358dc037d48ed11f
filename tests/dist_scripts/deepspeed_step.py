"""Launched by tests/test_distributed.py with ``torchrun --nproc_per_node=2`` (gloo, CPU, ``DS_ACCELERATOR=cpu``):
two DeepSpeed ZeRO-1 steps on the nano model, each rank on its own data, starting from weights that differ
between ranks (rank 1 perturbs a matrix and the scalar ``logit_scale``). Writes ``<out>/rank<R>.pt`` with the
final state dict; the test checks that both ranks hold the same weights (rank 0's start, then synchronous updates).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from traffic_retrieval.distributed import barrier, cleanup, get_rank, init_distributed
from traffic_retrieval.fileio import torch_save
from traffic_retrieval.loss import ContrastiveLoss
from traffic_retrieval.modeling import create_model
from traffic_retrieval.optim import apply_lr, deepspeed_config, deepspeed_initialize, param_groups_layer_decay


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args(argv)

    info = init_distributed()
    rank = get_rank()
    torch.manual_seed(0)
    model = create_model("beit3_nano_patch16_32")
    start = {k: model.state_dict()[k].clone() for k in ("logit_scale", "vision_head.weight")}
    if rank == 1:  # different starting points: DeepSpeed (and our scalar workaround) must make rank 0's win
        with torch.no_grad():
            model.logit_scale.add_(1.0)
            model.vision_head.weight.mul_(3.0)
    groups = param_groups_layer_decay(model, 0.05, 0.5, model.cfg.depth, model.no_weight_decay())
    config = deepspeed_config(batch_size=4, update_freq=1, world_size=info.world_size, lr=1e-3, weight_decay=0.05,
                              precision=args.precision, zero_stage=1, steps_per_print=10**6)
    engine, optimizer = deepspeed_initialize(model, groups, config)
    after_init = {k: engine.module.state_dict()[k].float().clone() for k in start}

    torch.manual_seed(100 + rank)  # each rank its own batch
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    loss_fn = ContrastiveLoss()
    for lr in (1e-3, 5e-4):
        apply_lr(optimizer, lr)
        img, txt = engine(torch.randn(4, 3, 32, 32, dtype=dtype), torch.randint(0, 1000, (4, 8)), None)
        loss = loss_fn(img, txt, engine.module.logit_scale)
        engine.backward(loss)
        engine.step()
    state = {k: v.float().clone() for k, v in engine.module.state_dict().items()}
    torch_save({"start": start, "after_init": after_init, "final": state}, args.out / f"rank{rank}.pt")
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
