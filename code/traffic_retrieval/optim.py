"""Optimiser pieces of the official BEiT-3 retrieval recipe (beit3.md section 5).

- :func:`param_groups_layer_decay`: AdamW parameter groups with layer-wise lr decay and the official no-decay rules
  (``optim_factory.get_parameter_groups`` with ``LayerDecayValueAssigner``);
- :func:`cosine_scheduler` and :func:`apply_lr`: one lr value per optimiser step, scaled per group;
- :func:`build_optimizer`: torch AdamW for the plain (DDP) path;
- :func:`group_settings` and :func:`restore_group_settings`: keep the run's per-group settings across a resume;
- :func:`deepspeed_config`: the DeepSpeed config dict of ``utils.create_ds_config``, as a pure function, and
  :func:`deepspeed_precision`, its precision read back;
- :func:`deepspeed_initialize`: ``deepspeed.initialize`` with a workaround for models with a 0-d parameter.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Exact names the official ``get_num_layer_for_vit`` sends to layer 0 (besides anything containing "embed").
_LAYER0_NAMES = frozenset(
    {
        "cls_token", "mask_token", "pos_embed", "language_pos_embed", "word_embeddings.weight", "vision_cls_token",
        "vision_pos_embed",
    }
)
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter for lr decay: 0 for embeddings, N+1 for ``...layers.N...``, L+1 for the rest.

    Follows the official ``get_num_layer_for_vit`` (whose ``num_max_layer`` is L+2): the ``rel_pos_bias`` and
    catch-all branches both give L+1 (final LayerNorm, heads, ``logit_scale``).
    """
    if "embed" in name or name in _LAYER0_NAMES or name.startswith("patch_embed"):
        return 0
    m = _LAYER_RE.search(name) if "layers." in name else None
    if m is not None:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    no_weight_decay: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Parameter groups ``layer_<id>_{decay,no_decay}`` in the order parameters are first met.

    No weight decay for 1-D parameters, names ending in ``.bias`` and the exact names in ``no_weight_decay`` (pass
    ``model.no_weight_decay()``). Group ``id`` gets ``lr_scale = layer_decay ** (num_layers + 1 - id)``. Each group
    carries ``name``, ``lr_scale``, ``weight_decay``, ``params`` and ``param_names`` (torch's own key for parameter
    names, kept in optimiser state dicts; torch AdamW and DeepSpeed both accept the extra keys).

    With ``layer_decay == 1`` every scale is 1 (the official code then skips the assigner; same numbers).
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1]; got {layer_decay}")
    scales = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in no_weight_decay
        lid = layer_id(name, num_layers)
        if lid >= len(scales):
            raise ValueError(f"parameter {name} is in layer {lid - 1} but num_layers={num_layers}")
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "lr_scale": scales[lid],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "params": [],
                "param_names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    logger.debug("param groups: %s", {k: g["param_names"] for k, g in groups.items()})
    return list(groups.values())


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
    warmup_steps: int = -1,
) -> np.ndarray:
    """One value per step: linear warmup (``linspace`` from ``start_warmup_value`` to ``base_value``, both ends
    included), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for i in 0..n-1 (so the last value stays
    just above ``final_value``), as the official ``utils.cosine_scheduler``.

    ``warmup_steps > 0`` overrides ``warmup_epochs * niter_per_ep``. (The official code then builds the warmup only if
    ``warmup_epochs > 0`` as well and otherwise fails its length assert; here the warmup is built either way.)
    """
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    if total <= 0:
        raise ValueError(f"schedule needs at least one step; got epochs={epochs}, niter_per_ep={niter_per_ep}")
    if warmup_iters > total:
        raise ValueError(f"warmup ({warmup_iters} steps) is longer than the schedule ({total} steps)")
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    n = total - warmup_iters
    cosine = np.array(
        [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    )
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * lr_scale`` (weight decay stays constant, as in the official recipe)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """torch AdamW over ``groups`` (each carries its own weight decay); the fused kernel when every parameter is on
    CUDA. The lr is a placeholder until :func:`apply_lr` sets the scheduled value."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


# The per-group settings the run decides: its flags (--layer_decay, --weight_decay, --opt_betas, --opt_eps) and its
# device (the fused / foreach kernels). An optimizer state dict carries them too, and loading one (torch's
# load_state_dict, DeepSpeed's load_checkpoint) puts the saved values back into the groups, so a resume would
# silently keep the old ones (e.g. a run started on the CPU would go on without the fused kernel on a GPU).
GROUP_SETTINGS = ("lr_scale", "weight_decay", "betas", "eps", "fused", "foreach", "capturable")


def group_settings(optimizer: Any) -> dict[str, dict[str, Any]]:
    """``{group name: {setting: value}}`` (:data:`GROUP_SETTINGS`) of an optimizer (torch, or DeepSpeed's wrapper) built
    from :func:`param_groups_layer_decay` groups; take it before loading a state dict."""
    return {g["name"]: {k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups}


def restore_group_settings(optimizer: Any, settings: dict[str, dict[str, Any]]) -> None:
    """Put ``settings`` (from :func:`group_settings`) back into the groups of the same name after a state dict was
    loaded, so the current flags apply and only the moments, step counts and loss scale come from the checkpoint."""
    names = [g.get("name") for g in optimizer.param_groups]
    if sorted(names, key=str) != sorted(settings):
        raise ValueError(f"optimizer groups {names} do not match the freshly built ones {sorted(settings)}")
    for group in optimizer.param_groups:
        group.update(settings[group["name"]])


def deepspeed_config(
    *,
    batch_size: int,
    update_freq: int,
    world_size: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    precision: str = "fp16",
    zero_stage: int = 0,
    clip_grad: float | None = None,
    initial_scale_power: int = 16,
    steps_per_print: int = 1000,
) -> dict[str, Any]:
    """The DeepSpeed config of the official ``create_ds_config`` (beit3.md 5.4), with the precision made a choice.

    - fp16 (the official): dynamic loss scale from ``2**initial_scale_power``, window 1000, hysteresis 2, min 1;
      bf16: ``{"bf16": {"enabled": true}}``; fp32: neither section.
    - optimizer "Adam" with ``adam_w_mode`` (decoupled weight decay). ``torch_adam`` makes DeepSpeed use
      ``torch.optim.AdamW`` instead of JIT-building its fused op (impossible on CPU, slow on a fresh GPU machine);
      torch's Adam always corrects the bias, so the official ``bias_correction: true`` is implied, not written
      (torch would reject the key). The official file puts ``adam_w_mode`` beside ``params``, where DeepSpeed does not
      read it; its default there is true, which is what it meant, so here it goes inside ``params``.
    - ``gradient_clipping``: ``clip_grad``, or 0 (off) when it is None, as in the official recipe. The key is always
      written because DeepSpeed 0.19 clips at 1.0 when it is absent.
    - ``zero_optimization`` only for stage 1 or 2, with ``reduce_bucket_size`` 5e8.
    """
    for name, value in (("batch_size", batch_size), ("update_freq", update_freq), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision must be fp16, bf16 or fp32; got {precision!r}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2; got {zero_stage}")
    config: dict[str, Any] = {
        "train_batch_size": batch_size * update_freq * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "steps_per_print": steps_per_print,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": [betas[0], betas[1]],
                "eps": eps,
                "adam_w_mode": True,
                "torch_adam": True,
            },
        },
    }
    if precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    config["gradient_clipping"] = 0.0 if clip_grad is None else clip_grad
    if zero_stage >= 1:
        config["zero_optimization"] = {"stage": zero_stage, "reduce_bucket_size": 5e8}
    return config


def deepspeed_precision(config: dict[str, Any]) -> str:
    """The precision a :func:`deepspeed_config` dict (or a DeepSpeed checkpoint's ``ds_config``) trains in."""
    for precision in ("fp16", "bf16"):
        if (config.get(precision) or {}).get("enabled"):
            return precision
    return "fp32"


def deepspeed_initialize(
    model: nn.Module, param_groups: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[Any, Any]:
    """``deepspeed.initialize`` with the config's optimizer over ``param_groups``; returns ``(engine, optimizer)``.

    Works around a DeepSpeed bug that the model's scalar ``logit_scale`` (shape ``[]``, as in the official checkpoint)
    triggers: DeepSpeed 0.19.8 broadcasts every parameter at start-up as ``p.data.view(torch.uint8)`` (older releases
    sent ``p.data``), which raises "self.dim() cannot be 0 to view ... as Byte" for a 0-d tensor, even in a single
    process. DeepSpeed skips
    parameters that carry ``ds_optim_param`` (its own marker, read only by that broadcast and by LoRA offload, which
    this project does not use), so the scalars carry it during ``initialize`` and are synchronised from rank 0 here
    instead, before DeepSpeed copies them into its optimizer.

    The process group must already exist when more than one process runs (:func:`init_distributed` does it);
    in a single process call :func:`traffic_retrieval.distributed.set_single_process_env` first.
    """
    import deepspeed
    import torch.distributed as dist

    scalars = [p for p in model.parameters() if p.dim() == 0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in scalars:
            dist.broadcast(p.data.view(1), src=0)  # a 1-element view shares the scalar's storage
    for p in scalars:
        p.ds_optim_param = True
    try:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=config)
    finally:
        for p in scalars:
            del p.ds_optim_param
    return engine, optimizer
