"""GELU with the fitted normal CDF (traffic_retrieval.gelu): accuracy against float64, its autograd, and the compiled
layers that use it (``compile_layers(..., fitted_gelu=True)``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traffic_retrieval import gelu
from traffic_retrieval.modeling import compile_layers, create_model

# A dense grid with both tails, a fine one around 0, and saturated inputs up to the fp32 range.
GRID = torch.cat([torch.linspace(-12, 12, 240_001), torch.linspace(-1e-3, 1e-3, 2_001)])
HUGE = torch.tensor([-3e38, -1e4, -40.0, 40.0, 1e4, 3e38])


def check_normal_cdf(x: torch.Tensor, cdf: torch.Tensor, e: torch.Tensor) -> None:
    """Phi(x) within 3e-7 of float64 (a few ulp; torch's fp32 erf: about 6e-8), exp(-x^2/2) within 3e-7 of its
    largest value, GELU and GELU' within 3e-7 of their size, and in the negative tail Phi keeps most of its relative
    accuracy where fp32 0.5 * (1 + erf) loses it to cancellation."""
    x64 = x.double()
    phi = 0.5 * torch.special.erfc(-x64 / 2**0.5)
    pdf = torch.exp(-0.5 * x64**2)
    assert (cdf.double() - phi).abs().max() <= 3e-7
    assert (e.double() - pdf).abs().max() <= 3e-7 * pdf.abs().max()
    value, slope = x64 * cdf.double(), cdf.double() + x64 * e.double() / (2 * torch.pi) ** 0.5
    assert ((value - x64 * phi).abs() <= 3e-7 * x64.abs().clamp(min=1)).all()
    assert ((slope - (phi + x64 * pdf / (2 * torch.pi) ** 0.5)).abs() <= 3e-7).all()
    tail = (x64 < -3) & (x64 > -9)  # Phi from 1.3e-3 down to 1e-19
    ours = (cdf.double()[tail] / phi[tail] - 1).abs()
    fp32_erf = ((0.5 * (1 + torch.erf(x[tail] / 2**0.5))).double() / phi[tail] - 1).abs()  # torch's GELU's Phi
    assert ours.max() <= 2e-3 and fp32_erf.max() >= 0.99  # 1 + erf rounds to 0 in fp32 before x = -9


def check_saturation(x: torch.Tensor, cdf: torch.Tensor, e: torch.Tensor) -> None:
    """Saturated inputs give exactly 0 / 1 and a zero exponential, no inf or nan."""
    assert torch.equal(cdf, (x > 0).float()) and torch.equal(e, torch.zeros_like(x))


def test_normal_cdf_is_as_accurate_as_fp32_allows():
    """The torch ops that compiled layers use (the Triton kernels' twin, tested the same way under the interpreter).
    Here rsqrt and exp2 are exact; the GPU's single-instruction versions (relative error about 2e-7) were modelled
    apart: Phi stayed within 4.2e-7."""
    check_normal_cdf(GRID, *gelu.normal_cdf(GRID))
    with np.errstate(over="ignore"):
        check_saturation(HUGE, *gelu.normal_cdf(HUGE))
    # a coefficient off by 1e-6 is caught
    wrong = gelu.COEFFS[:2] + (gelu.COEFFS[2] + 1e-6,) + gelu.COEFFS[3:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gelu, "COEFFS", wrong)
        with pytest.raises(AssertionError):
            check_normal_cdf(GRID, *gelu.normal_cdf(GRID))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fitted_gelu_and_its_gradient_match_torch(dtype):
    """Values and input gradients equal F.gelu's within fp32 rounding (fp32), or within one bf16 rounding of the
    same fp32 result (bf16: both compute in fp32 and round once); the output keeps the input's dtype."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=g) * 3).to(dtype)
    dy = torch.randn(4096, generator=g).to(dtype)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = gelu.fitted_gelu(got_x), F.gelu(want_x)
    got.backward(dy)
    want.backward(dy)
    assert got.dtype == got_x.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    for a, b in ((got, want), (got_x.grad, want_x.grad)):
        assert ((a.float() - b.float()).abs() <= tol * b.float().abs().clamp(min=1)).all()


def _nano_pair(backend: str, checkpointing: bool):
    torch.manual_seed(0)
    eager = create_model("beit3_nano_patch16_32", checkpoint_activations=checkpointing)
    compiled = create_model("beit3_nano_patch16_32", checkpoint_activations=checkpointing)
    compiled.load_state_dict(eager.state_dict())
    return eager, compile_layers(compiled, backend=backend, fitted_gelu=True)


def _step(model, images, tokens, mask):
    img, txt = model(images, tokens, mask)
    loss = (img @ txt.T).logsumexp(dim=1).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return [img.detach(), txt.detach()], grads


@pytest.mark.parametrize(("backend", "checkpointing"), [("inductor", False), ("aot_eager", True)])
def test_compiled_layers_with_fitted_gelu_match_eager(backend, checkpointing):
    """Features and every parameter's gradient of the compiled nano model with the fitted GELU equal the eager
    model's (erf GELU) within fp32 rounding: compiled by inductor, and with activation checkpointing through
    AOTAutograd alone (its joint graph and the custom backward inside the checkpoint; inductor's C++ build of that
    graph would double the test's time)."""
    eager, compiled = _nano_pair(backend, checkpointing)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(4, 1000, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 6:] = True  # a padded text
    eager.train(), compiled.train()
    want_out, want_grads = _step(eager, images, tokens, mask)
    got_out, got_grads = _step(compiled, images, tokens, mask)
    for got, want in zip(got_out, want_out):
        assert (got - want).abs().max() <= 1e-5
    for got, want in zip(got_grads, want_grads):
        if want is None:
            assert got is None
            continue
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def _traced_ops(fitted: bool | None) -> str:
    """The code of every FX graph dynamo hands to the backend (subgraphs included) for one encoder layer pass."""
    torch.manual_seed(0)
    model = create_model("beit3_nano_patch16_32")
    code = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001, ANN202
        code.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    torch._dynamo.reset()
    compile_layers(model, backend=backend, fitted_gelu=fitted)
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    return "\n".join(code)


def test_fitted_gelu_is_what_the_compiled_layers_run():
    """With ``fitted_gelu`` the traced layers compute GELU through the fitted CDF (exp2, rsqrt) and not F.gelu;
    without, through F.gelu, as by default on the CPU; eager modules keep F.gelu either way (a dozen ops would each be
    a kernel there)."""
    fitted, plain, default_on_cpu = _traced_ops(True), _traced_ops(False), _traced_ops(None)
    assert "gelu" in plain and "exp2" not in plain
    assert default_on_cpu == plain  # the default takes the fitted CDF for CUDA tensors only
    assert "exp2" in fitted and "rsqrt" in fitted and "torch._C._nn.gelu" not in fitted
    model = create_model("beit3_nano_patch16_32")
    compile_layers(model, backend="eager", fitted_gelu=True)
    ffn = model.beit3.encoder.layers[0].ffn.A
    assert ffn.fitted_gelu
    x = torch.randn(2, 5, 64)
    assert torch.equal(ffn(x), ffn.fc2(ffn.ffn_layernorm(F.gelu(ffn.fc1(x)))))  # called outside compilation


def test_fitted_gelu_raises_inductors_recompute_threshold(monkeypatch):
    """With the fitted CDF (also by default: it is then the CUDA tensors') the layers are compiled with
    :data:`gelu.INDUCTOR_OPTIONS` (its backward recomputes GELU instead of storing it), on top of the project's
    options; a caller's own options win."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw["options"]))
    model = create_model("beit3_nano_patch16_32")
    compile_layers(model, fitted_gelu=True)
    compile_layers(model, fitted_gelu=True, options={"realize_opcount_threshold": 90})
    compile_layers(model, fitted_gelu=False)
    compile_layers(model)
    depth = len(model.beit3.encoder.layers)
    assert [o.get("realize_opcount_threshold") for o in seen[::depth]] == [64, 90, None, 64]
    assert all(o["triton.multi_kernel"] == 1 for o in seen)
    # the default leaves the choice to the tensors' device (fitted for CUDA tensors)
    assert all(layer.ffn.B.fitted_gelu is None for layer in model.beit3.encoder.layers)


def _inductor_sass(tmp_path, *flags: str) -> tuple[dict[str, int], int, int]:
    """tools/inductor_sass.py on the nano layer (in a subprocess: it hooks into inductor): instructions of each kernel
    that computes GELU's CDF, the number of kernels, and the stores in all their sources."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    save = tmp_path / ("fitted" if flags else "erf")
    cdf = "exp2(" if flags else "libdevice.erf("  # the kernels that compute GELU's CDF
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "inductor_sass.py"), "--model",
                           "beit3_nano_patch16_32", "--warps", "2", "--containing", cdf, "--save", str(save),
                           *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\s*(\d+) instr\s+\d+ MUFU\s+\d+ regs\s+(\d+) B spilled\s+(\S+)$", proc.stdout, re.M)
    assert rows and all(spilled == "0" for _, spilled, _ in rows), proc.stdout
    stores = sum(path.read_text().count("tl.store(") for path in save.glob("*.py"))
    return {name: int(n) for n, _, name in rows}, len(list(save.glob("*.py"))), stores


def test_fitted_gelu_takes_fewer_gpu_instructions_in_the_same_kernels(tmp_path):
    """Inductor's Triton kernels of a compiled layer, compiled for an H100 (sm_90) without one: with the fitted CDF
    the GELU kernels have fewer instructions, none spills, and the graph has as many kernels and stores as with erf
    (the realize threshold of gelu.INDUCTOR_OPTIONS keeps GELU recomputed, not stored)."""
    erf, erf_kernels, erf_stores = _inductor_sass(tmp_path)
    fitted, fitted_kernels, fitted_stores = _inductor_sass(tmp_path, "--fitted_gelu")
    assert len(erf) == len(fitted) >= 4 and erf_kernels == fitted_kernels and erf_stores == fitted_stores
    assert sum(fitted.values()) < 0.85 * sum(erf.values())
