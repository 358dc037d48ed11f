"""Stage 3: BEiT-3 retrieval fine-tuning of one category (``code/run_beit3_finetuning.py``).

Reads ``<data_path>/flickr30k_<category>.{train,val}.jsonl`` (:mod:`traffic_retrieval.data`) and the images they
name; optionally a starting checkpoint (``--finetune``). Writes into ``output_dir``:

- ``args.json`` (the resolved config) and, with DeepSpeed, ``deepspeed_config.json``;
- ``log.txt``: one JSON line per epoch ``{epoch, train_loss, lr, n_steps, seconds, pairs_per_s, val_*}``;
- ``training_curves.png``: train loss and val metrics per epoch; TensorBoard scalars in ``log_dir``, all indexed by
  optimizer step (an epoch's at its last step), so a resumed run's purge also drops what a crashed epoch had logged;
- checkpoints: ``checkpoint-<epoch>.pth`` (``{'model', 'optimizer', 'scaler', 'epoch', 'global_step', 'args', 'rng',
  'best'}``) or, with DeepSpeed, ``checkpoint-<epoch>/mp_rank_00_model_states.pt`` (weights under ``'module'``);
  epochs are 0-based as in the official code. Kept: every ``save_ckpt_freq``-th epoch, the latest (the resume
  point) and ``checkpoint-best(.pth)`` (highest val official mAP@10), described by ``best.json``.

Every file is written atomically (a DeepSpeed checkpoint is written to a hidden directory and renamed), so an
interrupted run leaves complete files only, and ``--auto_resume`` continues from the latest checkpoint at an epoch
boundary, after checking that it was trained on the same index files (their sha256 is in every checkpoint) and
settings (:func:`check_resume`). Resumed runs reproduce uninterrupted ones: the data order is a function of (seed,
epoch), the random state is re-seeded from (seed, epoch, rank) at the start of every epoch, and the lr schedule is
the full run's. Changed optimizer flags (``--layer_decay``, ``--weight_decay``, ``--opt_betas``, ``--opt_eps``) apply
to the resumed epochs: they are put back into the optimizer after its saved state is loaded.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .checkpoint import DEEPSPEED_MODEL_FILE, load_checkpoint_file, load_weights, numbered_checkpoints
from .data import (
    DEDUP_MODES,
    EvalSplit,
    ImageDataset,
    PairDataset,
    check_token_ids,
    index_file,
    read_index,
    steps_per_epoch,
    train_loader,
    train_sampler,
)
from .engine import ContrastiveForward, DeepSpeedUpdater, PlainUpdater, StepCallback, evaluate, train_one_epoch
from .fileio import atomic_open, sha256_file, torch_save, write_json, write_text
from .loss import ContrastiveLoss
from .modeling import BEiT3Retrieval, compile_layers, create_model, get_config
from .optim import build_optimizer as adamw
from .optim import (
    cosine_scheduler,
    deepspeed_config,
    deepspeed_initialize,
    deepspeed_precision,
    group_settings,
    param_groups_layer_decay,
    restore_group_settings,
)
from .precision import PRECISIONS, needs_grad_scaler
from .runtime import resolve_device
from .tokenizer import Tokenizer
from .transforms import TRAIN_CROPS, eval_transform, train_transform

log = logging.getLogger(__name__)

CATEGORY_CROPS = {"car": "car", "people": "people"}  # --train_crop auto: the 4th place's transform per category
METRICS = ("official_map10", "map10", "r1", "r5", "r10")


class TrainError(ValueError):
    """A configuration or run-directory problem found before training; the message says what to change."""


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    data_path: str = "dataset/train"  # folder with flickr30k_<category>.<split>.jsonl and the *_images/ folders
    category: str = "car"  # car | people: which index files, which crop, people padding
    task: str = "flickr30k"  # the official flag; flickr30k is the only task, the index names are flickr30k_*
    sentencepiece_model: str = "model_pth/beit3.spm"  # only checked against the model's vocabulary size
    num_max_bpe_tokens: int = 64  # text length including bos/eos
    train_crop: str = "auto"  # auto | official | car | people (auto: the 4th place's per-category crop)
    people_pad: int = 70  # black pixels padded left and right of people images, in training and validation
    randaug: bool = False  # the official RandAugment (2 ops, magnitude 7)
    # relevance | attribute | caption | none: which captions in a batch are not negatives (loss.py); relevance, the
    # official relevance rule, beat attribute on the demo's pedestrians (README, stage 3)
    dedup: str = "relevance"
    num_workers: int | None = None  # DataLoader workers per process (None: from the CPU count)


@dataclass
class ModelConfig:
    model: str = "beit3_large_patch16_384"  # registered model name
    input_size: int | None = None  # image side in pixels (None: the model's)
    drop_path: float = 0.2  # stochastic depth rate of the last layer
    vocab_size: int | None = None  # text embedding rows, only for non-official configs
    finetune: str | None = None  # starting checkpoint; None trains from scratch
    model_key: str = "model|module"  # where the weights are inside the checkpoint
    checkpoint_activations: bool = False  # recompute layers in backward to save memory
    compile: bool = False  # torch.compile each encoder layer


@dataclass
class OptimConfig:
    epochs: int = 20
    warmup_epochs: int = 5  # linear warmup from 0, per step
    lr: float = 1e-4  # peak base lr (times each layer's lr_scale)
    min_lr: float = 1e-6  # end of the cosine
    weight_decay: float = 0.05
    layer_decay: float = 0.85  # lr scale = layer_decay ** (L + 1 - layer id)
    batch_size: int = 80  # per process
    eval_batch_size: int | None = None  # None: 1.5 x batch_size
    update_freq: int = 1  # gradient accumulation steps
    clip_grad: float | None = None  # max gradient norm; None: no clipping (the recipe)
    opt_betas: tuple[float, float] = (0.9, 0.999)
    opt_eps: float = 1e-8
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (smoke runs, tests)


@dataclass
class RuntimeConfig:
    output_dir: str | None = None  # None: code/pt_out_<category>
    log_dir: str | None = None  # TensorBoard; None: <output_dir>/tb
    seed: int = 42
    save_ckpt_freq: int = 5  # keep checkpoint-N when (N + 1) % freq == 0 (plus the latest and the best)
    enable_deepspeed: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    initial_scale_power: int = 16  # DeepSpeed fp16 initial loss scale 2**power
    precision: str | None = None  # fp32 | bf16 | fp16; None: fp16 with DeepSpeed on cuda, bf16 on cuda, fp32 on cpu
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: runtime.default_threads)
    sdpa: str = "default"  # attention kernel preference on a GPU (modeling.SDPA_ORDERS)
    auto_resume: bool = False  # continue from the latest checkpoint in output_dir
    eval: bool = False  # only evaluate --finetune (or the run's best) on the val split
    fused_ffn: bool = False  # the FFN's GELU + sub-LN as one Triton kernel (GPU; traffic_retrieval.kernels)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.runtime.output_dir or f"code/pt_out_{self.data.category}")

    @property
    def log_dir(self) -> Path:
        return Path(self.runtime.log_dir) if self.runtime.log_dir else self.output_dir / "tb"

    @property
    def train_crop(self) -> str:
        return CATEGORY_CROPS[self.data.category] if self.data.train_crop == "auto" else self.data.train_crop

    @property
    def eval_pad(self) -> int:
        """People images are padded in validation as in training, so both see the same framing."""
        return self.data.people_pad if self.data.category == "people" else 0

    @property
    def eval_batch_size(self) -> int:
        return self.optim.eval_batch_size or max(1, int(1.5 * self.optim.batch_size))


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`TrainError` for values that cannot work together (argparse already checked choices)."""
    o, m, d, r = cfg.optim, cfg.model, cfg.data, cfg.runtime
    problems = []
    if d.category not in CATEGORY_CROPS:
        problems.append(f"category must be one of {sorted(CATEGORY_CROPS)}, got {d.category!r}")
    if d.train_crop != "auto" and d.train_crop not in TRAIN_CROPS:
        problems.append(f"train_crop must be auto or one of {TRAIN_CROPS}, got {d.train_crop!r}")
    if d.dedup not in DEDUP_MODES:
        problems.append(f"dedup must be one of {DEDUP_MODES}, got {d.dedup!r}")
    for name, value in (("epochs", o.epochs), ("batch_size", o.batch_size), ("update_freq", o.update_freq),
                        ("save_ckpt_freq", r.save_ckpt_freq), ("num_max_bpe_tokens", d.num_max_bpe_tokens - 2)):
        if value < 1:
            problems.append(f"{name} is too small ({value})")
    if not 0 <= o.warmup_epochs <= o.epochs:
        problems.append(f"warmup_epochs ({o.warmup_epochs}) must be between 0 and epochs ({o.epochs})")
    if not 0 < o.layer_decay <= 1:
        problems.append(f"layer_decay must be in (0, 1], got {o.layer_decay}")
    if not 0 <= m.drop_path < 1:
        problems.append(f"drop_path must be in [0, 1), got {m.drop_path}")
    if o.clip_grad is not None and not o.clip_grad > 0:  # (not > 0: NaN too)
        # clip_grad_norm_ would zero (0) or reverse (< 0) every gradient, DeepSpeed would not clip at all
        problems.append(f"clip_grad must be > 0, got {o.clip_grad} (leave it out, or pass None, for no clipping)")
    if o.max_steps_per_epoch is not None and o.max_steps_per_epoch < 1:
        problems.append(f"max_steps_per_epoch must be >= 1, got {o.max_steps_per_epoch}")
    if r.precision is not None and r.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {r.precision!r}")
    if r.zero_stage not in (0, 1, 2):
        problems.append(f"zero_stage must be 0, 1 or 2, got {r.zero_stage}")
    if m.vocab_size is not None and m.model.startswith(("beit3_base", "beit3_large")):
        problems.append(f"vocab_size can only be overridden for non-official configs, not {m.model}")
    if problems:
        raise TrainError("bad configuration: " + "; ".join(problems))


def resolve_precision(cfg: TrainConfig, device: torch.device, deepspeed: bool) -> str:
    """The precision to train with (see :class:`RuntimeConfig`); fp16 on the CPU is an error, and so is a
    combination DeepSpeed cannot run."""
    precision = cfg.runtime.precision or (("fp16" if deepspeed else "bf16") if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type == "cpu":
        raise TrainError("precision fp16 is not supported on the CPU (no loss scaling there); use bf16 or fp32")
    if deepspeed and cfg.optim.clip_grad and precision == "fp32" and cfg.runtime.zero_stage == 0:
        raise TrainError("--clip_grad with DeepSpeed in fp32 without ZeRO is not supported: DeepSpeed's fp32 "
                         "clipping fails on the 0-d logit_scale; use --zero_stage 1, bf16, or plain DDP")
    return precision


def warn_ignored_flags(cfg: TrainConfig, precision: str) -> list[str]:
    """Warn about (and return) flags given a value this run cannot use, instead of ignoring them silently."""
    r, default = cfg.runtime, RuntimeConfig()
    given = [f"--{k} {getattr(r, k)}" for k in ("zero_stage", "initial_scale_power")
             if getattr(r, k) != getattr(default, k)]
    ignored = []
    if given and not r.enable_deepspeed:
        ignored.append(f"{', '.join(given)}: only DeepSpeed uses them (--enable_deepspeed)")
    elif r.enable_deepspeed and r.initial_scale_power != default.initial_scale_power and precision != "fp16":
        ignored.append(f"--initial_scale_power {r.initial_scale_power}: only fp16 has a loss scale, this run trains "
                       f"in {precision}")
    for line in ignored:
        log.warning("ignored %s", line)
    return ignored


def default_workers(world_size: int) -> int:
    """DataLoader workers per process: none on a 2-core machine (they would fight the trainer), else a share."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, max(1, cores // world_size - 1))


# ------------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    dataset: PairDataset
    sampler: Any  # DistributedSampler
    loader: Any  # DataLoader
    val_split: EvalSplit
    val_images: ImageDataset
    steps_per_epoch: int  # optimizer steps per epoch (after --max_steps_per_epoch)
    num_workers: int  # DataLoader workers per process (training and validation)
    index_sha256: dict[str, str]  # {"train": ..., "val": ...}: stored in checkpoints, checked on resume


def build_data(cfg: TrainConfig, info: D.DistInfo, vocab_rows: int, pin_memory: bool = False) -> TrainData:
    """Read the category's train/val index, check it against the batch size and the vocabulary, build loaders."""
    d, o = cfg.data, cfg.optim
    paths = {s: index_file(d.data_path, d.category, s) for s in ("train", "val")}
    rows = {s: read_index(p) for s, p in paths.items()}
    for s, p in paths.items():
        check_token_ids(rows[s], vocab_rows, p)
    need = o.batch_size * info.world_size * o.update_freq
    if len(rows["train"]) < need:
        raise TrainError(
            f"{paths['train']}: {len(rows['train'])} training pairs, fewer than one optimizer step needs: batch_size "
            f"{o.batch_size} x {info.world_size} process(es) x update_freq {o.update_freq} = {need}; lower "
            "--batch_size or --update_freq, or use fewer processes"
        )
    size = cfg_input_size(cfg)
    ds = PairDataset(rows["train"], d.data_path, train_transform(size, cfg.train_crop, d.randaug, d.people_pad),
                     d.dedup)
    sampler = train_sampler(ds, info.world_size, info.rank, cfg.runtime.seed)
    workers = d.num_workers if d.num_workers is not None else default_workers(info.world_size)
    loader = train_loader(ds, sampler, o.batch_size, d.num_max_bpe_tokens, workers, pin_memory)
    steps = steps_per_epoch(len(ds), o.batch_size, info.world_size, o.update_freq)
    if o.max_steps_per_epoch is not None:
        steps = min(steps, o.max_steps_per_epoch)
    val = EvalSplit.from_rows(rows["val"])
    log.info("%s: %d train pairs (%d steps/epoch), val %d captions x %d images", d.category, len(ds), steps,
             len(val.query_segments), len(val.image_paths))
    val_images = ImageDataset(val.image_paths, d.data_path, eval_transform(size, cfg.eval_pad))
    return TrainData(ds, sampler, loader, val, val_images, steps, workers,
                     {s: sha256_file(p) for s, p in paths.items()})


def cfg_input_size(cfg: TrainConfig) -> int:
    return cfg.model.input_size or get_config(cfg.model.model).img_size


# ------------------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, finetune: str | None = None, *, start_weights: bool = True) -> BEiT3Retrieval:
    """The model with ``finetune`` (default ``cfg.model.finetune``) loaded strictly, or from scratch (logged).

    ``start_weights=False``: leave the random init, read no file and warn about nothing (a resume checkpoint is
    about to replace every weight).
    """
    m = cfg.model
    model = create_model(m.model, img_size=cfg_input_size(cfg), drop_path_rate=m.drop_path,
                         checkpoint_activations=m.checkpoint_activations, vocab_size=m.vocab_size)
    path = finetune if finetune is not None else m.finetune
    if start_weights and path:
        load_weights(model, path, m.model_key)
    elif start_weights:
        log.warning("=" * 30 + " no --finetune: training %s FROM SCRATCH (random init) " + "=" * 30, m.model)
    _check_tokenizer(cfg, model.cfg.vocab_size)
    return compile_layers(model) if m.compile else model


def _check_tokenizer(cfg: TrainConfig, vocab_rows: int) -> None:
    spm = Path(cfg.data.sentencepiece_model)
    if not spm.is_file():
        log.info("%s not found: the vocabulary is checked against the index's token ids only", spm)
        return
    n = Tokenizer(spm).vocab_size
    if n > vocab_rows:
        raise TrainError(f"{spm} emits {n} token ids but {cfg.model.model} has {vocab_rows} text embedding rows; "
                         "pass a matching --sentencepiece_model (or --vocab_size for a non-official config)")


# ------------------------------------------------------------------------------------------------------ optimizer
@dataclass
class Trainer:
    """The model in its training wrapper and what updates it."""

    model: BEiT3Retrieval  # the bare model (weights, evaluation, checkpoints)
    updater: PlainUpdater | DeepSpeedUpdater
    scaler: torch.amp.GradScaler | None
    ds_config: dict | None
    eval_precision: str  # autocast precision for validation ("fp32" with DeepSpeed: the module has its own dtype)


def build_optimizer(cfg: TrainConfig, model: BEiT3Retrieval, info: D.DistInfo, device: torch.device,
                    precision: str) -> Trainer:
    """AdamW with layer-decay groups, in DDP (plain) or in a DeepSpeed engine."""
    o = cfg.optim
    groups = param_groups_layer_decay(model, o.weight_decay, o.layer_decay, model.cfg.depth, model.no_weight_decay())
    loss_fn = ContrastiveLoss(gather=True, dedup=cfg.data.dedup != "none")
    if cfg.runtime.enable_deepspeed:
        ds_cfg = deepspeed_config(batch_size=o.batch_size, update_freq=o.update_freq, world_size=info.world_size,
                                  lr=o.lr, weight_decay=o.weight_decay, betas=o.opt_betas, eps=o.opt_eps,
                                  precision=precision, zero_stage=cfg.runtime.zero_stage,
                                  clip_grad=o.clip_grad,
                                  initial_scale_power=cfg.runtime.initial_scale_power)
        engine, optimizer = deepspeed_initialize(model, groups, ds_cfg)
        return Trainer(model, DeepSpeedUpdater(engine, optimizer, loss_fn), None, ds_cfg, "fp32")
    model.to(device)
    wrapped: nn.Module = ContrastiveForward(model)
    if info.distributed:
        # find_unused_parameters: the image pass leaves the language experts unused and vice versa (official too)
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = adamw(groups, o.lr, o.opt_betas, o.opt_eps)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(precision, device) else None
    updater = PlainUpdater(wrapped, optimizer, loss_fn, device=device, precision=precision,
                           update_freq=o.update_freq, clip_grad=o.clip_grad, scaler=scaler)
    return Trainer(model, updater, scaler, None, precision)


# ------------------------------------------------------------------------------------------------------ rng
def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch, numpy and random from (seed, epoch, rank): epoch e draws the same augmentations and drop-path
    masks whether or not the run was interrupted before it."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (so the checkpoint loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": [version, list(internal), gauss_py]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))


# ------------------------------------------------------------------------------------------------------ checkpoints
def _tag(epoch: int | str) -> str:
    return f"checkpoint-{epoch}"


def save_checkpoint(trainer: Trainer, output_dir: Path, tag: str, state: dict[str, Any]) -> None:
    """Write checkpoint ``tag`` completely or not at all (every rank calls this)."""
    if trainer.ds_config is None:
        if D.is_main_process():
            opt = trainer.updater.optimizer
            torch_save({"model": trainer.model.state_dict(), "optimizer": opt.state_dict(),
                        "scaler": trainer.scaler.state_dict() if trainer.scaler else None, **state},
                       output_dir / f"{tag}.pth")
        D.barrier()
        return
    tmp = f".tmp-{tag}"
    if D.is_main_process() and (output_dir / tmp).exists():
        shutil.rmtree(output_dir / tmp)  # left by an interrupted save
    D.barrier()
    trainer.updater.engine.save_checkpoint(str(output_dir), tag=tmp, client_state=state, save_latest=False)
    if D.is_main_process():
        _replace_dir(output_dir / tmp, output_dir / tag)
    D.barrier()


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)


def prune_checkpoints(output_dir: Path, deepspeed: bool, latest: int, save_ckpt_freq: int) -> None:
    """Remove numbered checkpoints older than ``latest`` that are not every ``save_ckpt_freq``-th epoch."""
    if not D.is_main_process():
        return
    for epoch, path in numbered_checkpoints(output_dir, deepspeed).items():
        if epoch >= latest or (epoch + 1) % save_ckpt_freq == 0:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_output_dir(cfg: TrainConfig) -> int | None:
    """The epoch of the checkpoint to resume from, or None for a new run.

    Without ``--auto_resume`` an output directory that already holds checkpoints is an error (they would be
    overwritten), and so is one whose checkpoints are of the other kind (DeepSpeed vs plain).
    """
    out, ds = cfg.output_dir, cfg.runtime.enable_deepspeed
    mine, other = numbered_checkpoints(out, ds), numbered_checkpoints(out, not ds)
    if (mine or other) and not cfg.runtime.auto_resume:
        raise TrainError(f"{out} already holds checkpoints of an earlier run; pass --auto_resume to continue it "
                         "or choose another --output_dir")
    if other and not mine:
        raise TrainError(f"{out} holds {'plain' if ds else 'DeepSpeed'} checkpoints; resume it "
                         f"{'without' if ds else 'with'} --enable_deepspeed")
    if not mine and cfg.runtime.auto_resume:
        log.info("auto_resume: no checkpoint in %s, starting a new run", out)
    return max(mine) if mine else None


# settings that may differ on resume without a warning: where and how the run executes, not what it learns, and
# start values the checkpoint replaces (the start weights, DeepSpeed's fp16 loss scale)
RESUME_FREE = {("runtime", k) for k in ("output_dir", "log_dir", "device", "threads", "sdpa", "fused_ffn",
                                        "auto_resume", "eval", "initial_scale_power")} | {
    ("data", "num_workers"), ("model", "compile"), ("optim", "eval_batch_size"), ("model", "finetune"),
    ("model", "model_key")}
# settings the checkpoint's weights are made for: another value cannot continue the run
RESUME_FIXED = {("data", "category"), ("data", "task"), ("model", "model"), ("model", "input_size"),
                ("model", "vocab_size")}


def checkpoint_path(output_dir: Path, epoch: int | str, deepspeed: bool) -> Path:
    """The file that holds checkpoint ``epoch``'s entries (for DeepSpeed, the client state is in the model file)."""
    return output_dir / _tag(epoch) / DEEPSPEED_MODEL_FILE if deepspeed else output_dir / f"{_tag(epoch)}.pth"


def check_resume(cfg: TrainConfig, data: TrainData, epoch: int, precision: str, world_size: int) -> None:
    """Refuse to resume checkpoint ``epoch`` when it cannot continue this run; warn about changed settings.

    Errors: other index files than the checkpoint was trained on (the run would silently mix two datasets), another
    model, input size or category, another number of optimizer steps per epoch (the lr schedule and the data order
    would not line up), and with DeepSpeed another layout of its checkpoint (:func:`_deepspeed_problems`). Other
    changed hyperparameters are logged: they apply from the resumed epoch on (:func:`resume`).
    """
    path = checkpoint_path(cfg.output_dir, epoch, cfg.runtime.enable_deepspeed)
    state = load_checkpoint_file(path, mmap=True)
    name = path.relative_to(cfg.output_dir)
    problems = []
    saved_sha = state.get("index_sha256")
    if saved_sha is None:
        log.warning("%s does not record which index files it was trained on; cannot check the data", name)
    for split, sha in (saved_sha or {}).items():
        if data.index_sha256.get(split) != sha:
            problems.append(f"{index_file(cfg.data.data_path, cfg.data.category, split)} is not the file it was "
                            f"trained on (sha256 {sha[:12]} then, {data.index_sha256.get(split, '-')[:12]} now)")
    saved_args, now = state.get("args") or {}, cfg.to_dict()
    changed = {(g, k): (v, now[g][k]) for g, section in saved_args.items() if g in now and isinstance(section, dict)
               for k, v in section.items() if k in now[g] and _differs(v, now[g][k])}
    problems += [f"{g}.{k} was {a!r}, now {b!r}" for (g, k), (a, b) in sorted(changed.items())
                 if (g, k) in RESUME_FIXED]
    if "global_step" in state and state["global_step"] != (state["epoch"] + 1) * data.steps_per_epoch:
        problems.append(f"it made {state['global_step'] // (state['epoch'] + 1)} optimizer steps per epoch, this run "
                        f"makes {data.steps_per_epoch} (batch size, processes, update_freq or max_steps_per_epoch "
                        "changed), so the lr schedule and the data order would not continue")
    if cfg.runtime.enable_deepspeed:
        problems += _deepspeed_problems(state, precision, cfg.runtime.zero_stage, world_size)
    if problems:
        raise TrainError(f"--auto_resume: {cfg.output_dir / name} cannot continue this run: " + "; ".join(problems)
                         + ". Resume with the run's data and settings, or start a new run in another --output_dir")
    soft = [f"{g}.{k} {a!r} -> {b!r}" for (g, k), (a, b) in sorted(changed.items())
            if (g, k) not in RESUME_FIXED | RESUME_FREE]
    if soft:
        log.warning("auto_resume: settings changed since %s, they apply from epoch %d on: %s", name, epoch + 1,
                    ", ".join(soft))


def _deepspeed_problems(state: dict[str, Any], precision: str, zero_stage: int, world_size: int) -> list[str]:
    """How this run differs from a DeepSpeed checkpoint in what DeepSpeed cannot convert on load: the precision
    (the optimizer wrapper and its state differ), the ZeRO stage and, with ZeRO, the number of processes (the
    optimizer state is split into one file per process)."""
    saved = state.get("ds_config")
    if not isinstance(saved, dict):
        log.warning("the checkpoint does not record its DeepSpeed config; cannot check precision and ZeRO stage")
        return []
    then_precision, then_stage = deepspeed_precision(saved), int((saved.get("zero_optimization") or {}).get("stage", 0))
    problems = []
    if then_precision != precision:
        problems.append(f"it was trained in {then_precision} (DeepSpeed), this run trains in {precision} (set "
                        f"--precision {then_precision})")
    if then_stage != zero_stage:
        problems.append(f"it was trained with --zero_stage {then_stage}, this run has --zero_stage {zero_stage}")
    then_world = state.get("dp_world_size")
    if then_stage > 0 and then_world is not None and then_world != world_size:
        problems.append(f"it was trained by {then_world} process(es) with ZeRO stage {then_stage} (optimizer state "
                        f"split per process), this run has {world_size}")
    return problems


def _differs(a: Any, b: Any) -> bool:
    # a checkpoint stores tuples as lists
    return (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b)


def resume(cfg: TrainConfig, trainer: Trainer, epoch: int) -> dict[str, Any]:
    """Load checkpoint ``epoch`` of ``output_dir`` into the trainer; returns its other entries (client state).

    The optimizer keeps this run's per-group settings (lr scale, weight decay, betas, eps): loading its state would
    bring back the checkpoint's, so changed flags would not apply as :func:`check_resume` says they do.
    """
    out = cfg.output_dir
    log.info("auto_resume: continuing from %s", out / _tag(epoch))
    optimizer = trainer.updater.optimizer
    settings = group_settings(optimizer)
    if cfg.runtime.enable_deepspeed:
        _, state = trainer.updater.engine.load_checkpoint(str(out), tag=_tag(epoch))
    else:
        state = load_checkpoint_file(checkpoint_path(out, epoch, deepspeed=False))
        trainer.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if trainer.scaler is not None and state.get("scaler") is not None:
            trainer.scaler.load_state_dict(state["scaler"])
    restore_group_settings(optimizer, settings)
    return state


# ------------------------------------------------------------------------------------------------------ logging
def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``log.txt`` atomically (a crash never leaves a half line)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """``training_curves.png``: train loss (left) and val metrics (right) per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas without pyplot's global state
    epochs = [r["epoch"] for r in rows]
    ax_loss, ax_val = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    ax_loss.set(title="train loss", xlabel="epoch")
    for key in METRICS:
        ax_val.plot(epochs, [r.get(f"val_{key}", float("nan")) for r in rows], marker="o", label=key)
    ax_val.set(title="validation", xlabel="epoch", ylim=(0, 1))
    ax_val.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def _summary_writer(log_dir: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def _log_epoch(cfg: TrainConfig, stats: dict[str, Any], writer: Any, step: int) -> None:
    """Rewrite log.txt and the plot with ``stats``; add its numbers to TensorBoard at optimizer step ``step``.

    Step, not epoch: a resumed run's writer purges every event from its first step on, which then also drops the
    epoch scalars that a run which crashed after logging an epoch but before saving it had written.
    """
    out = cfg.output_dir
    rows = [r for r in read_log(out / "log.txt") if r["epoch"] < stats["epoch"]] + [stats]
    write_log(out / "log.txt", rows)
    write_plot(out / "training_curves.png", rows)
    for key, value in stats.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(f"epoch/{key}", value, step)
    writer.flush()
    log.info("epoch %d: %s", stats["epoch"], json.dumps(stats))


# ------------------------------------------------------------------------------------------------------ run
def _setup(cfg: TrainConfig, device: torch.device) -> tuple[D.DistInfo, torch.device, bool]:
    """Process group (torchrun or, for DeepSpeed, a world of one) and this rank's device; also whether the group
    should be left at the end (DeepSpeed keeps module-level references to it, so a second DeepSpeed run in the same
    process needs the same group)."""
    keep = False
    if cfg.runtime.enable_deepspeed and not cfg.runtime.eval:
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        D.set_single_process_env()  # no-op under torchrun
        keep = True
    info = D.init_distributed(device_type=device.type)
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    return info, device, keep


def _teardown(keep_group: bool) -> None:
    if not keep_group:
        D.cleanup()


def run(cfg: TrainConfig, on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train one category (see the module docstring); returns ``{"best": ..., "last": ..., "output_dir": ...}``.

    ``on_step(epoch, step)`` is called after every optimizer step (progress reporting, tests).
    """
    check_config(cfg)
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg, device, cfg.runtime.enable_deepspeed)
    warn_ignored_flags(cfg, precision)
    info, device, keep_group = _setup(cfg, device)
    try:
        return _train(cfg, info, device, precision, on_step)
    finally:
        _teardown(keep_group)


@dataclass
class Progress:
    """Where a run stands: restored from a checkpoint on resume, advanced after every epoch."""

    start_epoch: int = 0
    global_step: int = 0  # optimizer steps done
    best: dict[str, Any] | None = None  # {"epoch", official_map10, ...} of the best validation so far


def _restore(cfg: TrainConfig, trainer: Trainer, resume_epoch: int | None) -> Progress:
    if resume_epoch is None:
        return Progress()
    state = resume(cfg, trainer, resume_epoch)
    set_rng_state(state["rng"])
    return Progress(state["epoch"] + 1, state["global_step"], state["best"])


def _train(cfg: TrainConfig, info: D.DistInfo, device: torch.device, precision: str,
           on_step: StepCallback | None) -> dict:
    resume_epoch = check_output_dir(cfg)
    vocab_rows = get_config(cfg.model.model, vocab_size=cfg.model.vocab_size).vocab_size
    data = build_data(cfg, info, vocab_rows, pin_memory=device.type == "cuda")
    if resume_epoch is not None:  # before the model is built: a refusal comes at once
        check_resume(cfg, data, resume_epoch, precision, info.world_size)
        log.info("auto_resume: the start weights%s are not loaded, %s replaces them",
                 f" (--finetune {cfg.model.finetune})" if cfg.model.finetune else "", _tag(resume_epoch))
    torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank and in every attempt
    model = build_model(cfg, start_weights=resume_epoch is None)
    trainer = build_optimizer(cfg, model, info, device, precision)
    progress = _restore(cfg, trainer, resume_epoch)
    o = cfg.optim
    # one lr per optimizer step of the whole run, also when resuming part-way
    schedule = cosine_scheduler(o.lr, o.min_lr, o.epochs, data.steps_per_epoch, o.warmup_epochs)
    # TensorBoard drops what a crashed attempt logged after the step this run starts from: the checkpoint's step,
    # or 0 for an --auto_resume run that crashed before its first checkpoint (it starts over as the same run).
    purge = progress.global_step if resume_epoch is not None else (0 if cfg.runtime.auto_resume else None)
    writer = _start_run_dir(cfg, trainer, info, precision, data.steps_per_epoch, purge)
    last: dict[str, Any] = {}
    try:
        for epoch in range(progress.start_epoch, o.epochs):
            last = _epoch(cfg, trainer, data, schedule, epoch, progress.global_step, device, writer, on_step, info)
            progress.global_step += data.steps_per_epoch
            _save_epoch(cfg, trainer, info, data.index_sha256, epoch, last, progress)
    finally:
        if writer is not None:
            writer.close()
    return {"best": progress.best, "last": last, "output_dir": str(cfg.output_dir)}


def _save_epoch(cfg: TrainConfig, trainer: Trainer, info: D.DistInfo, data_sha: dict[str, str], epoch: int,
                stats: dict[str, Any], progress: Progress) -> None:
    """The best checkpoint (+ best.json) when validation improved, then this epoch's checkpoint; prune old ones."""
    out, ds = cfg.output_dir, cfg.runtime.enable_deepspeed
    if progress.best is None or stats["val_official_map10"] > progress.best["official_map10"]:
        progress.best = {"epoch": epoch, **{k: stats[f"val_{k}"] for k in METRICS}}
        save_checkpoint(trainer, out, _tag("best"), _client_state(cfg, data_sha, epoch, progress))
        if info.rank == 0:
            write_json(out / "best.json", {**progress.best, "checkpoint": _tag("best") + ("" if ds else ".pth")},
                       indent=1)
    save_checkpoint(trainer, out, _tag(epoch), _client_state(cfg, data_sha, epoch, progress))
    prune_checkpoints(out, ds, epoch, cfg.runtime.save_ckpt_freq)


def _client_state(cfg: TrainConfig, index_sha256: dict[str, str], epoch: int, progress: Progress) -> dict[str, Any]:
    return {"epoch": epoch, "global_step": progress.global_step, "args": cfg.to_dict(), "rng": rng_state(),
            "best": progress.best, "index_sha256": index_sha256}


def _start_run_dir(cfg: TrainConfig, trainer: Trainer, info: D.DistInfo, precision: str, steps: int,
                   purge_step: int | None):
    """Write args.json (+ deepspeed_config.json) and open TensorBoard on rank 0; None elsewhere.

    ``purge_step`` is None for a new run (not ``--auto_resume``): its events are warned about if they would land
    beside an earlier run's.
    """
    if info.rank != 0:
        return None
    out = cfg.output_dir
    earlier = sorted(cfg.log_dir.glob("events.out.tfevents.*")) if purge_step is None else []
    if earlier:
        log.warning("%s already holds %d TensorBoard event file(s) of an earlier run; this new run's scalars go "
                    "beside them and TensorBoard will show both as one run: pass another --log_dir (the default "
                    "is <output_dir>/tb) or move the old files away", cfg.log_dir, len(earlier))
    resolved = {"precision": precision, "world_size": info.world_size, "input_size": cfg_input_size(cfg),
                "train_crop": cfg.train_crop, "eval_pad": cfg.eval_pad, "eval_batch_size": cfg.eval_batch_size,
                "steps_per_epoch": steps, "output_dir": str(out), "log_dir": str(cfg.log_dir)}
    write_json(out / "args.json", {**cfg.to_dict(), "resolved": resolved}, indent=1)
    if trainer.ds_config is not None:
        write_json(out / "deepspeed_config.json", trainer.ds_config, indent=1)
    return _summary_writer(cfg.log_dir, purge_step)


def _epoch(cfg: TrainConfig, trainer: Trainer, data: TrainData, schedule: np.ndarray, epoch: int, global_step: int,
           device: torch.device, writer: Any, on_step: StepCallback | None, info: D.DistInfo) -> dict[str, Any]:
    """Train and validate one epoch; log it on rank 0; the epoch's stats."""
    data.sampler.set_epoch(epoch)
    seed_epoch(cfg.runtime.seed, epoch, info.rank)
    trainer.model.train()
    train_stats = train_one_epoch(
        trainer.updater, data.loader, schedule, epoch=epoch, start_step=global_step, steps=data.steps_per_epoch,
        update_freq=cfg.optim.update_freq, device=device, dedup=cfg.data.dedup,
        logit_scale=lambda: trainer.model.logit_scale.item(), writer=writer, on_step=on_step)
    val = evaluate(trainer.model, data.val_split, data.val_images, batch_size=cfg.eval_batch_size,
                   max_len=cfg.data.num_max_bpe_tokens, device=device, precision=trainer.eval_precision,
                   input_dtype=trainer.updater.input_dtype, num_workers=data.num_workers)
    stats = {"epoch": epoch, **train_stats, **{f"val_{k}": v for k, v in val.items()}}
    if writer is not None:
        _log_epoch(cfg, stats, writer, global_step + data.steps_per_epoch - 1)
    return stats


def run_eval(cfg: TrainConfig) -> dict[str, float]:
    """``--eval``: the val metrics of ``--finetune`` (or the run's best checkpoint); writes nothing."""
    check_config(cfg)
    device = resolve_device(cfg.runtime.device)
    precision = resolve_precision(cfg, device, deepspeed=False)
    info, device, keep_group = _setup(cfg, device)
    try:
        path = cfg.model.finetune or _best_checkpoint(cfg.output_dir)
        model = build_model(cfg, finetune=path).to(device)
        d = cfg.data
        rows = read_index(index_file(d.data_path, d.category, "val"))
        check_token_ids(rows, model.cfg.vocab_size, index_file(d.data_path, d.category, "val"))
        split = EvalSplit.from_rows(rows)
        images = ImageDataset(split.image_paths, d.data_path, eval_transform(cfg_input_size(cfg), cfg.eval_pad))
        workers = d.num_workers if d.num_workers is not None else default_workers(info.world_size)
        return evaluate(model, split, images, batch_size=cfg.eval_batch_size, max_len=d.num_max_bpe_tokens,
                        device=device, precision=precision, num_workers=workers)
    finally:
        _teardown(keep_group)


def _best_checkpoint(output_dir: Path) -> str:
    for candidate in (output_dir / "checkpoint-best.pth", output_dir / "checkpoint-best"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"--eval needs --finetune or a best checkpoint in {output_dir} (none found)")
