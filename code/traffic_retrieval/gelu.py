"""The exact (erf) GELU with its normal CDF from a fitted approximation: fewer GPU instructions, fp32 accuracy.

GELU(x) = x * Phi(x), Phi the standard normal CDF. Here Phi(-|x|) = erfc(a) / 2 = exp(-a^2) * t * sum_i c_i t^i with
a = |x| / sqrt 2 and t = 1 / (1 + 0.55 a): the form of Abramowitz & Stegun 7.1.26, with six coefficients fitted
minimax (absolute error of erfc 1.7e-8; A&S's five: 1.5e-7). After fp32 rounding Phi is within 2.5e-7 of the truth,
a few ulp, and for x < 0 it is computed directly, without the cancellation of 1 + erf (0 in fp32 before x = -9).

Why: on the GPU, libdevice's erf takes 28 machine instructions per element (sm_90), this CDF with the exponential
that GELU' reuses 17, and the kernels around the FFN's GELU + sub-LN have about as much to compute as to move. Two
users: the fused Triton kernel (:mod:`traffic_retrieval.kernels`, the same constants) and the FFN of compiled layers
(``compile_layers``' ``fitted_gelu``; by default for CUDA tensors), where :func:`fitted_gelu` is a handful of torch
ops that inductor fuses into its own GELU + LayerNorm kernels. Eager code keeps ``F.gelu``: as separate ops this
would be slower there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

T_SCALE = 0.55 / math.sqrt(2)  # t = 1 / (1 + T_SCALE |x|)
EXP2_SCALE = math.sqrt(math.log2(math.e) / 2)  # exp2(-(EXP2_SCALE x)^2) = exp(-x^2 / 2)
# c_0 / 2 ... c_5 / 2: Phi(-|x|) = t * (sum_i COEFFS[i] t^i) * exp(-x^2 / 2)
COEFFS = (0.1507916813, 0.19542131325, -0.020713807, 0.3798581946, -0.2590197824, 0.05366240875)
INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)  # phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

# Inductor materialises ("realizes") an intermediate that several kernels read once its expression has more than 30
# ops (its GPU default). The fitted CDF is about 30 ops by itself: with the default, the compiled FFN's backward wrote
# Phi(-|x|) to memory as a full fp32 tensor for its weight-gradient kernels to read (4 bytes per element written, 8
# read), where with erf (one op) those kernels recompute GELU from the fc1 output. At 64 the fitted graph has the erf
# graph's kernels, one for one, and the threshold leaves the rest of the layer as it was (the same computations; two
# backward kernels write in place) (inductor's Triton code for a large@384 encoder layer, torch 2.11 and 2.14).
INDUCTOR_OPTIONS = {"realize_opcount_threshold": 64}


def normal_cdf(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(Phi(x), exp(-x^2 / 2))`` for a floating tensor (compute in fp32 for fp32 accuracy)."""
    s = x.abs()
    v = 1.0 + T_SCALE * s
    # 1 / v as rsqrt squared plus one Newton step: rsqrt is one (approximate) instruction on the GPU, a division nine
    r = torch.rsqrt(v)
    t = r * r
    t = t * (2.0 - v * t)
    h = COEFFS[5] * t + COEFFS[4]
    for c in COEFFS[3::-1]:  # Horner
        h = h * t + c
    u = s * EXP2_SCALE
    e = torch.exp2(-(u * u))
    q = t * h * e  # Phi(-|x|)
    return torch.where(x >= 0, 1.0 - q, q), e


class _FittedGELU(torch.autograd.Function):
    """GELU in fp32 with the analytic backward, GELU'(x) = Phi(x) + x phi(x), sharing Phi's exponential: what
    autograd would derive through the polynomial is longer."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        xf = x.float()
        y = xf * normal_cdf(xf)[0]
        # No .to() that returns its input: with torch 2.11 (the GPU machines' version) dynamo then traced a wrong
        # backward (input gradients off by up to 4 on fp32 inputs; torch 2.14 is right either way).
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        xf = x.float()
        cdf, e = normal_cdf(xf)
        return (dy.float() * (cdf + xf * INV_SQRT_2PI * e)).to(x.dtype)


def fitted_gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)`` (exact, erf form) within fp32 rounding, in ``x``'s dtype, computed in fp32 like inductor's."""
    return _FittedGELU.apply(x)
