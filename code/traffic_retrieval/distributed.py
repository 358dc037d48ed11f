"""Rank helpers: process-group setup from torchrun's environment, rank queries and feature gathering.

Everything here degrades to a single-process no-op when no process group exists, so the training and evaluation
code calls these helpers unconditionally. Gathering comes in two kinds:

- :func:`all_gather_with_grad` for the contrastive loss: the gathered tensor keeps its autograd graph, so every
  rank's loss sends gradients back to the features that were computed on the other ranks (the official
  ``GatherLayer``);
- :func:`all_gather_concat` for evaluation features: no gradient, and ranks may hold different numbers of rows.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int  # global rank, 0 .. world_size-1
    world_size: int  # number of processes in the job
    local_rank: int  # rank on this machine; selects the GPU
    distributed: bool  # True when a process group with more than one member was (or already is) set up


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def backend_for(device_type: str) -> str:
    """The process-group backend for a job on ``device_type`` devices: nccl for cuda, gloo otherwise (cpu).

    Chosen from the device the job runs on, not from whether CUDA exists: a ``--device cpu`` job on a GPU machine
    exchanges CPU tensors, which nccl cannot carry.
    """
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(backend: str | None = None, device_type: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Without those variables this is a no-op that reports a world of one. ``backend`` defaults to
    :func:`backend_for` ``device_type`` (the resolved device's type; when None, cuda if CUDA is available, else
    cpu); with nccl, GPU ``LOCAL_RANK`` is selected. Calling it again once the group exists only reports the
    current state.
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_world_size() > 1)
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if len(missing) == len(_TORCHRUN_VARS):
        return DistInfo(rank=0, world_size=1, local_rank=0, distributed=False)
    if missing:
        raise ValueError(f"incomplete distributed environment: {', '.join(missing)} not set (launch with torchrun)")
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if backend is None:
        backend = backend_for(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "nccl":
        torch.cuda.set_device(local)  # before init, so NCCL binds this rank to its own GPU
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    logger.info("distributed init: rank %d/%d (local %d), backend %s", rank, world, local, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, distributed=world > 1)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> dict[str, str]:
    """Set the variables DeepSpeed needs to run as one process when no launcher set them.

    Without them ``deepspeed.initialize`` falls back to MPI discovery and fails (no ``mpi4py``), and a process group
    made by hand is not enough because DeepSpeed also reads ``LOCAL_RANK``. A process started by torchrun (``RANK``
    present) is left untouched. Returns the variables that were set.
    """
    if "RANK" in os.environ:
        return {}
    values = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
    }
    os.environ.update(values)
    return values


def is_dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_ready() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_ready() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_ready():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if any), so the process can exit cleanly."""
    if is_dist_ready():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather + cat whose backward sums the incoming gradients over ranks and keeps this rank's rows.

    Each rank's loss uses every rank's features, so the gradient of the sum of all ranks' losses with respect to
    this rank's features is the all-reduced gradient, restricted to this rank's slice (the official ``GatherLayer``).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # x: [B, ...] -> [world * B, ...]
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; never modify autograd's own buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` ([B, ...], the same B on every rank) from all ranks in rank order, keeping gradients.

    Returns ``t`` itself in a single process.
    """
    if get_world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


@torch.no_grad()
def all_gather_concat(t: Tensor) -> Tensor:
    """Concatenate ``t`` ([B_rank, ...]) from all ranks in rank order, without gradients.

    Ranks may hold different numbers of rows (the last evaluation batch): each rank pads to the largest count,
    gathers, and the padding is cut away again. Returns ``t.detach()`` in a single process.
    """
    t = t.detach()
    world = get_world_size()
    if world == 1:
        return t
    t = t.contiguous()
    count = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = t
    if t.shape[0] < longest:
        padded = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))], dim=0)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-process number over all ranks (the number itself in a single process)."""
    if not is_dist_ready() or get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / get_world_size()


def shard(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Contiguous share of ``range(n)`` for ``rank`` (default: this process): concatenating the shards in rank
    order gives ``range(n)``, so a gather in rank order keeps the order."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(n * rank // world_size, n * (rank + 1) // world_size)
