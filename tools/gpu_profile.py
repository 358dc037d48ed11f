"""Where a training step's GPU time goes: GEMMs, attention, fused Triton kernels, the optimizer.

Builds the project's model (default BEiT-3 large@384, batch 80, bf16, no checkpointing, fused AdamW, as
``code/benchmark.py --settings train``), times the step, splits it into image forward, text forward, loss+backward
and optimizer with CUDA events, measures how long Python takes to issue one step (if close to the step time, the GPU
waits for the CPU), and with ``--profile`` sums the kernels of two steps by kind and lists the 30 longest.
``--variant`` compares ways of compiling: ``layers`` (the project's ``--compile``), ``reduce_overhead`` (the same with
CUDA graphs), ``whole`` (one graph for the whole forward), ``eager``; ``--inductor KEY=VALUE`` sets inductor options
on top (e.g. ``triton.multi_kernel=0`` for the layers without the project's multi-kernel option); ``--fused_ffn``
runs the FFN's GELU + LayerNorm as the project's Triton kernel; ``--gelu_cdf erf`` compiles the layers' GELU with
erf instead of the fitted normal CDF of ``traffic_retrieval.gelu`` (the default on a GPU). One JSON line per run;
results: ``tools/bench_results/``.

    PYTHONPATH=code python tools/gpu_profile.py --profile
    PYTHONPATH=code python tools/gpu_profile.py --device cpu --model beit3_tiny_patch8_64 --batch 8 --precision fp32
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import torch
import torch._inductor.config as inductor_config
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from traffic_retrieval.bench import GELU_CDF, _contrastive, _time, add_gelu_cdf_argument, build, make_inputs
from traffic_retrieval.modeling import compile_layers, get_config, set_fused_ffn
from traffic_retrieval.precision import get_autocast

KINDS = {  # kernel-name fragments -> kind, first match wins
    "attention": ("cudnn", "fmha", "flash", "attention", "sdpa"),
    "gemm": ("gemm", "nvjet", "cutlass", "sm90", "xmma", "cublas", "matmul"),
    "optimizer": ("adam", "multi_tensor", "foreach"),
    "triton": ("triton",),
}


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, parts in KINDS.items() if any(p in name for p in parts)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["layers", "reduce_overhead", "whole", "eager"], default="layers")
    p.add_argument("--model", default="beit3_large_patch16_384")
    p.add_argument("--batch", type=int, default=80)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--profile", action="store_true", help="kernel time by kind, and the 30 longest kernels")
    p.add_argument("--fused_ffn", action="store_true", help="the FFN's GELU + LayerNorm as one Triton kernel")
    add_gelu_cdf_argument(p)
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE", help="inductor config settings")
    a = p.parse_args()
    if a.fused_ffn and not a.device.startswith("cuda"):
        p.error("--fused_ffn is a GPU kernel: give --device cuda")
    if a.gelu_cdf != "auto" and a.variant not in ("layers", "reduce_overhead"):
        p.error("--gelu_cdf is an option of compile_layers: use --variant layers or reduce_overhead")
    if a.gelu_cdf == "fitted" and a.fused_ffn:
        p.error("--gelu_cdf fitted and --fused_ffn replace the same GELU: give one of them")
    options = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in a.inductor)}

    set_fused_ffn(a.fused_ffn)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = build("ours", a.model, dev, False, False, None)
    if a.variant == "layers":
        compile_layers(model, options=options, fitted_gelu=GELU_CDF[a.gelu_cdf])
    elif a.variant == "reduce_overhead":  # what mode="reduce-overhead" sets
        compile_layers(model, options={"triton.cudagraphs": True, **options},
                       fitted_gelu=GELU_CDF[a.gelu_cdf])
    else:
        inductor_config.patch(options).__enter__()  # for the whole process
    inp = make_inputs(get_config(a.model), a.batch, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    model.train()

    def forward(images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with get_autocast(a.precision, dev):
            return _contrastive(model.encode_image(images), model.encode_text(tokens, mask), model.logit_scale)

    loss_fn = torch.compile(forward) if a.variant == "whole" else forward

    def step() -> None:
        loss = loss_fn(inp.images, inp.tokens, inp.mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    step()
    sync()
    row = {"variant": a.variant, "inductor": a.inductor, "fused_ffn": a.fused_ffn, "gelu_cdf": a.gelu_cdf,
           "warmup_s": time.perf_counter() - t0}
    t = _time(step, dev, 2, 8)
    row.update(pairs_per_s=a.batch / t, step_ms=t * 1e3,
               peak_gb=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)
    sync()
    t0 = time.perf_counter()
    step()  # no sync: how long Python takes to issue the step's kernels
    row["cpu_issue_ms"] = (time.perf_counter() - t0) * 1e3
    sync()
    if dev.type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        ev[0].record()
        with get_autocast(a.precision, dev):
            img = model.encode_image(inp.images)
            ev[1].record()
            txt = model.encode_text(inp.tokens, inp.mask)
            ev[2].record()
            loss = _contrastive(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ev[3].record()
        opt.step()
        ev[4].record()
        sync()
        for i, key in enumerate(["image_fwd_ms", "text_fwd_ms", "loss_bwd_ms", "optim_ms"]):
            row[key] = ev[i].elapsed_time(ev[i + 1])
    print(json.dumps(row), flush=True)

    if a.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            step()
            sync()
        per_kind: dict[str, float] = {}
        kernels = []
        for e in prof.key_averages():
            if e.device_type != DeviceType.CUDA:
                continue
            ms = e.self_device_time_total / 2 / 1e3  # per step
            kind = kernel_kind(e.key)
            per_kind[kind] = per_kind.get(kind, 0.0) + ms
            kernels.append((ms, e.count // 2, kind, e.key[:110]))
        print(json.dumps({"variant": a.variant, "gpu_ms_per_step": {k: round(v, 2) for k, v in per_kind.items()},
                          "gpu_total_ms": round(sum(per_kind.values()), 2)}), flush=True)
        for ms, count, kind, name in sorted(kernels, reverse=True)[:30]:
            print(f"{ms:8.2f} ms {count:6d}x {kind:9s} {name}", flush=True)


if __name__ == "__main__":
    main()
