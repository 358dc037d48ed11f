"""Parameter groups, lr schedule, AdamW, the DeepSpeed config (pure and in use) and precision helpers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from traffic_retrieval.distributed import set_single_process_env
from traffic_retrieval.modeling import create_model
from traffic_retrieval.optim import (
    apply_lr,
    build_optimizer,
    cosine_scheduler,
    deepspeed_config,
    deepspeed_initialize,
    deepspeed_precision,
    group_settings,
    param_groups_layer_decay,
    restore_group_settings,
)
from traffic_retrieval.precision import PRECISIONS, get_autocast, needs_grad_scaler

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def nano():
    return create_model("beit3_nano_patch16_32")


def _group_of(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


# ------------------------------------------------------------------------------------------------------------
# parameter groups


def test_layer_decay_groups_on_the_real_model(nano):
    num_layers = nano.cfg.depth  # 2
    groups = param_groups_layer_decay(nano, 0.05, 0.5, num_layers, nano.no_weight_decay())
    scales = {f"layer_{i}": 0.5 ** (num_layers + 1 - i) for i in range(num_layers + 2)}  # .125 .25 .5 1
    expected = {  # official examples (beit3.md 5.2): name -> group
        "beit3.text_embed.weight": "layer_0_decay",
        "beit3.vision_embed.proj.weight": "layer_0_decay",  # the patch conv is decayed
        "beit3.vision_embed.proj.bias": "layer_0_no_decay",
        "beit3.vision_embed.mask_token": "layer_0_decay",  # 3-D and not in the skip list
        "beit3.vision_embed.cls_token": "layer_0_no_decay",
        "beit3.encoder.embed_positions.A.weight": "layer_0_no_decay",
        "beit3.encoder.embed_positions.B.weight": "layer_0_decay",
        "beit3.encoder.layers.0.self_attn.q_proj.A.weight": "layer_1_decay",
        "beit3.encoder.layers.0.self_attn.q_proj.B.bias": "layer_1_no_decay",
        "beit3.encoder.layers.0.self_attn_layer_norm.A.weight": "layer_1_no_decay",
        "beit3.encoder.layers.1.ffn.B.fc2.weight": "layer_2_decay",
        "beit3.encoder.layers.1.final_layer_norm.B.bias": "layer_2_no_decay",
        "beit3.encoder.layer_norm.A.weight": "layer_3_no_decay",
        "language_head.weight": "layer_3_decay",
        "vision_head.weight": "layer_3_decay",
        "logit_scale": "layer_3_no_decay",  # 0-D: no decay only through the skip list
    }
    by_param = _group_of(groups)
    for name, group_name in expected.items():
        g = by_param[name]
        assert g["name"] == group_name, name
        layer = group_name.rsplit("_", 2)[0] if group_name.endswith("no_decay") else group_name.rsplit("_", 1)[0]
        assert g["lr_scale"] == pytest.approx(scales[layer]), name
        assert g["weight_decay"] == (0.0 if group_name.endswith("no_decay") else 0.05), name
    # Every trainable parameter exactly once, names aligned with tensors, the 2 * (L + 2) groups, first-met order.
    params = dict(nano.named_parameters())
    assert sorted(by_param) == sorted(params)
    for g in groups:
        assert all(params[n] is p for n, p in zip(g["param_names"], g["params"]))
    assert {g["name"] for g in groups} == {f"layer_{i}_{k}" for i in range(4) for k in ("decay", "no_decay")}
    # Every parameter inside a layer goes to that layer; everything else to 0 or L + 1.
    for name in params:
        if ".layers." in name:
            assert by_param[name]["name"].startswith(f"layer_{int(name.split('.layers.')[1].split('.')[0]) + 1}_")
        elif "embed" in name:
            assert by_param[name]["name"].startswith("layer_0_")
        else:
            assert by_param[name]["name"].startswith("layer_3_")


def test_skip_list_and_frozen_parameters():
    model = create_model("beit3_nano_patch16_32")
    model.vision_head.weight.requires_grad_(False)
    by_param = _group_of(param_groups_layer_decay(model, 0.05, 0.9, 2, no_weight_decay=set()))
    assert "vision_head.weight" not in by_param
    assert by_param["logit_scale"]["name"] == "layer_3_decay"  # without the skip list the 0-D scale is decayed
    assert by_param["beit3.vision_embed.cls_token"]["name"] == "layer_0_decay"
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(model, 0.05, 1.5, 2)


def test_official_scales_for_the_recipes():
    """beit3.md 5.2: large 0.85 -> embeddings 0.85**25; base 0.65 -> 0.65**13."""
    for depth, decay, embed_scale in ((24, 0.85, 0.85**25), (12, 0.65, 0.65**13)):
        model = nn.Module()
        model.text_embed = nn.Embedding(4, 2)
        model.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(depth)])
        by_param = _group_of(param_groups_layer_decay(model, 0.05, decay, depth))
        assert by_param["text_embed.weight"]["lr_scale"] == pytest.approx(embed_scale)
        assert by_param[f"layers.{depth - 1}.weight"]["lr_scale"] == pytest.approx(decay)
        assert by_param["layers.0.bias"]["lr_scale"] == pytest.approx(decay**depth)


# ------------------------------------------------------------------------------------------------------------
# schedule


def test_cosine_schedule_hand_computed():
    s = cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=2, warmup_epochs=1)
    # warmup linspace(0, 1, 2); then 0.1 + 0.45 * (1 + cos(pi * i / 4)), i = 0..3
    np.testing.assert_allclose(s, [0.0, 1.0, 1.0, 0.868198052, 0.55, 0.231801948], atol=1e-9)
    s = cosine_scheduler(1.0, 0.0, epochs=3, niter_per_ep=2, warmup_epochs=1, warmup_steps=3, start_warmup_value=0.2)
    np.testing.assert_allclose(s, [0.2, 0.6, 1.0, 1.0, 0.75, 0.25], atol=1e-12)
    s = cosine_scheduler(2.0, 0.0, epochs=1, niter_per_ep=2)  # no warmup: starts at the base value
    np.testing.assert_allclose(s, [2.0, 1.0], atol=1e-12)
    # warmup_steps without warmup_epochs (the official code fails its length assert here); one warmup step is the
    # start value alone (linspace with one point)
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 1, 3, warmup_steps=1), [0.0, 1.0, 0.5], atol=1e-12)
    with pytest.raises(ValueError, match="warmup"):
        cosine_scheduler(1.0, 0.0, 1, 3, warmup_steps=4)


def test_flickr_recipe_schedule():
    """beit3.md 5.1/5.3: 145,000 pairs // 3072 = 47 steps/epoch, 20 epochs, 5 of warmup, lr 1e-4, min 1e-6."""
    s = cosine_scheduler(1e-4, 1e-6, epochs=20, niter_per_ep=145_000 // 3072, warmup_epochs=5)
    assert len(s) == 940
    assert s[0] == 0.0 and s[234] == pytest.approx(1e-4) and s[235] == pytest.approx(1e-4)
    assert s[1] == pytest.approx(1e-4 / 234)
    assert s[-1] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 704 / 705)))
    assert np.all(np.diff(s[235:]) < 0)


# ------------------------------------------------------------------------------------------------------------
# optimiser


def test_adamw_honours_group_decay_and_lr_scale():
    decayed, plain = nn.Parameter(torch.full((3, 3), 2.0)), nn.Parameter(torch.full((3,), 2.0))
    groups = [
        {"name": "a", "params": [decayed], "param_names": ["a"], "weight_decay": 0.5, "lr_scale": 0.25},
        {"name": "b", "params": [plain], "param_names": ["b"], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    opt = build_optimizer(groups, lr=123.0)
    apply_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), pytest.approx(0.1)]
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    # Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter: p *= 1 - lr * wd.
    decayed.grad, plain.grad = torch.zeros_like(decayed), torch.zeros_like(plain)
    opt.step()
    torch.testing.assert_close(decayed.detach(), torch.full((3, 3), 2.0 * (1 - 0.025 * 0.5)))
    torch.testing.assert_close(plain.detach(), torch.full((3,), 2.0))
    # The names survive in the state dict (torch's own "param_names" key).
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["a"]


def test_resumed_optimizer_keeps_the_new_group_settings(nano):
    """Loading a state dict brings back the saved lr_scale, weight decay, betas and eps; restore_group_settings puts
    the current run's values back (matched by name) and keeps the loaded moments."""
    def adamw(layer_decay: float, weight_decay: float, betas: tuple, eps: float) -> torch.optim.AdamW:
        groups = param_groups_layer_decay(nano, weight_decay, layer_decay, nano.cfg.depth, nano.no_weight_decay())
        return build_optimizer(groups, 1e-3, betas, eps)

    old = adamw(0.85, 0.05, (0.9, 0.999), 1e-8)
    for p in nano.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    nano.zero_grad(set_to_none=True)
    new = adamw(0.5, 0.3, (0.8, 0.9), 1e-6)
    settings = group_settings(new)
    assert settings["layer_0_decay"] == {"lr_scale": 0.5 ** 3, "weight_decay": 0.3, "betas": (0.8, 0.9), "eps": 1e-6,
                                         "fused": None, "foreach": None, "capturable": False}
    saved = old.state_dict()
    for group in saved["param_groups"]:
        group["foreach"] = True  # as if saved on another device, whose kernel choice differs from this run's
    new.load_state_dict(saved)
    assert new.param_groups[1]["weight_decay"] == 0.05  # what a resume did before: the checkpoint's value back
    assert new.param_groups[1]["foreach"] is True
    restore_group_settings(new, settings)
    assert group_settings(new) == settings
    assert all(torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) for p in nano.parameters())
    settings.pop("layer_0_decay")
    with pytest.raises(ValueError, match="do not match the freshly built ones"):
        restore_group_settings(new, settings)


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed config


def test_deepspeed_config_official_fp16():
    cfg = deepspeed_config(batch_size=96, update_freq=1, world_size=32, lr=5e-5, weight_decay=0.05,
                           betas=(0.9, 0.999), eps=1e-8, precision="fp16", zero_stage=0, clip_grad=None)
    assert cfg == {
        "train_batch_size": 3072,
        "train_micro_batch_size_per_gpu": 96,
        "steps_per_print": 1000,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 5e-5, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8,
                       "adam_w_mode": True, "torch_adam": True},
        },
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "gradient_clipping": 0.0,  # the official "no clipping", written out (DeepSpeed 0.19 defaults to 1.0)
    }


def test_deepspeed_precision_reads_the_config_back():
    common = dict(batch_size=4, update_freq=1, world_size=1, lr=1e-3, weight_decay=0.05)
    for precision in PRECISIONS:
        assert deepspeed_precision(deepspeed_config(**common, precision=precision)) == precision
    assert deepspeed_precision({"fp16": {"enabled": False}}) == "fp32"


def test_deepspeed_config_options():
    common = dict(batch_size=4, update_freq=2, world_size=3, lr=1e-3, weight_decay=0.0)
    cfg = deepspeed_config(**common, precision="bf16", zero_stage=2, clip_grad=3.0, initial_scale_power=7,
                           steps_per_print=5)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["gradient_clipping"] == 3.0 and cfg["steps_per_print"] == 5
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e8}
    cfg = deepspeed_config(**common, precision="fp32", zero_stage=1, initial_scale_power=7)
    # no clipping is written as 0: DeepSpeed 0.19 clips at 1.0 when the key is absent
    assert "fp16" not in cfg and "bf16" not in cfg and cfg["gradient_clipping"] == 0.0
    assert cfg["zero_optimization"]["stage"] == 1
    assert "zero_optimization" not in deepspeed_config(**common, precision="fp32", zero_stage=0)
    assert deepspeed_config(**common, precision="fp16", initial_scale_power=7)["fp16"]["initial_scale_power"] == 7
    for bad in (dict(precision="int8"), dict(zero_stage=3), dict(batch_size=0)):
        with pytest.raises(ValueError):
            deepspeed_config(**{**common, **bad})


@pytest.fixture
def single_process_env(monkeypatch):
    """Undo every torchrun variable this test sets (monkeypatch only restores variables it has seen)."""
    for var in (*TORCHRUN_VARS, "DS_ACCELERATOR"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    set_single_process_env()
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_deepspeed_engine_trains_and_saves(tmp_path, single_process_env):
    from traffic_retrieval.checkpoint import load_weights
    from traffic_retrieval.loss import ContrastiveLoss

    torch.manual_seed(0)
    model = create_model("beit3_nano_patch16_32")
    groups = param_groups_layer_decay(model, 0.05, 0.5, model.cfg.depth, model.no_weight_decay())
    config = deepspeed_config(batch_size=4, update_freq=1, world_size=1, lr=1e-3, weight_decay=0.05,
                              precision="bf16", zero_stage=1, clip_grad=1.0, steps_per_print=10**6)
    engine, optimizer = deepspeed_initialize(model, groups, config)
    assert engine.gradient_accumulation_steps() == 1
    assert engine.zero_optimization_stage() == 1 and engine.bfloat16_enabled()
    assert not hasattr(model.logit_scale, "ds_optim_param")  # the broadcast workaround's marker is gone again
    assert isinstance(engine.basic_optimizer, torch.optim.AdamW)  # torch_adam: no fused-op build
    before = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}

    loss_fn = ContrastiveLoss()
    images = torch.randn(4, 3, 32, 32).bfloat16()
    tokens = torch.randint(0, 1000, (4, 8))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    losses = []
    for lr in (1e-3, 5e-4):
        apply_lr(optimizer, lr)
        img, txt = engine(images, tokens, mask)
        loss = loss_fn(img, txt, engine.module.logit_scale)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["layer_3_decay"] == pytest.approx(5e-4) and lrs["layer_0_decay"] == pytest.approx(5e-4 * 0.125)
    after = engine.module.state_dict()
    # (not logit_scale: 2 steps of ~1e-3 vanish in its bf16 copy, whose spacing near 2.66 is 1/64)
    for key in ("vision_head.weight", "beit3.encoder.layers.0.ffn.B.fc1.weight", "beit3.text_embed.weight"):
        assert not torch.equal(before[key], after[key].float()), key

    engine.save_checkpoint(str(tmp_path), tag="checkpoint-1")
    states = tmp_path / "checkpoint-1" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert list(saved) == list(after)
    assert all(torch.equal(saved[k], after[k]) for k in after)
    # The project's loader reads the DeepSpeed format back into a fresh model.
    fresh = create_model("beit3_nano_patch16_32")
    load_weights(fresh, states)
    torch.testing.assert_close(fresh.vision_head.weight, after["vision_head.weight"].float())
    assert deepspeed_precision(config) == deepspeed_precision(torch.load(states, weights_only=False)["ds_config"]) \
        == "bf16"

    # A resume (load_checkpoint) with other flags: the ZeRO/bf16 wrapper's groups get the checkpoint's values back,
    # restore_group_settings puts the new run's back.
    groups = param_groups_layer_decay(fresh, 0.3, 0.25, fresh.cfg.depth, fresh.no_weight_decay())
    config2 = deepspeed_config(batch_size=4, update_freq=1, world_size=1, lr=1e-3, weight_decay=0.3,
                               betas=(0.8, 0.9), eps=1e-6, precision="bf16", zero_stage=1, clip_grad=1.0,
                               steps_per_print=10**6)
    engine2, optimizer2 = deepspeed_initialize(fresh, groups, config2)
    settings = group_settings(optimizer2)
    assert {k: settings["layer_0_decay"][k] for k in ("lr_scale", "weight_decay", "betas", "eps")} == {
        "lr_scale": 0.25 ** 3, "weight_decay": 0.3, "betas": (0.8, 0.9), "eps": 1e-6}
    engine2.load_checkpoint(str(tmp_path), tag="checkpoint-1")
    assert group_settings(optimizer2)["layer_0_decay"]["lr_scale"] == pytest.approx(0.125)  # the saved 0.5 ** 3
    restore_group_settings(optimizer2, settings)
    assert group_settings(optimizer2) == settings


# ------------------------------------------------------------------------------------------------------------
# precision


def test_precision_autocast_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    with get_autocast("fp32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with get_autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 is not supported on cpu"):
        get_autocast("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        get_autocast("fp8", "cpu")
    assert not needs_grad_scaler("bf16", "cpu") and not needs_grad_scaler("fp32", "cpu")


def test_precision_cuda_choices():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructing a CUDA autocast without a GPU only warns
        ctx = get_autocast("fp16", torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16 and ctx.device == "cuda"
    assert needs_grad_scaler("fp16", "cuda") and not needs_grad_scaler("bf16", "cuda")
