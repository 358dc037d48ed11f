"""The fused GELU + LayerNorm kernels run by Triton's interpreter on CPU tensors (the CI machine has no GPU).

Not collected by the main run (the name is not test_*.py): ``test_kernels.py`` runs this file in a subprocess with
``TRITON_INTERPRET=1``, which Triton reads when the kernels are defined.
"""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from beit3_oracle import OfficialRetrieval, encoder_config, randomize_
from test_data import indexed  # noqa: F401  (fixture: the tiny dataset with its jsonl indexes)
from test_gelu import GRID, HUGE, check_normal_cdf, check_saturation
from test_train import _args, _log
from torch._inductor.utils import fresh_inductor_cache

from traffic_retrieval import gelu, kernels
from traffic_retrieval.modeling import compile_layers, create_model, set_fused_ffn

assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.INTERPRETED, "run through test_kernels.py"


def _reference(x, w, b, eps):
    return F.layer_norm(F.gelu(x.float()), (x.shape[-1],), w.float(), b.float(), eps)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("shape", [(5, 96), (2, 7, 64), (1, 3, 4096), (4, 1, 24)])
def test_values_and_gradients_match_torch(shape, prefetch, rows, monkeypatch):
    """fp32: output and the gradients of x, weight and bias equal LayerNorm(GELU(x)) by autograd; rows are not a
    multiple of the backward's programs nor of its tile's rows, widths not powers of two."""
    monkeypatch.setitem(kernels.INTERPRETER_CONFIG, "PREFETCH", prefetch)
    monkeypatch.setitem(kernels.INTERPRETER_CONFIG, "ROWS", rows)
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    x = (torch.randn(*shape, generator=g) * 2).requires_grad_()
    w = (torch.randn(n, generator=g) + 1).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_()
    y = kernels.gelu_layernorm(x, w, b, 1e-5)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = _reference(x2, w2, b2, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y - y2).abs().max() <= 1e-5
    dy = torch.randn(shape, generator=g)
    y.backward(dy)
    y2.backward(dy)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert (got - want).abs().max() <= 2e-5 * max(1.0, want.abs().max().item())


def test_normal_cdf_is_as_accurate_as_fp32_allows():
    """The kernels' Phi(x) (a fitted erfc, not libdevice's erf) and exp(-x^2/2) against float64 on a dense grid, tails
    and saturated inputs included (test_gelu's checks), and equal to traffic_retrieval.gelu's torch ops, whose
    constants they take."""
    import triton
    import triton.language as tl

    @triton.jit
    def cdf_kernel(X, CDF, E, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + i, mask=i < n, other=0.0)
        cdf, e = kernels._normal_cdf(x)
        tl.store(CDF + i, cdf, mask=i < n)
        tl.store(E + i, e, mask=i < n)

    cdf, e = torch.empty_like(GRID), torch.empty_like(GRID)
    cdf_kernel[(triton.cdiv(GRID.numel(), 4096),)](GRID, cdf, e, GRID.numel(), BLOCK=4096)
    check_normal_cdf(GRID, cdf, e)
    ops_cdf, ops_e = gelu.normal_cdf(GRID)
    assert (cdf - ops_cdf).abs().max() <= 1e-7 and (e - ops_e).abs().max() <= 1e-7
    cdf_huge, e_huge = torch.empty_like(HUGE), torch.empty_like(HUGE)
    with np.errstate(over="ignore"):  # the exponent's u^2 overflows to inf, as on the GPU: exp2(-inf) = 0
        cdf_kernel[(1,)](HUGE, cdf_huge, e_huge, HUGE.numel(), BLOCK=8)
    check_saturation(HUGE, cdf_huge, e_huge)


def test_bf16_input_gives_bf16_output_of_the_fp32_result():
    """Under autocast fc1 gives bf16; the kernel computes in fp32 and rounds once, as fc2's cast of the official
    fp32 LayerNorm output does."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4096, generator=g).bfloat16()
    w, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    y = kernels.gelu_layernorm(x, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    want = _reference(x, w, b, 1e-5)
    assert torch.equal(y, want.bfloat16()) or (y.float() - want).abs().max() <= 2 ** -7 * want.abs().max()
    dx, dw, db = kernels.gelu_layernorm_bwd(torch.ones_like(x), x, w, *kernels.gelu_layernorm_fwd(x, w, b, 1e-5)[1:])
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32


def test_empty_batch_and_width_limit():
    w = torch.ones(8)
    y = kernels.gelu_layernorm(torch.empty(0, 8), w, w, 1e-5)
    assert y.shape == (0, 8)
    with pytest.raises(ValueError, match="at most 16384 features"):
        kernels.gelu_layernorm(torch.zeros(1, 16385), torch.ones(16385), torch.ones(16385), 1e-5)


def _tiny_models():
    torch.manual_seed(0)
    official = randomize_(OfficialRetrieval(encoder_config(64, 2, 4, 32, vocab=100, max_pos=128)), 64).eval()
    ours = create_model("beit3_nano_patch16_32", vocab_size=100).eval()
    ours.load_state_dict(official.state_dict())
    return official, ours


def _inputs():
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(4, 100, (3, 20), generator=g)
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, 9:] = 1  # padded text
    return images, tokens, mask


@pytest.mark.parametrize("compiled", [False, True])
def test_model_with_the_fused_ffn_matches_the_official_model(compiled):
    """The nano model with ``set_fused_ffn(True)`` (eager, and with its layers compiled: the ops' fake
    implementations and autograd must trace): features equal the official model's within 1e-5 and a training
    step's gradients equal the unfused model's."""
    official, plain = _tiny_models()
    fused = copy.deepcopy(plain)
    if compiled:
        torch._dynamo.reset()
        compile_layers(fused, backend="aot_eager")  # the ops trace; inductor on CPU takes a minute more
    images, tokens, mask = _inputs()
    set_fused_ffn(True)
    try:
        with torch.no_grad():
            img, txt = fused.encode_image(images), fused.encode_text(tokens, mask)
        assert (img - official.image_features(images)).abs().max() <= 1e-5
        assert (txt - official.text_features(tokens, mask)).abs().max() <= 1e-5
        grads = []
        for m in (fused.train(), None):
            if m is None:
                set_fused_ffn(False)
                m = plain.train()
            loss = (m.logit_scale.exp() * m.encode_image(images) @ m.encode_text(tokens, mask).T).logsumexp(-1).sum()
            grads.append(torch.autograd.grad(loss, list(m.parameters()), allow_unused=True))
    finally:
        set_fused_ffn(False)
    names = [n for n, _ in plain.named_parameters()]
    assert any("ffn_layernorm" in n for n, a in zip(names, grads[0]) if a is not None)
    for name, a, b in zip(names, *grads):
        assert (a is None) == (b is None), name
        assert a is None or torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_benchmark_ffn_setting_times_the_kernel():
    """``benchmark.py --settings ffn`` where the kernel runs: its row has times (forward+backward, forward, backward)
    and errors within fp32 rounding."""
    from argparse import Namespace

    from traffic_retrieval.bench import run_ffn_check

    args = Namespace(model="beit3_nano_patch16_32", input_size=None, batch_size=2, precision="fp32", warmup=1, iters=1)
    rows = {r["impl"]: r for r in run_ffn_check(args, torch.device("cpu"))}
    assert set(rows) == {"eager", "compiled", "compiled_fitted", "fused"}
    assert rows["fused"]["rows"] == 2 * 5
    assert min(rows["fused"][k] for k in ("seconds_fwd_bwd", "seconds_fwd", "seconds_bwd")) > 0
    assert rows["fused"]["rel_err_out"] < 1e-5 and rows["fused"]["rel_err_grad"] < 1e-5


def test_non_contiguous_input_under_compile():
    """A transposed input through inductor: the real op's output has the strides its fake implementation promised
    (inductor asserts them), and the numbers are torch's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g).t()  # [6, 40], not contiguous
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    f = torch.compile(lambda x: kernels.gelu_layernorm(x, w, b, 1e-5) * 2, fullgraph=True)
    want = _reference(x, w, b, 1e-5) * 2
    with fresh_inductor_cache():  # inductor checks the fake implementation now, not a graph cached before a change
        out = f(x)
    assert out.is_contiguous() and (out - want).abs().max() <= 1e-5


def test_opcheck():
    """torch.library.opcheck on both ops: schema, autograd registration, fake tensors, AOT dispatch."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 48, generator=g, requires_grad=True)
    w = torch.randn(48, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    torch.library.opcheck(kernels.gelu_layernorm_fwd, (x, w, b, 1e-5))
    _, mean, rstd = kernels.gelu_layernorm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(kernels.gelu_layernorm_bwd, (torch.randn(2, 5, 48, generator=g), x.detach(), w.detach(),
                                                       mean, rstd))


def test_under_bf16_autocast_the_fused_ffn_is_as_accurate_as_the_unfused_ops():
    """With bf16 autocast (as training runs), the features' error against fp32 is no larger with the kernel (it keeps
    GELU's output in fp32 where the unfused ops round it to bf16)."""
    official, model = _tiny_models()
    images, tokens, mask = _inputs()
    with torch.no_grad():
        want = official.image_features(images), official.text_features(tokens, mask)
        errors = {}
        for fused in (False, True):
            set_fused_ffn(fused)
            try:
                with torch.autocast("cpu", torch.bfloat16):
                    got = model.encode_image(images), model.encode_text(tokens, mask)
            finally:
                set_fused_ffn(False)
            errors[fused] = max((g.float() - w).abs().max().item() for g, w in zip(got, want))
    assert errors[True] <= 1.25 * errors[False] and errors[True] < 0.05, errors


def test_training_script_with_fused_ffn_follows_the_unfused_run(indexed, tiny_spm, load_script, tmp_path,
                                                                 monkeypatch):
    """``run_beit3_finetuning.py --fused_ffn`` (here on CPU tensors, which the interpreter lets the kernel take):
    two epochs of the nano model give the losses and final weights of the same run without it, within fp32
    rounding, and its args.json records the choice."""
    script = load_script("run_beit3_finetuning")
    calls = []
    fused_op = kernels.gelu_layernorm
    monkeypatch.setattr(kernels, "gelu_layernorm", lambda *a: calls.append(1) or fused_op(*a))
    runs = {}
    try:
        for name, extra in (("plain", []), ("fused", ["--fused_ffn"])):
            out = tmp_path / name
            script["main"](_args(indexed, tiny_spm, out, "--device", "cpu", *extra))  # nano model, 2 epochs
            assert bool(calls) == (name == "fused")  # the kernel ran in the fused run only
            runs[name] = (_log(out), torch.load(out / "checkpoint-1.pth", weights_only=True)["model"],
                          json.loads((out / "args.json").read_text())["runtime"]["fused_ffn"])
    finally:
        set_fused_ffn(False)
    (log_a, model_a, flag_a), (log_b, model_b, flag_b) = runs["plain"], runs["fused"]
    assert (flag_a, flag_b) == (False, True)
    assert [r["epoch"] for r in log_b] == [0, 1]
    for a, b in zip(log_a, log_b):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5, (a, b)
    assert model_a.keys() == model_b.keys()
    # A key bias adds the same amount to all of a query's scores, which the softmax cancels: its gradient is pure
    # rounding noise, which Adam scales up to lr-sized steps, different in any two runs that round differently.
    for k in (k for k in model_a if not re.search(r"k_proj\.[AB]\.bias$", k)):
        assert torch.allclose(model_a[k], model_b[k], atol=1e-5, rtol=1e-4), k
