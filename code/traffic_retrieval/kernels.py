"""A fused GELU + LayerNorm for the FFN's Sub-LN, written in Triton (GPU; on the CPU only under Triton's interpreter).

The FFN computes ``fc2(LayerNorm(GELU(fc1(x))))`` over 4 x the embedding width (4096 for large). On an H200 profile
of the compiled large@384 training step (tools/bench_results/h200_2026-11-27_profile.txt), inductor's kernels for
that GELU + LayerNorm took 0.84 ms forward and 0.95 + 0.26 ms backward per layer, several times what reading and
writing its tensors once costs. Here the forward reads the fc1 output once and writes the normalised output once
(keeping the row's mean and 1/std); the backward reads the incoming gradient and the fc1 output once, recomputes
GELU, writes the input gradient, and accumulates the weight and bias gradients per program (summed afterwards, so
the result is deterministic).

The numbers are those of ``F.layer_norm(F.gelu(x), ...)`` computed in fp32 (the exact, erf GELU, its normal CDF
from a fitted approximation as accurate as fp32 allows, see :mod:`traffic_retrieval.gelu`; biased variance), with the
output in ``x``'s dtype: under autocast the official code's LayerNorm returns fp32 that ``fc2`` then casts to
bf16/fp16, so the output ``fc2`` receives is the same. Registered as ``torch.library`` custom ops, so that
``torch.compile`` treats them as single kernels.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import gelu

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton (e.g. CPU-only wheels): the fused op is unavailable
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton runs kernels on CPU tensors, for tests


def available() -> bool:
    """Whether Triton is installed (on the CPU, kernels also need ``TRITON_INTERPRET=1`` before this import)."""
    return triton is not None


def supports(x: Tensor) -> bool:
    """Whether the fused op can run on ``x``'s device."""
    return available() and (x.is_cuda or (INTERPRETED and x.device.type == "cpu"))


if triton is not None:

    # traffic_retrieval.gelu's constants, as compile-time constants of the kernels
    _T_SCALE = tl.constexpr(gelu.T_SCALE)
    _EXP2_SCALE = tl.constexpr(gelu.EXP2_SCALE)
    _C0, _C1, _C2, _C3, _C4, _C5 = (tl.constexpr(c) for c in gelu.COEFFS)
    _INV_SQRT_2PI = tl.constexpr(gelu.INV_SQRT_2PI)

    @triton.jit
    def _normal_cdf(x):
        # Phi(x) and exp(-x^2 / 2) as traffic_retrieval.gelu.normal_cdf computes them (see there): 17 instructions
        # per element (sm_90), where 0.5 * (1 + erf(x / sqrt 2)) with libdevice's erf takes 31 (it picks one of two
        # polynomials per element, paying a register move per coefficient) and GELU' needs an exponential more. By
        # count the kernels were as much instruction- as memory-bound (the forward's 46 instructions per element:
        # 0.29 ms of issue for the image rows at an H100's full rate, its traffic 0.25 ms; an estimate, not a
        # measurement); now the forward has 31 and the backward's loop 40 instead of 62.
        s = tl.abs(x)
        v = 1.0 + _T_SCALE * s
        r = tl.math.rsqrt(v)
        t = r * r
        t = t * (2.0 - v * t)
        h = _C5 * t + _C4  # Horner
        h = h * t + _C3
        h = h * t + _C2
        h = h * t + _C1
        h = h * t + _C0
        u = s * _EXP2_SCALE
        e = tl.exp2(-(u * u))
        q = t * h * e  # Phi(-|x|)
        return tl.where(x >= 0, 1.0 - q, q), e

    @triton.jit
    def _gelu_ln_fwd(X, W, B, Y, MEAN, RSTD, N, eps, BLOCK: tl.constexpr):
        # one program per row; the whole row stays in registers (BLOCK >= N)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        g = x * _normal_cdf(x)[0]  # GELU; GELU(0) = 0: masked lanes add nothing to the mean
        mean = tl.sum(g, axis=0) / N
        d = tl.where(mask, g - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _gelu_ln_bwd(DY, X, W, MEAN, RSTD, DX, DW, DB, M, N, rows_per_program, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, PREFETCH: tl.constexpr):
        # Each program takes a contiguous run of rows, ROWS at a time as a [ROWS, BLOCK] tile, and keeps its share
        # of dW and dB in registers. With ROWS > 1 one pass of the row reductions (and their barriers across the
        # program's warps) serves several rows, and more bytes are loaded at once.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, M)
        tile = tl.arange(0, ROWS)
        # int64: a batch's rows x features can pass 2**31
        offs = (start + tile).to(tl.int64)[:, None] * N + cols[None, :]
        # With PREFETCH the next tile's x and dy are loaded (in their storage dtype) before this tile's reductions,
        # so that their latency overlaps this tile's work: an SM holds only one or two programs to switch between.
        if PREFETCH:
            first = mask[None, :] & (start + tile < end)[:, None]
            x_next = tl.load(X + offs, mask=first, other=0.0)
            dy_next = tl.load(DY + offs, mask=first, other=0.0)
        for row in range(start, end, ROWS):
            rows = row + tile
            in_run = rows < end
            live = mask[None, :] & in_run[:, None]  # rows past the program's run (and masked lanes) are 0
            if PREFETCH:
                x = x_next.to(tl.float32)
                dy = dy_next.to(tl.float32)
                after = mask[None, :] & (rows + ROWS < end)[:, None]
                x_next = tl.load(X + offs + ROWS * N, mask=after, other=0.0)
                dy_next = tl.load(DY + offs + ROWS * N, mask=after, other=0.0)
            else:
                x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs, mask=live, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=in_run, other=0.0)[:, None]
            rstd = tl.load(RSTD + rows, mask=in_run, other=0.0)[:, None]
            # GELU' before the row sums, so that x, Phi and the exponential need not stay live across their
            # reductions (fewer registers per element).
            cdf, e = _normal_cdf(x)
            xhat = tl.where(live, (x * cdf - mean) * rstd, 0.0)
            dgelu = cdf + x * _INV_SQRT_2PI * e  # GELU'(x) = Phi(x) + x phi(x), phi(x) = e / sqrt(2 pi)
            wdy = w[None, :] * dy  # zero where not live (dy loaded as 0 there)
            c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
            c2 = tl.sum(wdy, axis=1)[:, None] / N
            dx = (wdy - (xhat * c1 + c2)) * rstd * dgelu  # LayerNorm backward, then GELU's
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=live)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            offs += ROWS * N
        tl.store(DW + pid * N + cols, dw, mask=mask)
        tl.store(DB + pid * N + cols, db, mask=mask)

    # The best launch shape depends on the GPU (registers, memory latency); it cannot be measured on the CPU where
    # this was written, so Triton's autotuner times the candidates on the first call and keeps the fastest (see
    # _tuned). The backward holds dW and dB partial sums for its rows in registers: for 4096 features ptxas (sm_90,
    # Triton 3.8) gives 128 registers per thread at 8 warps (181 with prefetching), 83 at 16 (97) and 50 at 32, so
    # one or two programs fit on an SM at a time; its grid is a few programs per SM whatever the shape (see
    # _backward_programs). Two rows per tile: 180 registers at 8 warps, 98 at 16 (128 with prefetching, the most
    # 16 warps can have); Triton keeps a tile's rows in the same thread there, so dW's sum over them needs no
    # exchange between warps. Left out, as they spill registers to memory: two-row tiles at 8 warps with prefetching
    # (past 255 registers) and four-row tiles; two-row tiles at 32 warps split the rows across warps instead.
    FWD_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]
    BWD_CONFIGS = [triton.Config({"ROWS": r, "PREFETCH": p}, num_warps=w)
                   for r, warps in ((1, (8, 16, 32)), (2, (8, 16))) for w in warps for p in (False, True)
                   if not (r == 2 and w == 8 and p)]

_TUNED: dict[tuple[str, int], object] = {}  # (kernel, rows.bit_length()) -> its autotuner


def _tuned(kind: str, rows: int):  # noqa: ANN202 (a Triton autotuner)
    """The autotuned forward (``kind="fwd"``) or backward kernel for inputs of ``rows`` rows.

    One autotuner per power-of-two range of rows, each timing the candidates on its first call: the FFN runs on
    image tokens (80 x 577 rows at large@384's batch) and on text tokens (80 x 64), whose best launches need not be
    the same. With one autotuner per width, whichever shape ran first chose for both; the text's kernels move a
    ninth of the image's bytes, nearer the timing noise, and the training step with the kernel measured 262 to 312
    pairs/s across five processes on H100s (README "Performance"; ``chosen_launch`` shows what each range picked).
    """
    key = (kind, rows.bit_length())
    if key not in _TUNED:
        kernel, configs = (_gelu_ln_fwd, FWD_CONFIGS) if kind == "fwd" else (_gelu_ln_bwd, BWD_CONFIGS)
        _TUNED[key] = triton.autotune(configs, key=["N"])(kernel)
    return _TUNED[key]


MAX_FEATURES = 16384  # a row of fp32 values must fit one program's registers
INTERPRETER_CONFIG = {"num_warps": 4, "ROWS": 2, "PREFETCH": True}  # no timing in the interpreter: one fixed shape


def _block(n: int) -> int:
    """The power of two covering a row of ``n`` features."""
    if n > MAX_FEATURES:
        raise ValueError(f"fused GELU + LayerNorm supports rows of at most {MAX_FEATURES} features, got {n}")
    return triton.next_power_of_2(n)


def _backward_programs(x: Tensor, rows: int) -> int:
    """Four programs per SM: they run in one to four waves, depending on how many fit on an SM at once, with a
    small tail either way (the interpreter: a few, each looping over rows as on the GPU)."""
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 3
    return max(min(rows, programs), 1)


@torch.library.custom_op("traffic_retrieval::gelu_layernorm_fwd", mutates_args=())
def gelu_layernorm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``LayerNorm(GELU(x))`` over the last dim, plus each row's mean and 1/std (fp32) for the backward."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        args = (x2, weight.contiguous(), bias.contiguous(), y, mean, rstd, n, eps)
        if INTERPRETED:
            _gelu_ln_fwd[(rows,)](*args, BLOCK=_block(n), num_warps=INTERPRETER_CONFIG["num_warps"])
        else:
            _tuned("fwd", rows)[(rows,)](*args, BLOCK=_block(n))
    return y.view(x.shape), mean, rstd


@gelu_layernorm_fwd.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    # contiguous like the real outputs (empty_like would copy the strides of a non-contiguous x)
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("traffic_retrieval::gelu_layernorm_bwd", mutates_args=())
def gelu_layernorm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gelu_layernorm_fwd`'s output with respect to ``x``, ``weight`` and ``bias``."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    dy2 = dy.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    programs = _backward_programs(x, rows)
    # every launched program writes its row of partial sums (zeros if its run of rows is empty): no memset needed
    partial = torch.empty if rows else torch.zeros
    dw = partial(programs, n, dtype=torch.float32, device=x.device)
    db = partial(programs, n, dtype=torch.float32, device=x.device)
    if rows:
        args = (dy2, x2, weight.contiguous(), mean, rstd, dx, dw, db, rows, n, triton.cdiv(rows, programs))
        if INTERPRETED:
            _gelu_ln_bwd[(programs,)](*args, BLOCK=_block(n), **INTERPRETER_CONFIG)
        else:
            _tuned("bwd", rows)[(programs,)](*args, BLOCK=_block(n))
    return dx.view(x.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


@gelu_layernorm_bwd.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library's signature)
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor):  # noqa: ANN001, ANN202
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = gelu_layernorm_bwd(dy, x, weight, mean, rstd)
    return dx, dw, db, None


gelu_layernorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _describe(config) -> str:  # noqa: ANN001 (a triton.Config)
    """A launch shape in a few words, e.g. ``"ROWS=2 PREFETCH=True warps=16"``."""
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"warps={config.num_warps}"])


def _range(kind: str, bits: int) -> str:
    return f"{kind}, rows < {2 ** bits}"


def chosen_launch() -> dict[str, str]:
    """The launch shape picked per kernel and range of rows, for those that have run on a GPU, e.g.
    ``{"bwd, rows < 65536": "ROWS=2 PREFETCH=True warps=16"}``."""
    # (Triton 3.6 sets best_config on an autotuner's first run; 3.8 sets None before it)
    return {_range(kind, bits): _describe(tuner.best_config) for (kind, bits), tuner in sorted(_TUNED.items())
            if getattr(tuner, "best_config", None) is not None}


def tuning_ms() -> dict[str, dict[str, float]]:
    """Every candidate's time (median ms, as Triton's autotuner measured it when it picked) per kernel and range of
    rows, fastest first: what a pinned launch shape would be chosen from, and how close the runners-up were."""
    table = {}
    for (kind, bits), tuner in sorted(_TUNED.items()):
        timings = getattr(tuner, "configs_timings", None) or {}  # set by the autotuner once it has timed them
        # each timing is Triton's do_bench quantiles (median, 20th, 80th percentile); a failed compile is inf
        ms = {_describe(c): float(t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        if ms:  # fastest first; a candidate that failed to compile (inf) last, as None (JSON has no inf)
            table[_range(kind, bits)] = {k: v if math.isfinite(v) else None
                                         for k, v in sorted(ms.items(), key=lambda item: item[1])}
    return table


def gelu_layernorm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.layer_norm(F.gelu(x), (N,), weight, bias, eps)`` in one kernel, returned in ``x``'s dtype."""
    if not supports(x):
        raise RuntimeError("the fused GELU + LayerNorm needs Triton and a CUDA tensor "
                           "(or TRITON_INTERPRET=1 for CPU tensors)")
    return gelu_layernorm_fwd(x, weight, bias, eps)[0]
