"""Launched by tests/test_distributed.py with ``torchrun --nproc_per_node=2``: each rank takes its half of one
seeded batch, computes the contrastive loss and its gradients, and writes them to ``<out>/rank<R>.pt``.

Parameter gradients are averaged over ranks, as DDP would do, so the test can compare them with one process
running the whole batch. Rank 0 also writes the full inputs (``<out>/inputs.pt``) for that reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from traffic_retrieval.distributed import (
    all_gather_concat,
    all_gather_with_grad,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from traffic_retrieval.fileio import torch_save
from traffic_retrieval.categories import PEDESTRIAN_ATTRIBUTES, format_pedestrian_code
from traffic_retrieval.loss import ContrastiveLoss, attribute_codes_for, group_ids_for

GLOBAL_BATCH, IN_DIM, DIM = 8, 10, 6
# Duplicate ids that span both ranks' halves (0 and 1 and 3 occur on both sides or twice on one).
DUP_IDS = torch.tensor([0, 1, 0, 2, 1, 3, 0, 3])


def _code(*on: str) -> str:
    return format_pedestrian_code([int(a in on) for a in PEDESTRIAN_ATTRIBUTES])


# Pedestrian attributes whose inclusion relations cross the ranks' halves (rows 0-3 on rank 0, 4-7 on rank 1).
REL_ATTRS = [_code("Female", "Side"), _code("Front", "Hat"), "red BMW.", _code("Female", "Side", "Hat"),
             _code("Female", "Side", "Backpack"), _code("Front"), "red BMW.", _code("Female", "Side")]
REL_IDS = group_ids_for(["attr:" + a for a in REL_ATTRS])
REL_CODES = attribute_codes_for(REL_ATTRS)
CASES = {  # name: (gather, dedup, group ids of the global batch or None, attribute codes or None)
    "official": (True, True, None, None),
    "distinct": (True, True, torch.arange(GLOBAL_BATCH) * 7 + 100, None),
    "dups": (True, True, DUP_IDS, None),
    "dups_no_dedup": (True, False, DUP_IDS, None),
    "relevance": (True, True, REL_IDS, REL_CODES),
    "local_only": (False, True, None, None),
}


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x_img": torch.randn(GLOBAL_BATCH, IN_DIM, generator=g),
        "x_txt": torch.randn(GLOBAL_BATCH, IN_DIM, generator=g),
        "w_img": torch.randn(DIM, IN_DIM, generator=g) * 0.5,
        "w_txt": torch.randn(DIM, IN_DIM, generator=g) * 0.5,
        "logit_scale": torch.tensor(2.0),
    }


def run_case(inputs: dict, gather: bool, dedup: bool, ids: torch.Tensor | None, codes: torch.Tensor | None,
             rank: int, world: int) -> dict:
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    lin_img, lin_txt = nn.Linear(IN_DIM, DIM, bias=False), nn.Linear(IN_DIM, DIM, bias=False)
    with torch.no_grad():
        lin_img.weight.copy_(inputs["w_img"])
        lin_txt.weight.copy_(inputs["w_txt"])
    logit_scale = nn.Parameter(inputs["logit_scale"].clone())
    img = F.normalize(lin_img(inputs["x_img"][rows]), dim=-1)
    txt = F.normalize(lin_txt(inputs["x_txt"][rows]), dim=-1)
    img.retain_grad()
    txt.retain_grad()
    loss = ContrastiveLoss(gather=gather, dedup=dedup)(img, txt, logit_scale, None if ids is None else ids[rows],
                                                       None if codes is None else codes[rows])
    loss.backward()
    out = {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}
    for name, p in (("w_img_grad", lin_img.weight), ("w_txt_grad", lin_txt.weight), ("scale_grad", logit_scale)):
        g = p.grad.clone()
        dist.all_reduce(g)  # DDP averages parameter gradients over ranks
        out[name] = g / world
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    info = init_distributed()
    rank, world = get_rank(), get_world_size()
    inputs = make_inputs(args.seed)
    result: dict = {
        "info": (info.rank, info.world_size, info.local_rank, info.distributed),
        "is_main": is_main_process(),
        "cases": {name: run_case(inputs, *case, rank=rank, world=world) for name, case in CASES.items()},
        # Unequal row counts per rank: rank r sends r+1 rows filled with r.
        "concat": all_gather_concat(torch.full((rank + 1, 3), float(rank))),
        "concat_ids": all_gather_concat(torch.arange(rank + 2) + 10 * rank),
    }
    # all_gather_with_grad on its own: d(sum of all ranks' sum(gathered * w))/dx = sum of w over ranks.
    x = torch.ones(2, 3, requires_grad=True)
    gathered = all_gather_with_grad(x)
    (gathered * (rank + 1)).sum().backward()
    result["gather_with_grad"] = (gathered.detach(), x.grad)
    if rank == 0:
        torch_save(inputs, args.out / "inputs.pt")
    torch_save(result, args.out / f"rank{rank}.pt")
    barrier()
    cleanup()


if __name__ == "__main__":
    main()
