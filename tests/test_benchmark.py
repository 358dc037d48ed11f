"""code/benchmark.py on the CPU: every setting runs for the project's model and the official one (torchscale) on the
same inputs and prints one JSON line with its figures."""

from __future__ import annotations

import json

import pytest

from traffic_retrieval import bench
from traffic_retrieval.modeling import compile_layers


def test_benchmark_prints_every_setting_side_by_side(load_script, capsys) -> None:
    load_script("benchmark")["main"](
        ["--model", "beit3_nano_patch16_32", "--batch_size", "4", "--device", "cpu", "--iters", "1", "--warmup", "1",
         "--infer_gallery", "20", "--sdpa", "cudnn", "--drop_path", "0.2", "--settings", "train", "train_ckpt",
         "encode_image", "encode_text", "infer_stage", "attention", "ffn"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["setting"], r.get("impl"), r.get("shape"), r.get("sdpa")): r for r in rows}

    for setting, unit in (("train", "pairs_per_s"), ("train_ckpt", "pairs_per_s"), ("encode_image", "images_per_s"),
                          ("encode_text", "texts_per_s")):
        ours, official = by[setting, "ours", None, "cudnn"], by[setting, "official", None, "default"]
        assert ours[unit] > 0 and official[unit] > 0 and ours["ratio"] == ours[unit] / official[unit]
        assert 0 < ours["mfu"] < 1 and ours["checkpointing"] == (setting == "train_ckpt")
        assert ours["drop_path"] == official["drop_path"] == 0.2
    # text MFU counts the same work (the texts' real lengths) for both, whatever each pads to
    ours, official = by["encode_text", "ours", None, "cudnn"], by["encode_text", "official", None, "default"]
    work = [r["tflops"] * r["seconds_per_iter"] for r in (ours, official)]
    assert abs(work[0] - work[1]) <= 1e-9 * work[1]
    stage = by["infer_stage", "ours", None, "cudnn"]
    assert stage["seconds"] > 0 and stage["warmup_seconds"] > 0

    # the attention op per preference: the kernel that ran and its error against the fp32 math kernel
    for shape, tokens in (("image", 5), ("text", 64)):
        for sdpa in ("default", "cudnn"):
            r = by["attention", None, shape, sdpa]
            assert r["tokens"] == tokens and r["kernel"] in {"FLASH_ATTENTION", "MATH"}  # what a CPU has
            assert r["rel_err_out"] < 1e-5 and r["rel_err_grad"] < 1e-5 and r["seconds_fwd_bwd"] > 0

    # the FFN's GELU + Sub-LN: eager and compiled (erf and fitted CDF) on the CPU; the Triton kernel needs a GPU
    ffn = {r["impl"]: r for r in rows if r["setting"] == "ffn"}
    for impl in ("eager", "compiled", "compiled_fitted"):
        assert ffn[impl]["rows"] == 4 * 5 and ffn[impl]["features"] == 256
        assert min(ffn[impl][k] for k in ("gb_per_s", "gb_per_s_fwd", "gb_per_s_bwd", "seconds_bwd")) > 0
        assert ffn[impl]["rel_err_out"] < 1e-5 and ffn[impl]["rel_err_grad"] < 1e-5
    assert ffn["fused"]["error"] == "the Triton kernel needs a CUDA device"


def test_a_missing_reference_fails_before_any_timing(load_script, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchscale", None)  # "import torchscale" now raises ImportError
    monkeypatch.setitem(sys.modules, "torchscale.model.BEiT3", None)
    with pytest.raises(SystemExit, match=r"torchscale==0\.3\.0.*--reference none"):
        load_script("benchmark")["main"](["--model", "beit3_nano_patch16_32", "--batch_size", "2", "--device", "cpu",
                                          "--settings", "train"])
    assert capsys.readouterr().out == ""  # nothing was timed first
    # settings that time the project's model alone do not need the reference
    load_script("benchmark")["main"](["--model", "beit3_nano_patch16_32", "--batch_size", "2", "--device", "cpu",
                                      "--iters", "1", "--warmup", "1", "--settings", "attention"])
    assert '"setting": "attention"' in capsys.readouterr().out


def test_fused_ffn_needs_a_gpu(load_script, capsys) -> None:
    with pytest.raises(SystemExit):
        load_script("benchmark")["parse_args"](["--device", "cpu", "--fused_ffn"])
    assert "--fused_ffn is a GPU kernel: give --device cuda" in capsys.readouterr().err


def test_gelu_cdf_is_an_option_of_compiled_runs(load_script, capsys, monkeypatch) -> None:
    """``--gelu_cdf`` chooses what inductor compiles: refused without ``--compile``, and ``fitted`` with
    ``--fused_ffn``; the project's model is compiled with it and its training row says which CDF ran (auto: erf on
    the CPU; the official model's row: none). (Dynamo's eager backend here: test_gelu compiles it with inductor.)"""
    parse = load_script("benchmark")["parse_args"]
    with pytest.raises(SystemExit):
        parse(["--device", "cpu", "--gelu_cdf", "fitted"])
    assert "--gelu_cdf chooses what inductor compiles: give --compile too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--device", "cpu", "--compile", "--gelu_cdf", "fitted", "--fused_ffn"])
    assert "--gelu_cdf fitted and --fused_ffn replace the same GELU" in capsys.readouterr().err
    compiled = []

    def compile_eager(model, fitted_gelu=None):  # noqa: ANN001, ANN202
        compiled.append(fitted_gelu)
        return compile_layers(model, backend="eager", fitted_gelu=fitted_gelu)

    monkeypatch.setattr(bench, "compile_layers", compile_eager)
    rows = {}
    for cdf in ("fitted", "auto"):
        load_script("benchmark")["main"](["--model", "beit3_nano_patch16_32", "--batch_size", "2", "--device", "cpu",
                                          "--iters", "1", "--warmup", "1", "--settings", "train", "--compile",
                                          "--gelu_cdf", cdf])
        rows[cdf] = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["fitted"]["ours"]["gelu_cdf"] == "fitted" and rows["auto"]["ours"]["gelu_cdf"] == "erf"
    assert rows["fitted"]["ours"]["pairs_per_s"] > 0 and rows["fitted"]["official"]["gelu_cdf"] is None
    assert compiled == [True, None]


def test_ffn_setting_in_bf16(load_script, capsys) -> None:
    """The ``ffn`` setting with bf16 activations and the fp32 LayerNorm weights the model keeps: its errors against the
    fp32 reference are bf16 rounding. (CUDA's layer_norm also rejects mixed dtypes, which the CPU's accepts.)"""
    load_script("benchmark")["main"](["--model", "beit3_nano_patch16_32", "--batch_size", "4", "--device", "cpu",
                                      "--precision", "bf16", "--iters", "1", "--warmup", "1", "--settings", "ffn"])
    ffn = {r["impl"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    for impl in ("eager", "compiled", "compiled_fitted"):
        assert ffn[impl]["precision"] == "bf16" and ffn[impl]["gb_per_s"] > 0
        assert 0 < ffn[impl]["rel_err_out"] < 2e-2 and 0 < ffn[impl]["rel_err_grad"] < 2e-2
