"""The official BEiT-3 retrieval model, assembled from torchscale 0.3.0, as an independent test oracle.

torchscale holds the official backbone; the retrieval wrapper (two bias-free heads and a scalar logit_scale under
the official names) is rebuilt here from beit3.md, so that the official state dict can be produced and saved in
every official wrapping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchscale.architecture.config import EncoderConfig
from torchscale.model.BEiT3 import BEiT3

OFFICIAL = {  # name -> (D, layers, heads, img)
    "beit3_base_patch16_224": (768, 12, 12, 224),
    "beit3_base_patch16_384": (768, 12, 12, 384),
    "beit3_large_patch16_224": (1024, 24, 16, 224),
    "beit3_large_patch16_384": (1024, 24, 16, 384),
}


def encoder_config(dim: int, layers: int, heads: int, img: int, vocab: int = 64010, patch: int = 16,
                   drop_path: float = 0.0, checkpoint_activations: bool = False, max_pos: int = 1024) -> EncoderConfig:
    """The config the official `_get_base_config` / `_get_large_config` pass to torchscale (beit3.md 1.2)."""
    return EncoderConfig(
        img_size=img, patch_size=patch, vocab_size=vocab, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, drop_path_rate=drop_path, encoder_embed_dim=dim,
        encoder_attention_heads=heads, encoder_ffn_embed_dim=dim * 4, encoder_layers=layers,
        checkpoint_activations=checkpoint_activations, max_source_positions=max_pos,
    )


def randomize_(model: nn.Module, dim: int) -> nn.Module:
    """Random values in every parameter (LayerNorm weights around 1), so that no LN, bias or logit_scale is left at
    a symmetric init that would hide a mistake."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == dim else 0.0))
    return model


class OfficialRetrieval(nn.Module):
    """BEiT3ForRetrieval's tensors and feature path: beit3 -> CLS -> head -> L2 normalise."""

    def __init__(self, args: EncoderConfig) -> None:
        super().__init__()
        dim = args.encoder_embed_dim
        self.beit3 = BEiT3(args)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=None, visual_tokens=images)["encoder_out"]
        return F.normalize(self.vision_head(x[:, 0, :]), dim=-1)

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.beit3(textual_tokens=tokens, visual_tokens=None, text_padding_position=padding_mask)["encoder_out"]
        return F.normalize(self.language_head(x[:, 0, :]), dim=-1)
