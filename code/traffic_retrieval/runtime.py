"""Process-level setup shared by the stage scripts: logging, torch threads, device choice."""

from __future__ import annotations

import argparse
import logging
import os

import torch

from . import kernels
from .modeling import SDPA_ORDERS, set_fused_ffn, set_sdpa


def default_threads() -> int:
    """Torch CPU threads when the user gives none: 1 on small machines.

    On 2 shared cores one thread was measured up to 10x faster than two whenever another process was busy;
    on bigger machines use all cores but one.
    """
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    n = os.cpu_count() or 1
    return 1 if n <= 2 else n - 1


def setup(threads: int | None = None, sdpa: str = "default", level: int = logging.INFO) -> None:
    """Configure logging once (called from ``main()`` only), the number of torch threads and the attention kernel
    preference (``--sdpa``, see :data:`traffic_retrieval.modeling.SDPA_ORDERS`)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads if threads and threads > 0 else default_threads())
    set_sdpa(sdpa)


def add_sdpa_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--sdpa``: the attention kernel preference on a GPU (one definition for every script that runs the model)."""
    parser.add_argument("--sdpa", choices=list(SDPA_ORDERS), default="default",
                        help="attention kernels on a GPU: PyTorch's own order (on an H100 with torch 2.11 it "
                             "already picks cuDNN's) or cuDNN's fused attention first (default: %(default)s)")


def add_fused_ffn_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--fused_ffn``: the FFN's GELU + sub-LN as one Triton kernel on a GPU (one definition for every script)."""
    parser.add_argument("--fused_ffn", action="store_true",
                        help="run the FFN's GELU + sub-LayerNorm as one Triton kernel (GPU only; the same numbers "
                             "within fp32 rounding; off by default until it is faster in every measured run, "
                             "README 'Performance')")


def use_fused_ffn(enabled: bool, device: str | torch.device | None) -> None:
    """Turn the fused FFN kernel on or off for this process; on, it needs a CUDA ``device`` (``auto`` resolved) and
    Triton. (Under Triton's interpreter, for tests, CPU tensors take the kernel too.)"""
    if enabled:
        dev = resolve_device(str(device) if device is not None else None)
        if dev.type != "cuda" and not kernels.INTERPRETED:
            raise SystemExit(f"--fused_ffn runs a GPU kernel, and the device is {dev}: leave it off on a CPU "
                             "(the model then runs the unfused GELU and LayerNorm)")
    try:
        set_fused_ffn(enabled)
    except ValueError as e:  # no Triton in this torch build
        raise SystemExit(f"--fused_ffn: {e}") from None


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks cuda when available, else cpu; an explicit cuda request without a GPU is an error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} requested but no CUDA device is available; use --device cpu")
    return dev
