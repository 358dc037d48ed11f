"""BEiT-3 for image-text retrieval, written for speed, with the official checkpoint key names.

The network is the "Magneto" multiway transformer of torchscale's ``BEiT3`` as used by the official
``BEiT3ForRetrieval``: pre-LN layers with Sub-LN (a LayerNorm before ``out_proj`` and inside the FFN), and two
experts per sublayer, ``A`` for vision and ``B`` for language. Retrieval runs the encoder twice, on the image alone
(every token through expert A) and on the text alone (expert B), so the towers never attend to each other.

Differences from the official code that do not change the numbers: attention goes through
``F.scaled_dot_product_attention`` (no explicit score matrix), q/k/v are one GEMM, the last layer of
``encode_image`` / ``encode_text`` computes only the first token's output (the only one retrieval reads; its keys
and values still come from every token), the expert choice is an argument instead of a mutable ``split_position``
attribute, activation checkpointing uses ``torch.utils.checkpoint``, optionally (``set_fused_ffn``) the FFN's
GELU + Sub-LN runs as one Triton kernel on the GPU, and compiled layers on the GPU take GELU's normal CDF from a fitted
approximation (within fp32 rounding of erf's; ``compile_layers``' ``fitted_gelu``).
Parameter names and shapes are exactly those of the official state dict (``logit_scale``, ``beit3.*``,
``language_head.weight``, ``vision_head.weight``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from . import gelu, kernels

# Expert routing for a sequence: every token to A (vision), every token to B (language), or the first k tokens
# to A and the rest to B (joint image+text input, k = number of vision tokens).
ALL_VISION = -1
ALL_TEXT = 0
POSITION_OFFSET = 2  # fairseq positions start at 2: rows 0 and 1 of both position tables are never used

# Attention kernel preference (``--sdpa``). "default": PyTorch's own order, which depends on the version and the GPU
# (on an H100 with torch 2.11 it already picks cuDNN's fused attention for the model's image and text shapes).
# "cudnn": cuDNN's fused attention first, for setups whose default picks another kernel. Inputs a backend cannot
# take fall through to the next one; CPU kernels are the same either way.
SDPA_ORDERS: dict[str, list[SDPBackend] | None] = {
    "default": None,
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH],
}
_sdpa_order: list[SDPBackend] | None = None


def set_sdpa(name: str) -> None:
    """Choose the attention kernel preference for this process (see ``SDPA_ORDERS``)."""
    global _sdpa_order
    if name not in SDPA_ORDERS:
        raise ValueError(f"unknown sdpa preference {name!r}; choose one of {', '.join(SDPA_ORDERS)}")
    _sdpa_order = SDPA_ORDERS[name]


def sdpa_preference() -> ContextManager:
    """The chosen kernel preference as a context (nothing to do for "default")."""
    return contextlib.nullcontext() if _sdpa_order is None else sdpa_kernel(_sdpa_order, set_priority=True)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """``F.scaled_dot_product_attention`` under the chosen kernel preference."""
    with sdpa_preference():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# The FFN's GELU + Sub-LN as one Triton kernel on GPU tensors (``--fused_ffn``, see traffic_retrieval.kernels): the
# same numbers as the unfused ops, less memory traffic. CPU tensors take the unfused ops (except under Triton's
# interpreter, which the tests use).
_fused_ffn = False


def set_fused_ffn(enabled: bool) -> None:
    """Use the fused GELU + LayerNorm kernel in the FFN for GPU tensors (this process)."""
    global _fused_ffn
    if enabled and not kernels.available():
        raise ValueError("the fused FFN kernel needs Triton (installed with torch's CUDA builds)")
    _fused_ffn = enabled


@dataclass(frozen=True)
class BEiT3Config:
    """Shape of a BEiT-3 model; the defaults are the official base model at 224 px."""

    img_size: int = 224  # input side in pixels; images must be exactly this size
    patch_size: int = 16  # side of a square patch in pixels
    in_chans: int = 3
    embed_dim: int = 768  # D
    depth: int = 12  # number of encoder layers
    num_heads: int = 12
    mlp_ratio: float = 4.0  # FFN width = D * mlp_ratio
    vocab_size: int = 64010  # text embedding rows (beit3.spm emits 64002 ids; the 8 extra rows are unused)
    max_text_positions: int = 1024  # rows of the text position table
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing from 0 at layer 0 to this at the last
    layernorm_eps: float = 1e-5
    checkpoint_activations: bool = False  # recompute each layer in backward to save memory
    # Init of the position tables when training from scratch: 1.0 is the official (nn.Embedding's N(0, 1)); such
    # large positions swamp the patch and token embeddings of an untrained model, which then sits on a plateau at
    # loss ln(batch) for many epochs. The tiny configs (trained from scratch in the demo and the tests) use 0.02, as
    # ViTs do. Loaded weights replace it.
    pos_init_std: float = 1.0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def ffn_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


class Multiway(nn.Module):
    """Two copies of a module: ``A`` for vision tokens and ``B`` for text tokens (the official ``MultiwayNetwork``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.A = module
        self.B = copy.deepcopy(module)  # re-initialised with everything else by BEiT3Retrieval's init

    def forward(self, x: Tensor, split: int) -> Tensor:
        if split == ALL_VISION:
            return self.A(x)
        if split == ALL_TEXT:
            return self.B(x)
        # joint input: x is [B, L, D]; the first `split` tokens are vision tokens
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with Sub-LN before the output projection and multiway projections."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        # Registration order k, v, q, out_proj, inner_attn_ln gives the official state-dict order.
        self.k_proj = Multiway(nn.Linear(d, d))
        self.v_proj = Multiway(nn.Linear(d, d))
        self.q_proj = Multiway(nn.Linear(d, d))
        self.out_proj = Multiway(nn.Linear(d, d))
        self.inner_attn_ln = Multiway(nn.LayerNorm(d, eps=cfg.layernorm_eps))

    def _qkv(self, x: Tensor, split: int, queries: int | None) -> tuple[Tensor, Tensor, Tensor]:
        if split in (ALL_VISION, ALL_TEXT):
            # One GEMM instead of three: the checkpoint keeps separate q/k/v weights, so they are concatenated on the
            # fly (a few MB per layer, far cheaper than reading the activations three times).
            e = "A" if split == ALL_VISION else "B"
            lin = [getattr(p, e) for p in (self.q_proj, self.k_proj, self.v_proj)]
            if queries is None:
                qkv = F.linear(x, torch.cat([m.weight for m in lin]), torch.cat([m.bias for m in lin]))
                return qkv.chunk(3, dim=-1)
            kv = F.linear(x, torch.cat([m.weight for m in lin[1:]]), torch.cat([m.bias for m in lin[1:]]))
            return (lin[0](x[:, :queries]), *kv.chunk(2, dim=-1))
        if queries is not None:
            raise ValueError("queries needs a single-modality input (split ALL_VISION or ALL_TEXT)")
        return self.q_proj(x, split), self.k_proj(x, split), self.v_proj(x, split)

    def forward(self, x: Tensor, split: int, attn_mask: Tensor | None, queries: int | None = None) -> Tensor:
        """Self-attention output [B, L, D], or for the first ``queries`` tokens only (keys and values: all)."""
        B, L, D = x.shape
        h = self.num_heads
        q, k, v = self._qkv(x, split, queries)
        Lq = q.shape[1]
        q, k, v = (t.reshape(B, -1, h, D // h).transpose(1, 2) for t in (q, k, v))  # [B, h, L, hd]
        # attn_mask: bool [B, 1, 1, L], True where a key takes part (padded keys are excluded). The default scale
        # 1/sqrt(head_dim) equals the official q * head_dim**-0.5 applied after the projection.
        o = attention(q, k, v, attn_mask)  # [B, h, Lq, hd]
        o = o.transpose(1, 2).reshape(B, Lq, D)
        return self.out_proj(self.inner_attn_ln(o, split), split)


def uses_fitted_gelu(fitted_gelu: bool | None, device: torch.device) -> bool:
    """Whether compiled layers with ``compile_layers``' ``fitted_gelu`` take the fitted CDF for tensors on ``device``
    (None, the default: for CUDA tensors)."""
    return device.type == "cuda" if fitted_gelu is None else fitted_gelu


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> Sub-LN over the hidden width -> fc2 (torchscale ``FeedForwardNetwork``)."""

    # Compiled, GELU's normal CDF from the fitted approximation (traffic_retrieval.gelu): True, False, or None for
    # CUDA tensors only. Set by compile_layers.
    fitted_gelu: bool | None = False

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        ln = self.ffn_layernorm
        if _fused_ffn and kernels.supports(h):
            return self.fc2(kernels.gelu_layernorm(h, ln.weight, ln.bias, ln.eps))
        # (eager, the fitted CDF's dozen ops would each be a kernel: only inductor fuses them)
        fitted = torch.compiler.is_compiling() and uses_fitted_gelu(self.fitted_gelu, h.device)
        g = gelu.fitted_gelu(h) if fitted else F.gelu(h)
        return self.fc2(ln(g))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``: drop the branch with probability ``p``, scale the kept ones
    by 1 / (1 - p)).

    The rate lives in a non-persistent buffer, not in a Python float: dynamo specialises on floats, so with timm's
    module every layer (each has its own rate, linear in depth) compiled into its own graph and a 24-layer model with
    drop path 0.2 ran past the recompile limit. As a tensor the rate is a graph input, and one graph serves every
    layer. Not in the state dict, so the key names stay the official ones.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p  # for repr only: forward reads the buffer
        self.register_buffer("keep", torch.tensor(1.0 - p), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module's signature)
        # .half() / .bfloat16() (DeepSpeed converts the whole module) must move the rate, not round it: in bf16 the
        # keep probability of layer 1 of the recipe, 0.99130, becomes 0.99219 (10% fewer drops).
        keep = self.keep
        super()._apply(fn, recurse)
        self.keep = keep.to(self.keep.device)  # where fn moved it, in fp32
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        # drawn and scaled in fp32, also under autocast, then applied in x's dtype
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(self.keep)
        return x * (mask / self.keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config, drop_path: float) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))
        self.ffn = Multiway(FeedForward(cfg))
        self.final_layer_norm = Multiway(nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))
        # One DropPath for both residual branches, as in the official layer (no parameters, so no key changes).
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.checkpoint_activations = cfg.checkpoint_activations

    def forward(self, x: Tensor, split: int, attn_mask: Tensor | None, queries: int | None = None) -> Tensor:
        """[B, L, D] -> [B, L, D], or [B, queries, D]: the first ``queries`` tokens only (they attend to all).

        With activation checkpointing (training), the layer keeps only its inputs and recomputes the rest in the
        backward. The checkpoint is taken here, inside the layer, so that a compiled layer (``compile_layers``)
        compiles it too: inductor then recomputes only what the backward needs, fused into the backward's kernels
        (on the CPU, the tiny model's checkpointed step ran about 15% faster than with the checkpoint around the
        compiled layer; it saves more than the inputs alone, still a fraction of what no checkpointing keeps).
        """
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, split, attn_mask, queries, use_reentrant=False)
        return self._forward(x, split, attn_mask, queries)

    def _forward(self, x: Tensor, split: int, attn_mask: Tensor | None, queries: int | None) -> Tensor:
        h = self.self_attn_layer_norm(x, split)
        if queries is not None:
            x = x[:, :queries]
        x = x + self.drop_path(self.self_attn(h, split, attn_mask, queries))
        x = x + self.drop_path(self.ffn(self.final_layer_norm(x, split), split))
        return x


class PositionTable(nn.Module):
    """A learned absolute position table read from row 2 on (the fairseq offset)."""

    def __init__(self, rows: int, dim: int, init_std: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        nn.init.normal_(self.weight, std=init_std)  # std 1: nn.Embedding's default init, as in torchscale

    def forward(self, length: int) -> Tensor:
        if POSITION_OFFSET + length > self.weight.shape[0]:
            raise ValueError(f"sequence of {length} tokens exceeds the {self.weight.shape[0] - POSITION_OFFSET} positions")
        return self.weight[POSITION_OFFSET : POSITION_OFFSET + length]  # [length, D]


class PositionEmbeddings(nn.Module):
    """Multiway position tables: ``A`` for vision (CLS + patches), ``B`` for text."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.A = PositionTable(cfg.num_patches + 1 + POSITION_OFFSET, cfg.embed_dim, cfg.pos_init_std)
        self.B = PositionTable(cfg.max_text_positions, cfg.embed_dim, cfg.pos_init_std)

    def forward(self, length: int, split: int) -> Tensor:
        if split == ALL_VISION:
            return self.A(length)
        if split == ALL_TEXT:
            return self.B(length)
        return torch.cat([self.A(split), self.B(length - split)], dim=0)  # each segment restarts at row 2


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_positions = PositionEmbeddings(cfg)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace(0, rate, depth)
        self.layers = nn.ModuleList([EncoderLayer(cfg, dpr[i]) for i in range(cfg.depth)])
        self.layer_norm = Multiway(nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))

    def forward(self, x: Tensor, split: int, padding_mask: Tensor | None = None,
                out_tokens: int | None = None) -> Tensor:
        """x: token embeddings [B, L, D]; padding_mask: [B, L], 1/True at padded positions. Returns the final hidden
        states [B, L, D], or [B, out_tokens, D] for the first ``out_tokens`` positions only: retrieval reads the
        first token alone, so the last layer computes its query, FFN and output for that token only (the same
        numbers, about 1/24 less work for large)."""
        # No cast to x's dtype: under autocast the patch embedding is bf16/fp16, and adding the fp32 positions (and
        # the fp32 CLS token) keeps the residual stream in fp32 for every layer, as in the official code (and timm).
        x = x + self.embed_positions(x.shape[1], split)
        attn_mask = None
        if padding_mask is not None:
            pad = padding_mask.bool()
            x = x * (~pad).unsqueeze(-1).to(x.dtype)  # the official code zeroes padded positions
            attn_mask = (~pad)[:, None, None, :]  # [B, 1, 1, L]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, split, attn_mask, out_tokens if i == last else None)
        return self.layer_norm(x, split)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        # mask_token is only used in pretraining, but it is part of the official state dict.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images of {self.img_size}x{self.img_size}, got {tuple(images.shape[-2:])}; "
                "set --input_size to the model's image size"
            )
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, N+1, D], promoted to fp32


class BEiT3(nn.Module):
    """The BEiT-3 backbone (torchscale ``BEiT3``) restricted to what retrieval needs."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward_image(self, images: Tensor, out_tokens: int | None = None) -> Tensor:
        """images [B, 3, H, W] -> final hidden states [B, N+1, D] (expert A), or of the first ``out_tokens``."""
        return self.encoder(self.vision_embed(images), ALL_VISION, out_tokens=out_tokens)

    def forward_text(self, tokens: Tensor, padding_mask: Tensor | None, out_tokens: int | None = None) -> Tensor:
        """tokens, padding_mask [B, L] -> final hidden states [B, L, D] (expert B), or of the first ``out_tokens``."""
        return self.encoder(self.text_embed(tokens), ALL_TEXT, padding_mask, out_tokens)


class BEiT3Retrieval(nn.Module):
    """Dual-encoder retrieval model with the official ``BEiT3ForRetrieval`` state dict.

    ``encode_image`` / ``encode_text`` return L2-normalised features; ``logit_scale`` is the log of the softmax
    temperature's inverse (ln(1/0.07) at init, trained, not clamped, as in the official code). The contrastive loss
    lives in :mod:`traffic_retrieval.loss`.
    """

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.beit3 = BEiT3(cfg)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(_init_weights)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        x = self.vision_head(self.beit3.forward_image(images, out_tokens=1)[:, 0])  # CLS token -> [B, D]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, padding_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        x = self.language_head(self.beit3.forward_text(tokens, padding_mask, out_tokens=1)[:, 0])  # bos -> [B, D]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: Tensor | None = None, tokens: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Encode whichever inputs are given; returns ``(image_features, text_features)``."""
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(tokens, padding_mask) if tokens is not None else None
        return img, txt

    def no_weight_decay(self) -> set[str]:
        """Exact parameter names that the official recipe excludes from weight decay (besides 1-D and biases)."""
        return {"beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token", "logit_scale"}


def _init_weights(m: nn.Module) -> None:
    """The official wrapper's init: every Linear trunc_normal(std .02, cut at +-1 std), LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=m.embedding_dim**-0.5)  # torchscale's text embedding init


# --------------------------------------------------------------------------------------------------------------
# Registry. The official configs (beit3.md section 2) plus small ones for tests and the CPU demo.

_BASE = BEiT3Config(embed_dim=768, depth=12, num_heads=12)
_LARGE = BEiT3Config(embed_dim=1024, depth=24, num_heads=16)
MODEL_CONFIGS: dict[str, BEiT3Config] = {
    "beit3_base_patch16_224": replace(_BASE, img_size=224),
    "beit3_base_patch16_384": replace(_BASE, img_size=384),
    "beit3_large_patch16_224": replace(_LARGE, img_size=224),
    "beit3_large_patch16_384": replace(_LARGE, img_size=384),
    # Tiny configs: not official; for tests (nano) and the from-scratch CPU demo (tiny).
    "beit3_nano_patch16_32": BEiT3Config(img_size=32, embed_dim=64, depth=2, num_heads=4, vocab_size=1024,
                                         max_text_positions=128, pos_init_std=0.02),
    "beit3_tiny_patch8_64": BEiT3Config(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, vocab_size=1024,
                                        max_text_positions=128, pos_init_std=0.02),
}


# Inductor's multi-kernel: a reduction is generated both persistent and looped and the faster one is picked when it
# first runs. The FFN's sub-LN normalises 4096 features, above the size inductor makes persistent by default, and its
# looped kernel re-reads its input: on an H200 (torch 2.11) the large@384 training step went from 299 to 309 pairs/s
# (image forward 77 -> 70 ms). It only concerns GPU (Triton) kernels.
INDUCTOR_OPTIONS = {"triton.multi_kernel": 1}


def inductor_options(options: dict | None = None) -> dict:
    """:data:`INDUCTOR_OPTIONS` updated by ``options`` (inductor config keys): what the project compiles with."""
    options = {**INDUCTOR_OPTIONS, **(options or {})}
    if options.get("triton.multi_kernel"):
        # torch 2.11 fails to load a multi-kernel from inductor's FX graph cache ("'NoneType' object does not support
        # the context manager protocol" when it looks up the kernel picked before): every run after the first on a
        # machine would crash. Without that lookup each process picks again, timing the variants on their first run.
        os.environ.setdefault("TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE", "1")
    return options


def compile_layers(model: BEiT3Retrieval, backend: str = "inductor", options: dict | None = None,
                   fitted_gelu: bool | None = None) -> BEiT3Retrieval:
    """``torch.compile`` each encoder layer in place (parameter names, hence checkpoints, stay the same).

    One layer's code runs in up to a dozen variants (image / text, all tokens / first token in the last layer,
    with / without grad, static / dynamic text length), more than dynamo's default of 8 compiled versions per
    function, after which it would silently fall back to eager: the limit is raised. With inductor, the layers are
    compiled with :func:`inductor_options` of ``options``. ``fitted_gelu``: the FFN's GELU takes its normal CDF from
    :mod:`traffic_retrieval.gelu` instead of erf (the same numbers within fp32 rounding, fewer GPU instructions;
    with the inductor option that keeps its backward recomputing GELU instead of storing it); None, the default:
    for CUDA tensors (on an H100 the large@384 training step went from 288-289 to 303.5-309.3 pairs/s), erf on the
    CPU (not measured there).
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    if backend == "inductor":
        options = inductor_options({**(gelu.INDUCTOR_OPTIONS if fitted_gelu is not False else {}),
                                    **(options or {})})
    for layer in model.beit3.encoder.layers:
        for ffn in (layer.ffn.A, layer.ffn.B):
            ffn.fitted_gelu = fitted_gelu
        layer.compile(backend=backend, options=options)
    return model


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def canonical_model_name(name: str) -> str:
    """``name`` without the official ``_retrieval`` suffix (an argparse ``type``: the official command lines say
    ``--model beit3_large_patch16_384_retrieval``)."""
    return name.removesuffix("_retrieval")


def get_config(name: str, **overrides) -> BEiT3Config:
    """Config of a registered model; ``name`` may carry the official ``_retrieval`` suffix. ``overrides`` replace
    fields (e.g. ``img_size``, ``drop_path_rate``, ``checkpoint_activations``)."""
    key = canonical_model_name(name)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    unknown = set(overrides) - set(asdict(MODEL_CONFIGS[key]))
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return replace(MODEL_CONFIGS[key], **{k: v for k, v in overrides.items() if v is not None})


def create_model(name: str, **overrides) -> BEiT3Retrieval:
    """Build a registered model with random weights (load weights with :func:`traffic_retrieval.checkpoint.load_weights`)."""
    return BEiT3Retrieval(get_config(name, **overrides))

