"""Count the machine instructions of inductor's Triton kernels for one encoder layer, on a machine without a GPU.

Inductor writes the Triton kernels of a compiled layer (forward and backward) with its Triton backend for the CPU
(``cpu_backend="triton"``); this script keeps their source as it is generated and stops there, as running them
would need Triton's CPU backend. Triton then compiles the chosen kernels for an H100 (sm_90) and ``nvdisasm`` /
``ptxas -v`` (shipped with Triton) report instructions, registers and spills: how much a change, such as
``--fitted_gelu``, removes from the GPU's work, before a GPU is at hand. The launch shape (``--warps``; one row per
program for persistent reductions, ``--xblock`` x ``--rblock`` tiles for the others) is an assumption: on a GPU
inductor's autotuner picks it. Fusion decisions come from the CPU-side Triton scheduler with inductor's GPU threshold
for materialising intermediates (30, or what ``--fitted_gelu`` / ``--inductor`` set). A development tool: it hooks into inductor's internals (tested
with torch 2.11 and Triton 3.6, the GPU machines' versions, and torch 2.14 with Triton 3.8).

    PYTHONPATH=code python tools/inductor_sass.py --containing 'libdevice.erf('               # the GELU kernels
    PYTHONPATH=code python tools/inductor_sass.py --fitted_gelu --containing 'exp2(' --warps 16
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch


def generate(model: str, batch: int, fitted_gelu: bool, options: dict, cache: Path) -> dict[str, str]:
    """Kernel name -> Triton source of one encoder layer's forward and backward (image tokens, bf16 autocast)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # a fresh cache: nothing is reused from other runs
    os.environ["TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    import torch.utils._triton as torch_triton
    from torch._inductor.async_compile import AsyncCompile

    from traffic_retrieval import gelu, modeling

    inductor_config.cpu_backend = "triton"
    inductor_config.realize_opcount_threshold = 30  # the GPU default (the CPU's is higher)
    functorch_config.force_non_lazy_backward_lowering = True  # generate the backward now, with the forward
    torch_triton.triton_hash_with_backend = lambda: "0" * 64  # no Triton driver without a GPU (nor a CPU backend)
    sources: dict[str, str] = {}

    def keep(self, kernel_name: str, source_code: str, device_str: str = "cuda"):  # noqa: ANN202, ARG001
        # (the forward's and the backward's kernels are numbered apart: a name can come twice)
        name, n = kernel_name, 1
        while name in sources and sources[name] != source_code:
            n += 1
            name = f"{kernel_name}.{n}"
        sources[name] = source_code  # and no kernel is returned: nothing runs

    AsyncCompile.triton = keep
    cfg = modeling.get_config(model)
    layer = modeling.EncoderLayer(cfg, 0.0)
    for ffn in (layer.ffn.A, layer.ffn.B):
        ffn.fitted_gelu = fitted_gelu
    opts = {**modeling.INDUCTOR_OPTIONS, **(gelu.INDUCTOR_OPTIONS if fitted_gelu else {}), **options}

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x, modeling.ALL_VISION, None)

    x = torch.randn(batch, cfg.num_patches + 1, cfg.embed_dim, requires_grad=True)
    try:
        step_compiled = torch.compile(step, options=opts)
        step_compiled(x)
    except Exception as e:  # noqa: BLE001  (the first kernel call fails: no kernel was built, by design)
        if not sources:
            raise RuntimeError("inductor generated no Triton kernel") from e
    return sources


def compile_for_hopper(name: str, source: str, warps: int, blocks: dict[str, int], work: Path) -> dict:
    """Compile one inductor kernel for sm_90: instructions (no NOPs), MUFU instructions, registers, spill bytes."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    captured = {}

    def capture(*_, triton_meta: dict, **__):  # noqa: ANN202  (stands in for inductor's heuristics decorator)
        def wrap(fn):  # noqa: ANN001, ANN202
            captured.update(fn=fn, meta=triton_meta)
            return fn
        return wrap

    source = source.replace("triton_helpers.set_driver_to_cpu()", "")
    source = re.sub(r"@triton_heuristics\.\w+\(", "@_capture(", source)
    path = work / f"{name}.py"
    path.write_text(source)
    exec(compile(source, str(path), "exec"), {"_capture": capture, "__file__": str(path)})  # noqa: S102
    fn, meta = captured["fn"], captured["meta"]
    signature = dict(meta["signature"])
    constexprs = {k: blocks[k] for k, v in signature.items() if v == "constexpr" and k in blocks}
    attrs = {key: value for config in meta.get("configs", []) for key, value in config.items()}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    (work / "k.cubin").write_bytes(kernel.asm["cubin"])
    (work / "k.ptx").write_text(kernel.asm["ptx"])
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(work / "k.cubin")], capture_output=True, text=True,
                          check=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln) and "NOP" not in ln]
    report = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", str(work / "k.ptx"), "-o",
                             str(work / "k2.cubin")], capture_output=True, text=True, check=True).stderr
    return {"instructions": len(lines), "mufu": sum("MUFU" in ln for ln in lines),
            "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="beit3_large_patch16_384")
    p.add_argument("--batch", type=int, default=2, help="images (the kernels' code hardly depends on it)")
    p.add_argument("--fitted_gelu", action="store_true", help="compile_layers(..., fitted_gelu=True)'s layer")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE", help="inductor config settings on top")
    p.add_argument("--kernels", default=".", help="regex on kernel names to compile (default: all)")
    p.add_argument("--containing", default=None, metavar="TEXT",
                   help="only kernels whose source contains TEXT, e.g. 'libdevice.erf(' or 'exp2(' (GELU's CDF)")
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--xblock", type=int, default=32,
                   help="XBLOCK of pointwise kernels and looped reductions (persistent reductions take one row: 1)")
    p.add_argument("--rblock", type=int, default=32, help="R0_BLOCK of looped reductions")
    p.add_argument("--save", type=Path, default=None, help="folder to keep the kernels' Triton source in")
    a = p.parse_args()
    options = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in a.inductor)}
    with tempfile.TemporaryDirectory() as tmp:
        sources = generate(a.model, a.batch, a.fitted_gelu, options, Path(tmp) / "cache")
        print(f"{len(sources)} kernels generated; sm_90, {a.warps} warps")
        failed: list[str] = []
        for name, source in sorted(sources.items()):
            if a.save:
                a.save.mkdir(parents=True, exist_ok=True)
                (a.save / f"{name}.py").write_text(source)
            if not re.search(a.kernels, name) or (a.containing and a.containing not in source):
                continue
            blocks = {"XBLOCK": 1 if name.startswith("triton_per_") else a.xblock, "YBLOCK": a.xblock,
                      "R0_BLOCK": a.rblock}
            try:
                r = compile_for_hopper(name, source, a.warps, blocks, Path(tmp))
            except Exception as e:  # noqa: BLE001  (report it and go on with the other kernels)
                failed.append(name)
                print(f"could not compile {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            print(f"{r['instructions']:6d} instr {r['mufu']:4d} MUFU {r['registers']:4d} regs "
                  f"{r['spill_bytes']:4d} B spilled  {name}")
    if failed:
        raise SystemExit(f"{len(failed)} kernel(s) did not compile")


if __name__ == "__main__":
    main()
