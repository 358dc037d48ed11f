"""One training epoch and one validation pass: explicit arguments in, metric dicts out.

The two training modes are explicit objects with the same three methods (``sync_context(boundary)``,
``loss(batch, group_ids, attr_codes)`` and ``update(loss, boundary)``), so the epoch loop does not branch on the mode:

- :class:`PlainUpdater`: a model wrapped for the contrastive forward (:class:`ContrastiveForward`, under DDP when
  distributed), autocast, a GradScaler for fp16, gradient accumulation (DDP ``no_sync`` between boundaries) and
  optional clipping;
- :class:`DeepSpeedUpdater`: a DeepSpeed engine; DeepSpeed itself accumulates, scales and clips.

The lr follows the per-step schedule of the whole run (``lr_schedule[global_step]`` times each group's
``lr_scale``), set before the first micro-batch of each optimizer step, as in the official loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .categories import is_relevant
from .data import EvalSplit, ImageDataset
from .distributed import (
    all_gather_concat,
    broadcast_object,
    get_rank,
    get_world_size,
    is_main_process,
    mean_over_ranks,
    shard,
)
from .encoding import encode_token_batches
from .tokenizer import batch_inputs
from .loss import ContrastiveLoss, attribute_codes_for, group_ids_for
from .metrics import retrieval_metrics
from .optim import apply_lr
from .precision import get_autocast
from .retrieval import topk_similarity

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (epoch, optimizer step within the epoch) -> None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where."""


class ContrastiveForward(nn.Module):
    """``model`` whose forward also returns ``logit_scale``.

    DDP with ``find_unused_parameters`` only counts parameters reachable from the forward's outputs; the loss uses
    ``logit_scale`` outside the model's own forward, so without this wrapper DDP would mark it unused and then
    fail when its gradient arrives.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, tokens: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        img, txt = self.model(images, tokens, padding_mask)
        # A leaf returned as it is has no autograd node for DDP to find; the (free) copy gives it one.
        return img, txt, self.model.logit_scale.clone()


class PlainUpdater:
    """Forward, loss and optimizer updates without DeepSpeed (single process or DDP)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: ContrastiveLoss, *,
                 device: torch.device, precision: str, update_freq: int = 1, clip_grad: float | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.precision, self.update_freq = device, precision, update_freq
        self.clip_grad, self.scaler = clip_grad, scaler
        self.input_dtype: torch.dtype | None = None  # autocast decides

    def sync_context(self, boundary: bool) -> ContextManager:
        """DDP's ``no_sync`` between accumulation boundaries (gradients are all-reduced once per step)."""
        if isinstance(self.model, DistributedDataParallel) and not boundary:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def loss(self, batch: dict[str, Any], group_ids: Tensor | None, attr_codes: Tensor | None = None) -> Tensor:
        with get_autocast(self.precision, self.device):
            img, txt, scale = self.model(batch["images"], batch["tokens"], batch["padding_mask"])
        return self.loss_fn(img, txt, scale, group_ids, attr_codes)

    def update(self, loss: Tensor, boundary: bool) -> None:
        loss = loss / self.update_freq
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if not boundary:
            return
        if self.clip_grad is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedUpdater:
    """Forward, loss and updates through a DeepSpeed engine (which accumulates, scales and clips itself)."""

    def __init__(self, engine: Any, optimizer: Any, loss_fn: ContrastiveLoss) -> None:
        self.engine, self.optimizer, self.loss_fn = engine, optimizer, loss_fn
        # DeepSpeed keeps the module in fp16/bf16: inputs are cast to it (the official loop calls .half()).
        self.input_dtype: torch.dtype | None = next(engine.module.parameters()).dtype

    def sync_context(self, boundary: bool) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces gradients only at the boundary itself

    def loss(self, batch: dict[str, Any], group_ids: Tensor | None, attr_codes: Tensor | None = None) -> Tensor:
        img, txt = self.engine(batch["images"].to(self.input_dtype), batch["tokens"], batch["padding_mask"])
        return self.loss_fn(img, txt, self.engine.module.logit_scale, group_ids, attr_codes)

    def update(self, loss: Tensor, boundary: bool) -> None:
        self.engine.backward(loss)
        self.engine.step()  # steps the optimizer only at the accumulation boundary


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _log_step(writer: Any, global_step: int, loss: float, lr: float, logit_scale: float) -> None:
    writer.add_scalar("train/loss", loss, global_step)
    writer.add_scalar("train/lr", lr, global_step)
    writer.add_scalar("train/logit_scale_exp", math.exp(logit_scale), global_step)


def train_one_epoch(
    updater: PlainUpdater | DeepSpeedUpdater,
    loader: Iterable[dict[str, Any]],
    lr_schedule: Sequence[float],
    *,
    epoch: int,
    start_step: int,
    steps: int,
    update_freq: int,
    device: torch.device,
    dedup: str,
    logit_scale: Callable[[], float],
    writer: Any | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Train ``steps`` optimizer steps (``steps * update_freq`` micro-batches) of one epoch.

    Args:
        updater: the training mode (see the module docstring).
        loader: batches from :func:`traffic_retrieval.data.collate_pairs`; extra batches are not used.
        lr_schedule: the base lr of every optimizer step of the whole run; step ``start_step + i`` uses entry
            ``start_step + i``.
        epoch, start_step: the 0-based epoch and the global step it starts at.
        dedup: the ``--dedup`` mode: unless ``none``, pass group ids (from each batch's ``group_keys``) so identical
            captions/attributes are not negatives; ``relevance`` also passes the attribute codes (relevance targets).
        logit_scale: returns the model's current ``logit_scale`` (logged as exp(scale)).
        writer: a TensorBoard ``SummaryWriter`` (rank 0) for per-step scalars, or None.
        on_step: called after every optimizer step with (epoch, step within the epoch).

    Returns:
        ``{"train_loss": mean loss over ranks and steps, "lr": last base lr, "n_steps", "seconds", "pairs_per_s"}``.

    Raises:
        NonFiniteLossError: ``"loss is nan at epoch E step S"`` (nothing is stepped with that loss).
    """
    total_micro = steps * update_freq
    loss_sum, n_loss, pairs, lr = 0.0, 0, 0, float("nan")
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", disable=not is_main_process(), leave=False)
    try:
        it = iter(loader)
        for micro in range(total_micro):
            step, boundary = micro // update_freq, (micro + 1) % update_freq == 0
            if micro % update_freq == 0:
                lr = float(lr_schedule[start_step + step])
                apply_lr(updater.optimizer, lr)
            batch = _to_device(next(it), device)
            ids = group_ids_for(batch["group_keys"], device) if dedup != "none" else None
            codes = attribute_codes_for(batch["attributes"], device) if dedup == "relevance" else None
            with updater.sync_context(boundary):
                loss = updater.loss(batch, ids, codes)
                value = loss.item()
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"loss is {value} at epoch {epoch} step {step} (global step "
                                             f"{start_step + step}); stopping, nothing of this step is kept")
                updater.update(loss, boundary)
            loss_sum, n_loss, pairs = loss_sum + value, n_loss + 1, pairs + batch["images"].shape[0]
            if boundary:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if writer is not None:
                    _log_step(writer, start_step + step, value, lr, logit_scale())
                if on_step is not None:
                    on_step(epoch, step)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return {
        "train_loss": mean_over_ranks(loss_sum / max(n_loss, 1), device),
        "lr": lr,
        "n_steps": steps,
        "seconds": seconds,
        "pairs_per_s": pairs * get_world_size() / seconds if seconds > 0 else float("nan"),
    }


@torch.no_grad()
def _encode_gallery(model: nn.Module, dataset: ImageDataset, rows: range, *, batch_size: int,
                    device: torch.device, precision: str, input_dtype: torch.dtype | None,
                    num_workers: int) -> Tensor:
    """Features [len(rows), D] (float32, on ``device``) of a contiguous slice of the gallery."""
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats = [torch.empty(0, model.cfg.embed_dim, device=device)]
    for images in tqdm(loader, desc="val images", unit="batch", leave=False, disable=not is_main_process()):
        images = images.to(device, non_blocking=True)
        with get_autocast(precision, device):
            feats.append(model.encode_image(images.to(input_dtype) if input_dtype else images).float())
    return torch.cat(feats)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: EvalSplit,
    dataset: ImageDataset,
    *,
    batch_size: int,
    max_len: int,
    device: torch.device,
    precision: str,
    input_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Text-to-image validation: every caption against every unique image of the split.

    Each rank encodes a contiguous shard of the images and of the queries; the features are gathered, rank 0 ranks
    the top 10 images per query and scores them with the official scorer's mAP@10, the standard mAP@10 and R@1/5/10
    (fractions), relevance by attribute as the official val scorer (:func:`categories.is_relevant`); the metrics
    are then broadcast so every rank returns the same dict.

    Args:
        model: the unwrapped :class:`~traffic_retrieval.modeling.BEiT3Retrieval` (left in eval mode).
        split: queries and gallery (:meth:`EvalSplit.from_rows`).
        dataset: the gallery images through the eval transform, in ``split.image_paths`` order.
        precision: autocast precision (``fp32`` = none; a DeepSpeed module is cast by ``input_dtype`` instead).
        input_dtype: dtype to cast images to (a DeepSpeed fp16/bf16 module), or None.
    """
    model.eval()
    gallery = _encode_gallery(model, dataset, shard(len(dataset)), batch_size=batch_size, device=device,
                              precision=precision, input_dtype=input_dtype, num_workers=num_workers)
    q_rows = shard(len(split.query_segments))
    tokens, mask = batch_inputs([split.query_segments[i] for i in q_rows], max_len)
    queries = encode_token_batches(model, tokens, mask, batch_size=batch_size, device=device, precision=precision)
    gallery, queries = all_gather_concat(gallery).cpu(), all_gather_concat(queries.float()).cpu()
    metrics: dict[str, float] | None = None
    if get_rank() == 0:
        relevant, num_relevant = split.relevance(is_relevant)
        _, top = topk_similarity(queries, gallery, k=min(10, len(gallery)))
        metrics = {**retrieval_metrics(top, relevant, num_relevant=num_relevant),
                   "n_queries": len(queries), "n_images": len(gallery)}
    return broadcast_object(metrics)
