"""Mixed precision: one place that turns a ``--precision`` string into an autocast context, its dtype and a scaler
decision."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is not supported on cpu (slow and unscaled there); use bf16 or fp32")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype autocast computes in for ``precision`` (fp32: float32)."""
    return _DTYPES.get(precision, torch.float32)


def default_precision(device: torch.device | str) -> str:
    """What inference uses when the user names none: bf16 on a GPU, fp32 on the CPU."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def get_autocast(precision: str, device: torch.device | str) -> ContextManager:
    """A context manager for the forward pass: nothing for fp32, ``torch.autocast`` to bf16/fp16 otherwise."""
    device = torch.device(device)
    _check(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def needs_grad_scaler(precision: str, device: torch.device | str) -> bool:
    """fp16 needs loss scaling (its exponent range is too small for small gradients); bf16 and fp32 do not."""
    device = torch.device(device)
    _check(precision, device)
    return precision == "fp16"
