"""Loading BEiT-3 retrieval weights in every form users have them, strictly.

Accepted files:
- the official release (``beit3_*_f30k_retrieval.pth``, ``beit3_*_itc_patch16_224.pth``): ``{'model': state_dict}``;
- a DeepSpeed checkpoint (``checkpoint-N/mp_rank_00_model_states.pt``, or its directory): ``{'module': state_dict}``;
- a plain training checkpoint of this project (``{'model': ...}``) or a bare state dict; ``module.`` prefixes from
  DDP are stripped; fp16/bf16-stored weights are cast to fp32.

The vision position table is resized from 224 to 384 (or any grid) exactly as the official
``load_model_and_may_interpolate``: the first 3 rows (2 fairseq offset rows + CLS) are kept and the patch grid is
resized with bicubic interpolation. Every other difference (missing or unexpected keys, wrong shapes, another model
size) raises :class:`CheckpointError` listing what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

POS_KEY = "beit3.encoder.embed_positions.A.weight"
POS_EXTRA_ROWS = 3  # two fairseq offset rows + CLS precede the patch grid
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model; the message lists every problem."""


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file; a DeepSpeed tag directory; a training run directory (its newest numbered checkpoint, else
    ``checkpoint-best``; DeepSpeed tags or plain ``.pth`` files); or a tag name such as ``<run>/checkpoint-best``
    whose plain-training file is ``<run>/checkpoint-best.pth``. So one path works for both kinds of run.

    Raises:
        FileNotFoundError: nothing there (the message names what was tried).
        CheckpointError: a directory that holds no checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        direct = p / DEEPSPEED_MODEL_FILE
        if direct.is_file():
            return direct
        for deepspeed in (True, False):
            tags = numbered_checkpoints(p, deepspeed=deepspeed)
            if tags:
                newest = tags[max(tags)]
                return newest / DEEPSPEED_MODEL_FILE if deepspeed else newest
        for best in (p / "checkpoint-best" / DEEPSPEED_MODEL_FILE, p / "checkpoint-best.pth"):
            if best.is_file():
                return best
        raise CheckpointError(f"{p} is a directory without {DEEPSPEED_MODEL_FILE}, checkpoint-*/{DEEPSPEED_MODEL_FILE} "
                              "or checkpoint-*.pth")
    if p.is_file():
        return p
    plain = p.with_name(p.name + ".pth")
    if not p.suffix and plain.is_file():
        return plain
    tried = f"neither {p} nor {plain} exists" if not p.suffix else f"{p} does not exist"
    raise FileNotFoundError(f"checkpoint not found: {tried}")


def numbered_checkpoints(run_dir: str | os.PathLike, deepspeed: bool) -> dict[int, Path]:
    """Complete ``checkpoint-<N>`` entries of a training run directory: {N: path}, DeepSpeed tag directories (that
    hold the model file) or ``.pth`` files."""
    found = {}
    pattern = f"checkpoint-*/{DEEPSPEED_MODEL_FILE}" if deepspeed else "checkpoint-*.pth"
    for f in Path(run_dir).glob(pattern):
        tag = f.parent.name if deepspeed else f.stem
        suffix = tag.removeprefix("checkpoint-")
        if suffix.isdigit():
            found[int(suffix)] = f.parent if deepspeed else f
    return found


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` on CPU, with ``weights_only=True`` whenever the file allows it.

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the small entries are wanted.

    DeepSpeed and training checkpoints carry pickled Python objects next to the tensors (an ``argparse.Namespace``
    of the run's arguments, DeepSpeed bookkeeping); those are allowed explicitly. A file that still needs arbitrary
    unpickling is loaded with ``weights_only=False`` and a warning: only load checkpoints you trust.
    """
    p = resolve_checkpoint_path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace, set]):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # a corrupt file, not a legitimate pickle of other objects
            raise CheckpointError(f"{p}: cannot be read as a PyTorch checkpoint ({_last_line(e)})") from None
        found = re.search(r"GLOBAL (\S+)", str(e))
        log.warning("%s holds pickled objects beyond tensors (%s); loading it with weights_only=False: "
                    "only load checkpoints you trust", p, found.group(1) if found else "unknown class")
        try:
            return torch.load(p, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e2:  # noqa: BLE001 (any unpickling failure means the same to the user)
            raise CheckpointError(f"{p}: cannot be read as a PyTorch checkpoint ({_last_line(e2)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{p}: cannot be read as a PyTorch checkpoint ({_last_line(e)})") from None


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def extract_state_dict(obj: Any, source: str = "checkpoint", model_key: str = "model|module") -> dict[str, Tensor]:
    """Pick the weights out of a loaded checkpoint: the first of ``model_key`` ('|'-separated) present, else the
    object itself when it is a mapping of tensors."""
    if isinstance(obj, Mapping):
        for key in model_key.split("|"):
            if key in obj and isinstance(obj[key], Mapping):
                log.info("%s: weights under %r", source, key)
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: no state dict found (looked for keys {model_key!r} and a bare state dict)")
    non_tensor = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise CheckpointError(
            f"{source}: not a state dict; entries that are not tensors: {', '.join(map(str, non_tensor[:10]))}"
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    # fp16/bf16-stored weights (DeepSpeed fp16 training keeps the module in half precision) -> fp32
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def interpolate_pos_embed(pos: Tensor, num_patches: int) -> Tensor:
    """Resize a vision position table ``[3 + g*g, D]`` to ``[3 + num_patches, D]`` (official bicubic rule)."""
    old = pos.shape[0] - POS_EXTRA_ROWS
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise CheckpointError(f"{POS_KEY}: {pos.shape[0]} rows is not 3 + a square patch grid")
    if old_side == new_side:
        return pos
    log.info("interpolating %s from %dx%d to %dx%d", POS_KEY, old_side, old_side, new_side, new_side)
    extra, grid = pos[:POS_EXTRA_ROWS], pos[POS_EXTRA_ROWS:]
    d = pos.shape[1]
    grid = grid.reshape(1, old_side, old_side, d).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(0, 2)  # [new*new, D], raster order
    return torch.cat([extra, grid.to(pos.dtype)], dim=0)


def _describe(sd: Mapping[str, Tensor]) -> str:
    """'D=1024, 24 layers' from a state dict, for error messages about the model size."""
    d = sd["beit3.text_embed.weight"].shape[1] if "beit3.text_embed.weight" in sd else "?"
    layers = {k.split(".")[3] for k in sd if k.startswith("beit3.encoder.layers.")}
    return f"D={d}, {len(layers)} layers"


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``sd`` has exactly the model's keys with the model's shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not fit the model"]
    ck, md = _describe(sd), _describe(expected)
    if ck != md:
        lines.append(f"  model size differs: checkpoint {ck}, model {md} (check --model)")
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {len(items)} {title}:\n    " + "\n    ".join(shown))
    raise CheckpointError("\n".join(lines))


def load_state(model: nn.Module, obj: Any, source: str, model_key: str = "model|module") -> dict[str, Tensor]:
    """Load an already-read checkpoint object into ``model`` strictly (for callers that also need its other
    entries, e.g. the training ``args``, without reading a multi-GB file twice); returns the state dict used."""
    sd = extract_state_dict(obj, source, model_key)
    if POS_KEY in sd and hasattr(model, "cfg"):
        sd[POS_KEY] = interpolate_pos_embed(sd[POS_KEY], model.cfg.num_patches)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    log.info("loaded %s (%d tensors)", source, len(sd))
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike, model_key: str = "model|module") -> dict[str, Tensor]:
    """Load a checkpoint file into ``model`` strictly (see the module docstring); returns the state dict used."""
    file = resolve_checkpoint_path(path)
    return load_state(model, load_checkpoint_file(file), str(file), model_key)
