"""Throughput of the project's BEiT-3 against the official implementation (torchscale), in one process.

Settings (each prints one JSON line):
- ``train``: one optimisation step on a batch of image+caption pairs: both encoders, the symmetric contrastive loss,
  backward and AdamW; reported in pairs/s (optionally with activation checkpointing, optionally torch.compile'd).
- ``encode_image`` / ``encode_text``: inference throughput in images/s and texts/s (no grad).
- ``infer_stage``: the test stage on synthetic tensors: two models each encode a gallery and its queries, then the
  chunked top-10; reported in seconds (the real data has 17,611 images and 17,611 queries).
- ``attention``: the attention op alone on the model's image and text shapes, once per ``--sdpa`` preference: the
  kernel that runs, forward+backward time, and the largest error of the output and the input gradients against an
  fp32 reference (the math kernel): whether a preference is faster, and still right, on this GPU.
- ``ffn``: the FFN's GELU + Sub-LN alone on the image shape (batch x tokens rows of the FFN width), as eager ops, as
  inductor compiles them for ``--compile`` (with erf, and with the fitted normal CDF that ``--compile`` uses on a GPU:
  ``compiled_fitted``), and as the project's Triton kernel (``--fused_ffn``, GPU only): time of
  forward+backward, of the forward (no grad) and of the backward alone, each with its bandwidth over the least memory
  traffic it needs, the launch shape the autotuner chose (``launch``) with every candidate's time (``tuning_ms``),
  and the largest error against fp32.
The official model is timed on the same shapes, inputs and precision; ``ratio`` = ours / official. MFU counts model
FLOPs (3x forward for a training step; recomputation by checkpointing is not counted) over a matmul peak measured in
the same run. The FLOPs are the full model's for both implementations; the project's last layer computes the first
token only, so its MFU is an effective figure (at most ~4% above the FLOPs it really performs, for large).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import gelu, kernels
from .encoding import encode_token_batches
from .modeling import (SDPA_ORDERS, BEiT3Config, BEiT3Retrieval, attention, compile_layers, get_config,
                       inductor_options, sdpa_preference, set_sdpa, uses_fitted_gelu)
from .precision import compute_dtype, get_autocast
from .retrieval import topk_similarity

TEXT_LEN = 64
# --gelu_cdf: compile_layers' fitted_gelu (auto: the fitted CDF for CUDA tensors)
GELU_CDF: dict[str, bool | None] = {"auto": None, "fitted": True, "erf": False}


def add_gelu_cdf_argument(parser: argparse.ArgumentParser) -> None:
    """``--gelu_cdf`` of benchmark.py and tools/gpu_profile.py (one definition)."""
    parser.add_argument("--gelu_cdf", choices=list(GELU_CDF), default="auto",
                        help="GELU's normal CDF in the compiled layers: the fitted approximation "
                             "(traffic_retrieval.gelu; fewer GPU instructions, the same numbers within fp32 rounding) "
                             "or erf; auto: fitted on a GPU, erf on the CPU (default: %(default)s)")
PAIRED_SETTINGS = ("train", "train_ckpt", "encode_image", "encode_text")  # timed for the official model too


def forward_flops(cfg: BEiT3Config, tokens: int) -> float:
    """FLOPs of one encoder pass over ``tokens`` tokens (one expert per token: 12 D^2 weights per layer)."""
    d = cfg.embed_dim
    per_layer = 2 * tokens * (4 * d * d + 2 * d * cfg.ffn_dim) + 4 * tokens * tokens * d
    return cfg.depth * per_layer


def pair_flops(cfg: BEiT3Config) -> float:
    """Training FLOPs of one image+caption pair (forward + backward = 3 forwards)."""
    return 3 * (forward_flops(cfg, cfg.num_patches + 1) + forward_flops(cfg, TEXT_LEN))


def matmul_peak(device: torch.device, precision: str, n: int) -> float:
    """Measured FLOP/s of an n^3 matmul in the benchmark's precision: the practical ceiling for MFU."""
    dtype = compute_dtype(precision)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, device, warmup=2, iters=5)
    return 2 * n**3 / t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[..., object], device: torch.device, warmup: int, iters: int,
          setup: Callable[[], tuple] | None = None) -> float:
    """Median seconds per call after ``warmup`` calls; ``setup``, if given, runs untimed before each call and
    returns ``fn``'s arguments."""
    for _ in range(warmup):
        fn(*(setup() if setup else ()))
    _sync(device)
    times = []
    for _ in range(iters):
        args = setup() if setup else ()
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def import_official() -> tuple[type, type]:
    """torchscale's ``EncoderConfig`` and ``BEiT3``, or SystemExit saying what to install."""
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    except ImportError as e:
        raise SystemExit(f"the reference needs torchscale==0.3.0 and fairscale==0.4.0 ({e}); "
                         "install requirements-oracle.txt with --no-deps, or pass --reference none") from None
    return EncoderConfig, BEiT3


class OfficialModel(nn.Module):
    """torchscale's BEiT3 with the official retrieval heads (needs ``torchscale`` and ``fairscale``)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        EncoderConfig, BEiT3 = import_official()
        args = EncoderConfig(
            img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
            layernorm_embedding=False, normalize_output=True, no_output_layer=True,
            drop_path_rate=cfg.drop_path_rate, encoder_embed_dim=cfg.embed_dim,
            encoder_attention_heads=cfg.num_heads, encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.depth,
            checkpoint_activations=cfg.checkpoint_activations, max_source_positions=cfg.max_text_positions,
        )
        self.beit3 = BEiT3(args)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"][:, 0]
        return F.normalize(self.vision_head(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=tokens, visual_tokens=None, text_padding_position=padding_mask)
        return F.normalize(self.language_head(x["encoder_out"][:, 0]), dim=-1)


@dataclass
class Inputs:
    images: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


def make_texts(cfg: BEiT3Config, n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` token sequences of 8 to 64 tokens (uniform), padded to 64: (tokens, padding_mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, TEXT_LEN + 1, (n,), generator=g)
    tokens = torch.randint(4, min(cfg.vocab_size, 64000), (n, TEXT_LEN), generator=g)
    mask = (torch.arange(TEXT_LEN)[None] >= lengths[:, None]).long()
    tokens[:, 0] = 0
    tokens[mask.bool()] = 1
    return tokens.to(device), mask.to(device)


def make_inputs(cfg: BEiT3Config, batch: int, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    return Inputs(images.to(device), *make_texts(cfg, batch, device, seed))


def _contrastive(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp() * img.float() @ txt.float().T
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build(impl: str, name: str, device: torch.device, checkpointing: bool, compile: bool,
          img_size: int | None, drop_path: float = 0.0, fitted_gelu: bool | None = None) -> nn.Module:
    cfg = get_config(name, img_size=img_size, checkpoint_activations=checkpointing, drop_path_rate=drop_path)
    with device:  # initialise on the device: a large model's CPU init alone takes many seconds
        model = BEiT3Retrieval(cfg) if impl == "ours" else OfficialModel(cfg)
    return compile_layers(model, fitted_gelu=fitted_gelu) if compile and impl == "ours" else model


def _gelu_cdf(args, device: torch.device) -> str:
    """The normal CDF the compiled layers' GELU uses: "fitted" or "erf" (``--gelu_cdf``, auto resolved)."""
    return "fitted" if uses_fitted_gelu(GELU_CDF[args.gelu_cdf], device) else "erf"


def bench_train(model: nn.Module, inp: Inputs, device: torch.device, precision: str, warmup: int, iters: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()

    def step() -> None:
        with get_autocast(precision, device):
            img = model.encode_image(inp.images)
            txt = model.encode_text(inp.tokens, inp.mask)
            loss = _contrastive(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return _time(step, device, warmup, iters)


@torch.no_grad()
def bench_encode(model: nn.Module, inp: Inputs, device: torch.device, precision: str, what: str, warmup: int,
                 iters: int) -> float:
    model.eval()

    def run() -> None:
        if what == "text" and isinstance(model, BEiT3Retrieval):
            # the project's text pipeline: batches of similar length, trimmed to their longest text
            encode_token_batches(model, inp.tokens, inp.mask, batch_size=max(1, len(inp.tokens) // 4), device=device,
                                 precision=precision)
            return
        with get_autocast(precision, device):
            model.encode_image(inp.images) if what == "image" else model.encode_text(inp.tokens, inp.mask)

    return _time(run, device, warmup, iters)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def run_setting(setting: str, impl: str, args, device: torch.device) -> dict:
    """Time one (setting, implementation); an out-of-memory error is reported, not raised."""
    cfg = get_config(args.model, img_size=args.input_size)
    ckpt = setting == "train_ckpt"
    batch = {"encode_image": args.encode_batch, "encode_text": args.text_batch}.get(setting, args.batch_size)
    row = {"setting": setting, "impl": impl, "model": args.model, "img_size": cfg.img_size, "batch": batch,
           "precision": args.precision, "checkpointing": ckpt, "drop_path": args.drop_path,
           "sdpa": args.sdpa if impl == "ours" else "default",
           "compile": bool(args.compile and impl == "ours"), "fused_ffn": bool(args.fused_ffn and impl == "ours"),
           "gelu_cdf": _gelu_cdf(args, device) if args.compile and impl == "ours" else None}
    # (trimmed text batches vary in length: dynamo recompiles once with a dynamic length, within the warm-up)
    _free(device)
    try:
        model = build(impl, args.model, device, ckpt, row["compile"], args.input_size, args.drop_path,
                      GELU_CDF[args.gelu_cdf])
        inp = make_inputs(cfg, batch, device)
        if setting in ("train", "train_ckpt"):
            t = bench_train(model, inp, device, args.precision, args.warmup, args.iters)
            row.update(pairs_per_s=batch / t, tflops=batch * pair_flops(cfg) / t / 1e12)
        elif setting == "encode_image":
            t = bench_encode(model, inp, device, args.precision, "image", args.warmup, args.iters)
            row.update(images_per_s=batch / t, tflops=batch * forward_flops(cfg, cfg.num_patches + 1) / t / 1e12)
        else:
            t = bench_encode(model, inp, device, args.precision, "text", args.warmup, args.iters)
            # The model FLOPs of the texts' real lengths (padding is not work a text needs), for both implementations:
            # the official code pads to 64 and ours trims, so this MFU says how well each spends the same work.
            useful = sum(forward_flops(cfg, int(n)) for n in (~inp.mask.bool()).sum(dim=1).tolist())
            row.update(texts_per_s=batch / t, tflops=useful / t / 1e12)
        row.update(seconds_per_iter=t, iters=args.iters)
        if row["fused_ffn"] and not kernels.INTERPRETED:
            # per range of rows: a pick that varies explains a varying speed, and the candidates' times say how far
            # apart they were (what a pinned launch shape would be chosen from)
            row.update(launch=kernels.chosen_launch(), tuning_ms=kernels.tuning_ms())
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        row["error"] = "out of memory"
    row["peak_mem_gb"] = _peak_gb(device)
    model = inp = None  # noqa: F841 (free before the next setting)
    _free(device)
    return row


@torch.no_grad()
def run_infer_stage(args, device: torch.device) -> dict:
    """Two models encode ``--infer_gallery`` images and as many queries, then the chunked top-10 per model."""
    cfg = get_config(args.model, img_size=args.input_size)
    n = args.infer_gallery
    _free(device)
    models = [build("ours", args.model, device, False, args.compile, args.input_size,
                    fitted_gelu=GELU_CDF[args.gelu_cdf]).eval() for _ in range(2)]
    inp = make_inputs(cfg, args.encode_batch, device)
    tokens, mask = make_texts(cfg, n, device, seed=1)

    def encode(m: nn.Module, image_batches: list[int], texts: bool) -> None:
        with get_autocast(args.precision, device):
            feats = torch.cat([m.encode_image(inp.images[:b]).float() for b in image_batches])
        if texts:
            txt = encode_token_batches(m, tokens, mask, batch_size=args.text_batch, device=device,
                                       precision=args.precision)
            topk_similarity(txt, feats, k=10, device=device)

    sizes = [min(args.encode_batch, n - start) for start in range(0, n, args.encode_batch)]
    # Warm-up with every shape the timed pass meets (both image batch sizes, the texts' trimmed lengths), so the
    # clock measures encoding, not compiling; the warm-up is reported on its own.
    t0 = time.perf_counter()
    for m in models:
        encode(m, sorted(set(sizes)), texts=True)
    _sync(device)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in models:
        encode(m, sizes, texts=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    row = {"setting": "infer_stage", "impl": "ours", "model": args.model, "img_size": cfg.img_size, "models": 2,
           "gallery": n, "queries": n, "precision": args.precision, "sdpa": args.sdpa, "compile": bool(args.compile),
           "gelu_cdf": _gelu_cdf(args, device) if args.compile else None, "fused_ffn": args.fused_ffn,
           "seconds": seconds, "warmup_seconds": warmup, "peak_mem_gb": _peak_gb(device)}
    models = None  # noqa: F841
    _free(device)
    return row


def run_attention_check(args, device: torch.device) -> list[dict]:
    """The ``attention`` setting (module docstring): one row per (shape, --sdpa preference)."""
    cfg = get_config(args.model, img_size=args.input_size)
    h, hd, b = cfg.num_heads, cfg.embed_dim // cfg.num_heads, args.batch_size
    dtype = compute_dtype(args.precision)
    _, pad = make_texts(cfg, b, device)
    shapes = {"image": (cfg.num_patches + 1, None), "text": (TEXT_LEN, (pad == 0)[:, None, None, :])}
    rows = []
    for what, (length, mask) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(b, h, length, hd, generator=g, device=device) for _ in range(4))
        with sdpa_kernel(SDPBackend.MATH):  # called directly: attention() would apply the --sdpa preference
            ref = _attention_pass(q, k, v, grad, mask, F.scaled_dot_product_attention)
        inputs = [t.to(dtype) for t in (q, k, v, grad)]
        for name in SDPA_ORDERS:
            set_sdpa(name)
            out = _attention_pass(*inputs, mask)
            errors = [(o.float() - r).abs().max().item() / r.abs().max().item() for o, r in zip(out, ref)]
            t = _time(lambda: _attention_pass(*inputs, mask), device, args.warmup, args.iters)
            rows.append({"setting": "attention", "shape": what, "sdpa": name, "kernel": _sdpa_kernel_name(inputs, mask),
                         "batch": b, "tokens": length, "heads": h, "head_dim": hd, "precision": args.precision,
                         "seconds_fwd_bwd": t, "rel_err_out": errors[0], "rel_err_grad": max(errors[1:])})
    set_sdpa(args.sdpa)
    return rows


def _attention_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                    fn: Callable = attention) -> list[torch.Tensor]:
    """Output and (dq, dk, dv) of one attention call for the upstream gradient ``grad``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]


def _sdpa_kernel_name(qkv: list[torch.Tensor], mask: torch.Tensor | None) -> str:
    """The attention backend the dispatcher picks for these inputs under the current preference."""
    names = {b.value: name for name, b in SDPBackend.__members__.items()}
    with sdpa_preference():
        return names[torch._fused_sdp_choice(*qkv[:3], mask)]


def _gelu_layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    # the fp32 weights in x's dtype, as the fused kernel takes them (layer_norm wants one dtype; the grads stay fp32)
    return F.layer_norm(F.gelu(x), (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps)


def _fitted_gelu_layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """As the FFN of layers compiled with the fitted CDF computes it (``compile_layers``, compiled only)."""
    return F.layer_norm(gelu.fitted_gelu(x), (x.shape[-1],), w.to(x.dtype), b.to(x.dtype), eps)


def run_ffn_check(args, device: torch.device) -> list[dict]:
    """The ``ffn`` setting (module docstring): one row per implementation of the FFN's GELU + Sub-LN."""
    cfg = get_config(args.model, img_size=args.input_size)
    rows_n, n = args.batch_size * (cfg.num_patches + 1), cfg.ffn_dim
    dtype = compute_dtype(args.precision)
    g = torch.Generator(device=device).manual_seed(0)
    x, grad = (torch.randn(rows_n, n, generator=g, device=device) for _ in range(2))
    w, b = 1 + 0.1 * torch.randn(n, generator=g, device=device), 0.1 * torch.randn(n, generator=g, device=device)
    ref = _ffn_pass(_gelu_layernorm, x, grad, w, b, cfg.layernorm_eps)
    cuda = device.type == "cuda"
    impls = {"eager": _gelu_layernorm,
             "compiled": torch.compile(_gelu_layernorm, options=inductor_options() if cuda else None),
             "compiled_fitted": torch.compile(_fitted_gelu_layernorm, options=inductor_options(gelu.INDUCTOR_OPTIONS)
                                              if cuda else gelu.INDUCTOR_OPTIONS),
             "fused": kernels.gelu_layernorm}
    # least traffic: read x, write y; read dy and x, write dx (the weights are negligible)
    tensor_bytes = rows_n * n * torch.finfo(dtype).bits // 8
    xs, grads = x.to(dtype), grad.to(dtype)
    rows = []
    for name, fn in impls.items():
        row = {"setting": "ffn", "impl": name, "rows": rows_n, "features": n, "precision": args.precision}
        if name == "fused" and not kernels.supports(xs):
            rows.append({**row, "error": "the Triton kernel needs a CUDA device"})
            continue
        out = _ffn_pass(fn, xs, grads, w, b, cfg.layernorm_eps)
        errors = [(o.float() - r).abs().max().item() / r.abs().max().item() for o, r in zip(out, ref)]
        t = _time(lambda: _ffn_pass(fn, xs, grads, w, b, cfg.layernorm_eps), device, args.warmup, args.iters)
        with torch.no_grad():
            t_fwd = _time(lambda: fn(xs, w, b, cfg.layernorm_eps), device, args.warmup, args.iters)
        t_bwd = _time(lambda out, inputs: torch.autograd.grad(out, inputs, grads), device, args.warmup, args.iters,
                      setup=lambda: _ffn_forward(fn, xs, w, b, cfg.layernorm_eps))
        row.update(seconds_fwd_bwd=t, gb_per_s=5 * tensor_bytes / t / 1e9, seconds_fwd=t_fwd,
                   gb_per_s_fwd=2 * tensor_bytes / t_fwd / 1e9, seconds_bwd=t_bwd,
                   gb_per_s_bwd=3 * tensor_bytes / t_bwd / 1e9, rel_err_out=errors[0], rel_err_grad=max(errors[1:]))
        if name == "fused" and not kernels.INTERPRETED:
            row.update(launch=kernels.chosen_launch(), tuning_ms=kernels.tuning_ms())
        rows.append(row)
    return rows


def _ffn_pass(fn: Callable, x: torch.Tensor, grad: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              eps: float) -> list[torch.Tensor]:
    """Output and (dx, dw, db) of one GELU + LayerNorm for the upstream gradient ``grad``."""
    out, inputs = _ffn_forward(fn, x, w, b, eps)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def _ffn_forward(fn: Callable, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One GELU + LayerNorm with autograd, and its inputs: what a backward alone is timed on."""
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    return fn(*inputs, eps), inputs


KERNEL_CHECKS = {"attention": run_attention_check, "ffn": run_ffn_check}  # one op alone, a row per variant


def run(args) -> list[dict]:
    if args.reference == "torchscale" and set(args.settings) & set(PAIRED_SETTINGS):
        import_official()  # fail now, not after the first setting has spent its (GPU) time
    device = torch.device(args.device)
    peak = matmul_peak(device, args.precision, args.peak_n)
    rows: list[dict] = []
    impls = ["ours"] + (["official"] if args.reference == "torchscale" else [])
    for setting in args.settings:
        if setting in KERNEL_CHECKS:
            for row in KERNEL_CHECKS[setting](args, device):
                rows.append({**row, "device": _device_name(device), "torch": torch.__version__})
                print(json.dumps(rows[-1]), flush=True)
            continue
        if setting == "infer_stage":
            rows.append(run_infer_stage(args, device))
            print(json.dumps(rows[-1]), flush=True)
            continue
        pair = {}
        for impl in impls:
            row = run_setting(setting, impl, args, device)
            if "tflops" in row:
                row["mfu"] = row["tflops"] * 1e12 / peak
            pair[impl] = row
        if "official" in pair:
            key = next((k for k in ("pairs_per_s", "images_per_s", "texts_per_s") if k in pair["ours"]), None)
            if key and key in pair["official"]:
                pair["ours"]["ratio"] = pair["ours"][key] / pair["official"][key]
        for impl in impls:
            pair[impl]["peak_tflops"] = peak / 1e12
            pair[impl]["device"] = _device_name(device)
            pair[impl]["torch"] = torch.__version__
            rows.append(pair[impl])
            print(json.dumps(pair[impl]), flush=True)
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
