"""The image-text contrastive (ITC) loss of BEiT-3 retrieval, with cross-rank negatives and duplicate-aware targets.

Official semantics (beit3.md section 1.6, ``utils.ClipLoss``): with ``s = exp(logit_scale)``,
``logits_i2t = s * I @ T^T`` and ``logits_t2i = s * T @ I^T``; loss = mean of the two cross entropies against the
diagonal. With more than one rank, the features of every rank are gathered *with* gradients and each rank scores its
own rows against the whole global batch, labels ``arange(B_local) + B_local * rank``.

Many-to-many extension: the challenge data repeats captions thousands of times, so a batch often holds several
pairs whose captions are identical (or share the attribute string). Pushing those apart as negatives is wrong. With
``group_ids`` (equal id = same caption/attribute), the target of each row is spread uniformly over every positive in
the global batch: cross entropy against that distribution. With all ids distinct it is exactly the official loss.

Relevance targets (``--dedup relevance``): with ``attr_codes`` as well, the positives follow the official relevance
rule (:func:`traffic_retrieval.categories.is_relevant`): besides equal attributes, a pedestrian image is a positive
of a pedestrian caption of the same gender whose every attribute the image also has ("a woman with a backpack" for
an image of a woman with a hat and a backpack), which the scorer counts as a hit. The rule is one-directional, so
the text-to-image and image-to-text targets differ (one is the other's transpose).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traffic_retrieval.categories import FEMALE_INDEX, PEDESTRIAN_ATTRIBUTES, parse_pedestrian_code
from traffic_retrieval.distributed import all_gather_concat, all_gather_with_grad, get_rank, get_world_size


def stable_group_id(key: str) -> int:
    """A 63-bit id for a caption or attribute string that is the same in every process and every run.

    Ids must agree across ranks (they are compared after gathering), so neither Python's salted ``hash`` nor a
    per-batch enumeration will do.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def group_ids_for(keys: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """``stable_group_id`` of each key as a LongTensor [B] for :class:`ContrastiveLoss`."""
    return torch.tensor([stable_group_id(k) for k in keys], dtype=torch.long, device=device)


def attribute_codes_for(attributes: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """The 21 pedestrian attribute bits of each attribute string as an int8 tensor [B, 21]; -1 for a row that is
    not a pedestrian code (a vehicle)."""
    none = (-1,) * len(PEDESTRIAN_ATTRIBUTES)
    return torch.tensor([parse_pedestrian_code(a) or none for a in attributes], dtype=torch.int8, device=device)


def relevance_mask(query_ids: Tensor, query_codes: Tensor, image_ids: Tensor, image_codes: Tensor) -> Tensor:
    """``mask[i, j]``: image j is relevant to caption i by the official rule (equal attribute ids, or both pedestrian
    codes of the same gender with every attribute of caption i set in image j). Bool [Bq, Bi]."""
    same = query_ids[:, None] == image_ids[None, :]
    q_ped, im_ped = query_codes[:, 0] >= 0, image_codes[:, 0] >= 0
    gender = query_codes[:, None, FEMALE_INDEX] == image_codes[None, :, FEMALE_INDEX]
    # [Bq, Bi]: how many of the caption's attributes the image lacks (a matmul keeps it [Bq, Bi], not [Bq, Bi, 21])
    lacks = (query_codes == 1).float() @ (image_codes != 1).float().T
    return same | (q_ped[:, None] & im_ped[None, :] & gender & (lacks == 0))


def _soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of CE against a target spread uniformly over each row's positives.

    logits: [B, N]; positives: bool [B, N], at least one True per row. ``masked_fill`` (not multiplication by a
    0/1 target) keeps the result finite when a non-positive log-probability underflows to -inf.
    """
    logp = F.log_softmax(logits, dim=1)
    per_row = logp.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1)
    return -per_row.mean()


class ContrastiveLoss(nn.Module):
    """Symmetric image-text InfoNCE loss.

    Args:
        gather: with more than one rank, score local rows against the features of all ranks (the official
            behaviour); False keeps every rank to its own batch.
        dedup: when ``group_ids`` are given, treat every pair with the same id as a positive instead of a negative
            (and, with ``attr_codes``, every pair the official relevance rule counts as a hit).

    The logits are computed in float32 outside autocast: the matrix is small next to the model, and bf16 would round
    cosine similarities to about 3 digits before they are multiplied by the scale (up to 100).
    """

    def __init__(self, gather: bool = True, dedup: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.dedup = dedup

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        group_ids: Tensor | None = None,
        attr_codes: Tensor | None = None,
    ) -> Tensor:
        """Loss of one (local) batch.

        Args:
            image_features: [B, D] image embeddings (L2-normalised by the model).
            text_features: [B, D] text embeddings; row i is the caption of image i.
            logit_scale: the model's log-scale parameter; the logits are multiplied by ``exp(logit_scale)``.
            group_ids: LongTensor [B]; equal ids mark captions that count as the same (see :func:`group_ids_for`).
                B must be the same on every rank.
            attr_codes: int8 [B, 21] from :func:`attribute_codes_for`, with ``group_ids``: relevance targets.
        """
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image and text features must both be [B, D]; got {tuple(image_features.shape)} and "
                f"{tuple(text_features.shape)}"
            )
        batch = image_features.shape[0]
        if group_ids is not None and (group_ids.dim() != 1 or group_ids.shape[0] != batch):
            raise ValueError(f"group_ids must be [B] = [{batch}]; got {tuple(group_ids.shape)}")
        if attr_codes is not None and (group_ids is None or attr_codes.shape != (batch, len(PEDESTRIAN_ATTRIBUTES))):
            raise ValueError(f"attr_codes must be [B, {len(PEDESTRIAN_ATTRIBUTES)}] = [{batch}, "
                             f"{len(PEDESTRIAN_ATTRIBUTES)}] and come with group_ids; got {tuple(attr_codes.shape)}")

        distributed = self.gather and get_world_size() > 1
        if distributed:
            all_images = all_gather_with_grad(image_features)  # [B_global, D]
            all_texts = all_gather_with_grad(text_features)
            offset = batch * get_rank()
        else:
            all_images, all_texts, offset = image_features, text_features, 0

        with torch.autocast(device_type=image_features.device.type, enabled=False):
            scale = logit_scale.float().exp()
            logits_i2t = scale * image_features.float() @ all_texts.float().T  # [B, B_global]
            logits_t2i = scale * text_features.float() @ all_images.float().T  # [B, B_global]

            if self.dedup and group_ids is not None:
                all_ids = all_gather_concat(group_ids) if distributed else group_ids  # [B_global]
                if attr_codes is None:
                    positives = group_ids[:, None] == all_ids[None, :]  # [B, B_global]; the diagonal is always in
                    # Pairs share an id in both directions, so the same mask serves i2t and t2i.
                    return (_soft_cross_entropy(logits_i2t, positives)
                            + _soft_cross_entropy(logits_t2i, positives)) / 2
                all_codes = all_gather_concat(attr_codes) if distributed else attr_codes
                t2i = relevance_mask(group_ids, attr_codes, all_ids, all_codes)  # local captions x global images
                i2t = relevance_mask(all_ids, all_codes, group_ids, attr_codes).T  # local images x global captions
                return (_soft_cross_entropy(logits_i2t, i2t) + _soft_cross_entropy(logits_t2i, t2i)) / 2

            labels = torch.arange(batch, device=image_features.device) + offset
            return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
