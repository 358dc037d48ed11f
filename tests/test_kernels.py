"""The fused GELU + LayerNorm Triton kernels (traffic_retrieval.kernels): numbers under Triton's interpreter, and
machine code for a Hopper GPU from Triton's own compiler (no GPU needed for either)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from traffic_retrieval import kernels, modeling
from traffic_retrieval.modeling import create_model, set_fused_ffn

CASES = Path(__file__).parent / "triton_interpreter_cases.py"


def test_kernels_under_the_interpreter():
    """tests/triton_interpreter_cases.py in a subprocess with TRITON_INTERPRET=1: values and gradients against
    torch, and the nano model with the fused FFN against the official model. (Needs the pinned Triton 3.8: the
    interpreter of Triton 3.6, torch 2.11's, cannot take a loop bound from an argument with numpy 2.4; its compiler,
    which the GPU uses, builds the kernels, as the next test shows.)"""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_every_autotune_candidate_compiles_for_hopper(which, tmp_path):
    """Each launch shape the autotuner may pick on a GPU, compiled by Triton for sm_90 (H100/H200) with the large
    model's 4096 features: catches what the interpreter does not (types, register-level code generation). No
    candidate in bf16 spills registers to memory (ptxas's report) or spreads a tile's rows over warps (Triton's
    layout), either of which would make it slow wherever it runs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    ptrs = {"*bf16": ["X", "Y", "DY", "DX"], "*fp32": ["W", "B", "MEAN", "RSTD", "DW", "DB"]}
    kind = {name: t for t, names in ptrs.items() for name in names} | {"N": "i32", "M": "i32", "eps": "fp32",
                                                                          "rows_per_program": "i32"}
    fn, configs = ((kernels._gelu_ln_fwd, kernels.FWD_CONFIGS) if which == "fwd"
                   else (kernels._gelu_ln_bwd, kernels.BWD_CONFIGS))
    # Every candidate in bf16 (autocast), the first one also for fp16 activations and an fp32 model. "aligned": as
    # Triton's launcher specialises them for torch's 16-byte aligned tensors and a width divisible by 16 (the code
    # that runs for every registered model), and without that knowledge (other widths).
    runs = [(cfg, "*bf16", True) for cfg in configs] + [(configs[0], "*fp16", True), (configs[0], "*fp32", True),
                                                         (configs[0], "*bf16", False)]
    for cfg, act, aligned in runs:
        constexprs = {"BLOCK": 4096, **cfg.kwargs}
        types = {**kind, **{name: act for name in ptrs["*bf16"]}}
        signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if aligned and (signature[name].startswith("*") or name in ("N", "M"))}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        assert compiled.asm["cubin"], (cfg, act, aligned)
        if act == "*bf16" and aligned:
            report = _ptxas_report(compiled.asm["ptx"], tmp_path)
            assert re.search(r"\b0 bytes spill stores", report), (cfg, report)
            # a tile's rows stay in each thread: the sums over them (dW, dB) need no exchange between warps
            assert not re.search(r"warpsPerCTA = \[(?!1,)\d+, \d+\]", compiled.asm["ttgir"]), cfg


def _ptxas_report(ptx: str, tmp_path: Path) -> str:
    """ptxas's resource report (registers, spills) for a kernel's PTX on sm_90a."""
    from triton import knobs

    (tmp_path / "kernel.ptx").write_text(ptx)
    proc = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--gpu-name", "sm_90a", str(tmp_path / "kernel.ptx"),
                           "-o", str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True)
    return proc.stderr


def test_fused_ffn_leaves_cpu_tensors_to_the_unfused_ops():
    """Outside the interpreter a CPU tensor is not the kernel's: the op says so, and the model computes as before."""
    assert kernels.available() and not kernels.INTERPRETED
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        kernels.gelu_layernorm(x, torch.ones(8), torch.zeros(8), 1e-5)
    model = create_model("beit3_nano_patch16_32").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.encode_image(images)
        set_fused_ffn(True)
        try:
            got = model.encode_image(images)
        finally:
            set_fused_ffn(False)
    assert torch.equal(got, want)


def test_one_autotuner_per_range_of_rows(monkeypatch):
    """The image rows (80 x 577) and the text rows (80 x 64) of a training step are tuned apart; a smaller last batch
    of the same power-of-two range is not tuned again."""
    monkeypatch.setattr(kernels, "_TUNED", {})
    image, text = kernels._tuned("bwd", 80 * 577), kernels._tuned("bwd", 80 * 64)
    assert image is not text and kernels._tuned("bwd", 70 * 577) is image
    assert image.configs == kernels.BWD_CONFIGS and kernels._tuned("fwd", 80 * 577).configs == kernels.FWD_CONFIGS
    assert sorted(kernels._TUNED) == [("bwd", 13), ("bwd", 16), ("fwd", 16)]
    assert kernels.chosen_launch() == {} and kernels.tuning_ms() == {}  # none has run (timed its candidates) yet


def test_the_autotuners_picks_and_timings_are_reported(monkeypatch):
    """What benchmark rows carry as ``launch`` and ``tuning_ms``, from the attributes Triton's autotuner sets when it
    has timed its candidates (``best_config``; ``configs_timings``: do_bench's median, 20th and 80th percentile in ms,
    inf for a candidate that failed to compile). The timing itself needs a GPU."""
    monkeypatch.setattr(kernels, "_TUNED", {})
    tuner = kernels._tuned("bwd", 80 * 577)
    kernels._tuned("fwd", 80 * 64)  # not run yet: not reported
    slow, fast, broken = kernels.BWD_CONFIGS[0], kernels.BWD_CONFIGS[-1], kernels.BWD_CONFIGS[1]
    monkeypatch.setattr(tuner, "best_config", fast, raising=False)
    monkeypatch.setattr(tuner, "configs_timings", {slow: [0.9, 0.8, 1.0], broken: [float("inf")] * 3,
                                                   fast: [0.4, 0.39, 0.41]}, raising=False)
    assert kernels.chosen_launch() == {"bwd, rows < 65536": "ROWS=2 PREFETCH=True warps=16"}
    table = kernels.tuning_ms()
    assert list(table) == ["bwd, rows < 65536"]
    assert list(table["bwd, rows < 65536"].items()) == [
        ("ROWS=2 PREFETCH=True warps=16", 0.4), ("ROWS=1 PREFETCH=False warps=8", 0.9),
        ("ROWS=1 PREFETCH=True warps=8", None)]


@pytest.mark.parametrize("script, args", [
    ("run_beit3_finetuning", ["--category", "car", "--output_dir", "{tmp}/out"]),
    ("infer", ["--output_dir", "{tmp}/out"]),
    ("search", ["--images", "{tmp}", "--query", "A red car.", "--finetune", "{tmp}/none.pth"]),
    ("extract_features", ["--model", "beit3_nano_patch16_32", "--finetune", "{tmp}/none.pth", "--texts",
                          "{tmp}/q.txt", "--out", "{tmp}/f.npz"]),
])
def test_model_scripts_take_fused_ffn_and_refuse_it_on_a_cpu(script, args, load_script, tmp_path):
    """Every script that runs the model has ``--fused_ffn`` (off by default); on a CPU device it stops with a clear
    message before reading or writing anything, rather than running without the kernel it was asked for."""
    argv = [a.format(tmp=tmp_path) for a in args] + ["--device", "cpu", "--fused_ffn"]
    with pytest.raises(SystemExit, match="--fused_ffn runs a GPU kernel, and the device is cpu"):
        load_script(script)["main"](argv)
    assert not any(tmp_path.iterdir())
    assert not kernels.INTERPRETED and not modeling._fused_ffn


def test_training_config_records_fused_ffn(load_script):
    """A run's args.json says whether the kernel ran; resuming with another choice is allowed (it changes how the
    step runs, not what it learns)."""
    from traffic_retrieval import train

    parse = load_script("run_beit3_finetuning")["parse_args"]
    assert parse(["--category", "car", "--fused_ffn"]).runtime.fused_ffn is True
    assert parse(["--category", "car"]).runtime.fused_ffn is False
    assert ("runtime", "fused_ffn") in train.RESUME_FREE
