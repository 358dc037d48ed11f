"""The project's BEiT-3 against the official implementation (torchscale 0.3.0): names, shapes and numbers."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from beit3_oracle import OFFICIAL, OfficialRetrieval, encoder_config, randomize_

from traffic_retrieval.checkpoint import load_weights
from traffic_retrieval.modeling import (SDPA_ORDERS, compile_layers, create_model, get_config, list_models,
                                       set_sdpa)

TINY = dict(dim=64, layers=2, heads=4, img=32, vocab=100, max_pos=128)


def _tiny_pair(seed: int = 0, **kw):
    """An official tiny model with random weights and the project's model of the same shape."""
    torch.manual_seed(seed)
    cfg = {**TINY, **kw}
    args = encoder_config(cfg["dim"], cfg["layers"], cfg["heads"], cfg["img"], vocab=cfg["vocab"],
                          max_pos=cfg["max_pos"])
    official = randomize_(OfficialRetrieval(args), cfg["dim"]).eval()
    ours = create_model("beit3_nano_patch16_32", img_size=cfg["img"], embed_dim=cfg["dim"], depth=cfg["layers"],
                        num_heads=cfg["heads"], vocab_size=cfg["vocab"], max_text_positions=cfg["max_pos"]).eval()
    return official, ours


def _texts(vocab: int, lengths: list[int], total: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.ones(len(lengths), total, dtype=torch.long)  # pad id 1
    mask = torch.ones(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        body = torch.randint(4, vocab, (n - 2,), generator=g)
        tokens[i, :n] = torch.cat([torch.tensor([0]), body, torch.tensor([2])])
        mask[i, :n] = 0
    return tokens, mask


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_configs_have_official_names_and_shapes(name):
    dim, layers, heads, img = OFFICIAL[name]
    with torch.device("meta"):
        official = OfficialRetrieval(encoder_config(dim, layers, heads, img))
        ours = create_model(name)
    theirs = [(k, tuple(v.shape)) for k, v in official.state_dict().items()]
    mine = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert sorted(mine) == sorted(theirs)
    # the official BEiT3ForRetrieval yields logit_scale first, then beit3.*, language_head, vision_head
    assert mine[0][0] == "logit_scale" and mine[-2][0] == "language_head.weight" and mine[-1][0] == "vision_head.weight"
    assert [k for k, _ in mine[1:-2]] == [k for k in theirs_keys_in_beit3_order(official)]
    expected_keys = {"beit3_base_patch16_224": 494, "beit3_large_patch16_384": 974}
    if name in expected_keys:
        assert len(mine) == expected_keys[name]


def theirs_keys_in_beit3_order(official) -> list[str]:
    return ["beit3." + k for k in official.beit3.state_dict()]


def test_parameter_counts_match_published():
    with torch.device("meta"):
        n = sum(p.numel() for p in create_model("beit3_large_patch16_384").parameters())
        b = sum(p.numel() for p in create_model("beit3_base_patch16_224").parameters())
    assert n == 675_188_737 and b == 222_167_041  # beit3.md section 2


@pytest.mark.parametrize("wrapping", ["model", "module", "bare", "fp16"])
def test_features_match_official_in_every_wrapping(tmp_path, wrapping):
    official, ours = _tiny_pair()
    sd = official.state_dict()
    if wrapping == "fp16":
        sd = {k: v.half() for k, v in sd.items()}
        official.load_state_dict({k: v.float() for k, v in sd.items()})  # compare on the same rounded weights
    obj = {"model": sd, "epoch": 3} if wrapping in ("model", "fp16") else {"module": sd} if wrapping == "module" else sd
    path = tmp_path / ("checkpoint-3" if wrapping == "module" else "")
    path.mkdir(exist_ok=True)
    path = path / ("mp_rank_00_model_states.pt" if wrapping == "module" else "weights.pth")
    torch.save(obj, path)
    load_weights(ours, path.parent if wrapping == "module" else path)

    images = torch.randn(3, 3, 32, 32)
    tokens, mask = _texts(100, [64, 10, 3, 25])
    with torch.no_grad():
        img_ours, img_ref = ours.encode_image(images), official.image_features(images)
        txt_ours, txt_ref = ours.encode_text(tokens, mask), official.text_features(tokens, mask)
    assert (img_ours - img_ref).abs().max() <= 1e-5
    assert (txt_ours - txt_ref).abs().max() <= 1e-5
    assert torch.allclose(img_ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert ours.logit_scale.item() == pytest.approx(official.logit_scale.item())


def test_training_gradients_match_official():
    """The gradients of a contrastive loss equal the official model's for every parameter: the project's last layer
    computes its output for the first token only, the official one for all tokens."""
    official, ours = _tiny_pair()
    ours.load_state_dict(official.state_dict())
    images, (tokens, mask) = torch.randn(3, 3, 32, 32), _texts(100, [9, 64, 20])

    def loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
        return F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))

    b = official.train().beit3
    ref = loss(official.vision_head(b(textual_tokens=None, visual_tokens=images)["encoder_out"][:, 0]),
               official.language_head(b(textual_tokens=tokens, visual_tokens=None,
                                        text_padding_position=mask)["encoder_out"][:, 0]), official.logit_scale)
    ours.train()
    mine = loss(ours.encode_image(images, normalize=False), ours.encode_text(tokens, mask, normalize=False),
                ours.logit_scale)
    assert mine.item() == pytest.approx(ref.item(), abs=1e-5)
    ref_grads = dict(zip([n for n, _ in official.named_parameters()],
                         torch.autograd.grad(ref, list(official.parameters()), allow_unused=True)))
    grads = dict(zip([n for n, _ in ours.named_parameters()],
                     torch.autograd.grad(mine, list(ours.parameters()), allow_unused=True)))
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        r = ref_grads[name]
        assert (g is None) == (r is None), name
        assert g is None or (g - r).abs().max() <= 1e-5 * max(1.0, r.abs().max().item()), name


def test_text_features_do_not_depend_on_padding():
    _, ours = _tiny_pair()
    tokens, mask = _texts(100, [12, 12])
    short_tokens, short_mask = tokens[:, :16], mask[:, :16]  # same texts, 16 instead of 64 positions
    garbage = tokens.clone()
    garbage[mask.bool()] = 57  # other ids at the padded positions
    with torch.no_grad():
        a = ours.encode_text(tokens, mask)
        b = ours.encode_text(short_tokens, short_mask)
        c = ours.encode_text(garbage, mask)
    assert (a - b).abs().max() <= 1e-6 and (a - c).abs().max() <= 1e-6


def test_checkpointing_and_drop_path_keep_names_and_gradients():
    plain = create_model("beit3_nano_patch16_32")
    assert list(plain.state_dict()) == list(
        create_model("beit3_nano_patch16_32", checkpoint_activations=True, drop_path_rate=0.2).state_dict()
    )
    images, (tokens, mask) = torch.randn(2, 3, 32, 32), _texts(1024, [10, 20])
    grads = []
    for m in (plain, create_model("beit3_nano_patch16_32", checkpoint_activations=True)):
        m.load_state_dict(plain.state_dict())
        m.train()
        loss = (m.encode_image(images) @ m.encode_text(tokens, mask).T).sum()
        m.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k
    # drop path: a training forward is stochastic, an eval forward is not
    dp = create_model("beit3_nano_patch16_32", drop_path_rate=0.5)
    dp.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.equal(dp.train().encode_image(images), dp.encode_image(images))
        assert torch.equal(dp.eval().encode_image(images), plain.eval().encode_image(images))


@pytest.mark.parametrize("sdpa", list(SDPA_ORDERS))
def test_compiled_layers_match_the_official_features_and_eager_gradients(sdpa, caplog):
    """--compile (torch.compile of each layer, as training and inference use it) under each --sdpa preference: the
    features equal the official model's and a training step's gradients equal eager ones; names are unchanged; no
    graph break and no fallback to eager."""
    from torch._dynamo.utils import counters

    official, ours = _tiny_pair()
    ours.load_state_dict(official.state_dict())
    compiled = copy.deepcopy(ours)
    set_sdpa(sdpa)
    counters.clear()
    try:
        compile_layers(compiled)
        assert list(compiled.state_dict()) == list(ours.state_dict())
        images, (tokens, mask) = torch.randn(3, 3, 32, 32), _texts(100, [7, 30, 64])
        with torch.no_grad():
            ref_img, ref_txt = official.image_features(images), official.text_features(tokens, mask)
            img, txt = compiled.encode_image(images), compiled.encode_text(tokens, mask)
        assert (img - ref_img).abs().max() <= 1e-5 and (txt - ref_txt).abs().max() <= 1e-5
        grads = []
        for m in (ours.train(), compiled.train()):
            loss = (m.logit_scale.exp() * m.encode_image(images) @ m.encode_text(tokens, mask).T).logsumexp(-1).sum()
            grads.append(torch.autograd.grad(loss, list(m.parameters()), allow_unused=True))
        for (name, _), a, b in zip(ours.named_parameters(), *grads):
            assert (a is None) == (b is None), name
            assert a is None or torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    finally:
        set_sdpa("default")
    assert counters["stats"]["unique_graphs"] >= 4 and not counters["graph_break"]
    assert "recompile_limit" not in caplog.text


def test_compiled_layers_checkpoint_inside_the_graph_with_the_same_gradients():
    """--compile with --checkpoint_activations and drop path: the checkpoint is part of each compiled layer (it keeps
    a fraction of the activations a compiled layer without it keeps), the names are unchanged, there is no graph
    break, and a training step's gradients equal the eager model's without checkpointing, drop-path masks included
    (inductor's random numbers made eager's with fallback_random, so that both draw the same masks)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from torch._inductor.compile_fx import compile_fx

    graphs: list[torch.fx.GraphModule] = []

    def inductor(gm: torch.fx.GraphModule, example_inputs):  # inductor, keeping the graphs dynamo gave it
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    plain = create_model("beit3_nano_patch16_32", vocab_size=100, drop_path_rate=0.3).train()
    models = {ckpt: compile_layers(create_model("beit3_nano_patch16_32", vocab_size=100, drop_path_rate=0.3,
                                                checkpoint_activations=ckpt), backend=inductor).train()
              for ckpt in (False, True)}
    for m in models.values():
        m.load_state_dict(plain.state_dict())
    assert list(models[True].state_dict()) == list(plain.state_dict())
    images, (tokens, mask) = torch.randn(3, 3, 32, 32), _texts(100, [7, 30, 64])

    def step(m):
        torch.manual_seed(5)
        loss = (m.logit_scale.exp() * m.encode_image(images) @ m.encode_text(tokens, mask).T).logsumexp(-1).sum()
        return torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)

    def saved_bytes(m) -> int:
        """Activations kept for the backward of an image forward (weights, also kept, are not counted)."""
        weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
        sizes = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m.encode_image(images)
        return sum(sizes)

    counters.clear()
    with inductor_config.patch(fallback_random=True):
        want, got = step(plain), step(models[True])
        saved = {ckpt: saved_bytes(m) for ckpt, m in models.items()}
    for (name, _), a, b in zip(plain.named_parameters(), want, got):
        assert (a is None) == (b is None), name  # (a different drop-path mask would be off by far more)
        assert a is None or (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item()), name
    assert saved[True] < saved[False] / 2, saved
    assert any("tag_activation_checkpoint" in str(gm.graph) for gm in graphs)  # the checkpoint is in the graph
    assert not counters["graph_break"]


def test_autocast_keeps_the_residual_stream_in_fp32_as_the_official_code():
    """Under bf16 autocast the patch embedding is bf16; the fp32 CLS token and positions must promote the residual
    stream of the image tower to fp32 (as official, and as the text tower), not be cast down to bf16."""
    official, ours = _tiny_pair()
    ours.load_state_dict(official.state_dict())
    seen: list[torch.dtype] = []
    for layer in ours.beit3.encoder.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = official.image_features(images)
        with torch.autocast("cpu", torch.bfloat16):
            theirs, mine = official.image_features(images).float(), ours.encode_image(images).float()
    assert seen == [torch.float32] * len(ours.beit3.encoder.layers)
    # as close to the fp32 features as the official bf16 run (bf16 rounding differs a little between kernels)
    assert (mine - ref).abs().max() <= 1.25 * (theirs - ref).abs().max()


def test_drop_path_rate_is_exact_in_bf16():
    """The mask is drawn from the fp32 rate: a bf16 keep probability (0.99130 -> 0.99219) would drop 10% too few."""
    from traffic_retrieval.modeling import DropPath

    torch.manual_seed(0)
    dp = DropPath(0.0087).bfloat16().train()
    y = dp(torch.ones(400_000, 1, 1, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.0087) < 0.0005  # 3.4 standard errors; bf16's rate 0.0078 is 6 away
    assert torch.allclose(y[y != 0].float(), torch.tensor(1 / (1 - 0.0087)), rtol=1e-2)


def test_compiled_layers_with_drop_path_share_their_graphs(caplog):
    """The training recipe's drop path (a different rate in every layer) must not compile one graph per layer: with
    timm's DropPath (a Python float rate) 12 layers ran past dynamo's limit and fell back to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code of earlier tests' layers counts toward the same recompile limit
    model = create_model("beit3_nano_patch16_32", depth=12, drop_path_rate=0.2).train()
    counters.clear()
    compile_layers(model, backend="eager")  # dynamo's graph capture alone: what recompiles is decided there
    images, (tokens, mask) = torch.randn(2, 3, 32, 32), _texts(1024, [10, 20])
    (model.encode_image(images) @ model.encode_text(tokens, mask).T).sum().backward()
    # per tower: layer 0 (no drop path), the middle layers, the last (first token only)
    assert counters["stats"]["unique_graphs"] <= 6 and not counters["graph_break"]
    assert "recompile_limit" not in caplog.text


def test_every_parameter_gets_a_gradient():
    m = create_model("beit3_nano_patch16_32").train()
    images, (tokens, mask) = torch.randn(2, 3, 32, 32), _texts(1024, [10, 20])
    loss = (m.logit_scale.exp() * m.encode_image(images) @ m.encode_text(tokens, mask).T).logsumexp(-1).sum()
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None and "mask_token" not in n]
    assert no_grad == []  # mask_token is only used in pretraining
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_registry():
    assert {"beit3_base_patch16_224", "beit3_base_patch16_384", "beit3_large_patch16_224",
            "beit3_large_patch16_384"} <= set(list_models())
    assert get_config("beit3_large_patch16_384_retrieval").embed_dim == 1024
    with pytest.raises(ValueError, match="unknown model"):
        get_config("beit3_huge")
    with pytest.raises(ValueError, match="expected images of 32x32"):
        create_model("beit3_nano_patch16_32").encode_image(torch.randn(1, 3, 64, 64))


def test_compile_turns_off_the_multi_kernel_pick_cache(monkeypatch) -> None:
    """With inductor's multi-kernel (the default options), the lookup of picks cached by earlier runs is off: torch
    2.11 crashed loading a multi-kernel from the FX graph cache on an H100, in every run after the first one."""
    monkeypatch.delenv("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", raising=False)
    compile_layers(create_model("beit3_nano_patch16_32"), backend="eager")
    assert "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE" not in os.environ  # no inductor, nothing to turn off
    compile_layers(create_model("beit3_nano_patch16_32"), options={"triton.multi_kernel": 0})
    assert "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE" not in os.environ
    compile_layers(create_model("beit3_nano_patch16_32"))
    assert os.environ["TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"] == "1"
