"""The DINOv2 backbone: a plain timm ``VisionTransformer`` plus the trainer-side mask token.

The exported encoder must be an ordinary timm model, so the backbone is always built by
``timm.create_model(*timm_create_kwargs(cfg))`` and nothing of the training machinery (mask token, heads) lives
inside it. ``MaskedViT`` wraps it for training: it replaces masked patch embeddings by a learned token before the
position embedding (iBOT) and returns CLS / register / patch tokens after the final norm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import DropPath
from timm.models import VisionTransformer, checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from tiling.configio import ConfigError

log = logging.getLogger(__name__)

# name -> (embed_dim, depth, num_heads, default ffn); sizes as facebookresearch/dinov2 and timm's *_dinov2 models.
ARCHS: dict[str, tuple[int, int, int, str]] = {
    "vit_tiny": (192, 12, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant": (1536, 40, 24, "swiglu"),
}
# timm registers dinov2 models for these families only; the others borrow one whose FFN matches (the explicit
# embed_dim/depth/num_heads kwargs override its sizes, so the model is still fully described).
_TIMM_FAMILY = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant": "vit_giant"}
_FFN_DONOR = {"mlp": "vit_small", "swiglu": "vit_giant"}


def swiglu_hidden_features(embed_dim: int) -> int:
    """DINOv2's SwiGLU hidden width: 2/3 of 4*D rounded up to a multiple of 8 (4,096 for ViT-g's D=1,536)."""
    return (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class BackboneConfig:
    """Shape and regularisation of the ViT backbone.

    Attributes:
        arch: "vit_tiny" | "vit_small" | "vit_base" | "vit_large" | "vit_giant" | "custom" (then embed_dim, depth
            and num_heads are required; for named archs they must be left None).
        patch_size: patch side in pixels; 14 as DINOv2 (16 allowed).
        img_size: global crop side in pixels (224); the position embedding is learned at this grid and resampled
            for other crop sizes (local crops, inference at other sizes).
        num_register_tokens: register tokens (4, "reg4"); 0 gives the plain dinov2 layout.
        layerscale_init: LayerScale initial value (1e-5); None disables LayerScale.
        drop_path_rate: stochastic-depth rate, the same for every block (DINOv2 "drop_path_uniform"); 0.3 as the
            DINOv2 default config (0.4 for L/g). Training-only: not part of the timm kwargs. Above 0.1 each residual
            branch runs only on a random subset of int(B * (1 - rate)) samples and is added back scaled by
            B / subset (dinov2's ``drop_add_residual_stochastic_depth``): the same expected update as per-sample
            drop path, at (1 - rate) of the branch compute; at 0.1 or below, per-sample drop path (timm DropPath).
        ffn: "mlp" (GELU MLP, ratio mlp_ratio) or "swiglu" (timm SwiGLUPacked with DINOv2's hidden width);
            "auto" resolves to swiglu for vit_giant, mlp otherwise.
        mlp_ratio: MLP hidden width / embed_dim for ffn="mlp" (4.0).
        qkv_bias: bias on the qkv projection (True, as DINOv2).
        embed_dim, depth, num_heads: only for arch="custom".
    """

    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224
    num_register_tokens: int = 4
    layerscale_init: float | None = 1e-5
    drop_path_rate: float = 0.3
    ffn: str = "auto"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        sizes = (self.embed_dim, self.depth, self.num_heads)
        if self.arch == "custom":
            if any(s is None for s in sizes):
                raise ConfigError("BackboneConfig: arch='custom' needs embed_dim, depth and num_heads")
        elif self.arch in ARCHS:
            if any(s is not None for s in sizes):
                raise ConfigError(
                    f"BackboneConfig: embed_dim/depth/num_heads are fixed by arch={self.arch!r}; "
                    "use arch='custom' to set them"
                )
        else:
            raise ConfigError(f"BackboneConfig.arch={self.arch!r}: expected one of {[*ARCHS, 'custom']}")
        if self.ffn == "auto":
            object.__setattr__(self, "ffn", ARCHS[self.arch][3] if self.arch in ARCHS else "mlp")
        if self.ffn not in ("mlp", "swiglu"):
            raise ConfigError(f"BackboneConfig.ffn={self.ffn!r}: expected 'mlp', 'swiglu' or 'auto'")
        if self.patch_size not in (14, 16):
            raise ConfigError(f"BackboneConfig.patch_size={self.patch_size}: expected 14 (DINOv2) or 16")
        if self.img_size <= 0 or self.img_size % self.patch_size:
            raise ConfigError(
                f"BackboneConfig.img_size={self.img_size} must be a positive multiple of patch_size="
                f"{self.patch_size} (e.g. 224 for patch 14)"
            )
        if self.embed_dim_ % self.num_heads_:
            raise ConfigError(
                f"BackboneConfig: embed_dim={self.embed_dim_} not divisible by num_heads={self.num_heads_}"
            )
        if min(self.embed_dim_, self.depth_, self.num_heads_) <= 0:
            raise ConfigError("BackboneConfig: embed_dim, depth and num_heads must be positive")
        if self.num_register_tokens < 0:
            raise ConfigError(f"BackboneConfig.num_register_tokens={self.num_register_tokens} must be >= 0")
        if self.layerscale_init is not None and self.layerscale_init <= 0:
            raise ConfigError(f"BackboneConfig.layerscale_init={self.layerscale_init}: use a positive value or None")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"BackboneConfig.drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"BackboneConfig.mlp_ratio={self.mlp_ratio} must be positive")

    @property
    def embed_dim_(self) -> int:
        return self.embed_dim if self.embed_dim is not None else ARCHS[self.arch][0]

    @property
    def depth_(self) -> int:
        return self.depth if self.depth is not None else ARCHS[self.arch][1]

    @property
    def num_heads_(self) -> int:
        return self.num_heads if self.num_heads is not None else ARCHS[self.arch][2]

    @property
    def mlp_hidden_features(self) -> int:
        """Width of the FFN hidden layer (per branch for SwiGLU)."""
        if self.ffn == "swiglu":
            return swiglu_hidden_features(self.embed_dim_)
        return int(self.embed_dim_ * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        """Patches per side of a global crop."""
        return self.img_size // self.patch_size

    @property
    def timm_arch(self) -> str:
        """The registered timm model function this config is built with (see ``timm_create_kwargs``)."""
        family = _TIMM_FAMILY.get(self.arch)
        if family is None or ARCHS[family][3] != self.ffn:
            family = _FFN_DONOR[self.ffn]
        return f"{family}_patch14{'_reg4' if self.num_register_tokens else ''}_dinov2"


def timm_create_kwargs(cfg: BackboneConfig) -> tuple[str, dict[str, Any]]:
    """``(arch_name, kwargs)`` such that ``timm.create_model(arch_name, **kwargs)`` builds this backbone.

    The kwargs are JSON-serialisable and state every shape explicitly, so the exported encoder is a plain timm
    model. Drop path is left out (it has no weights and only matters in training; ``build_backbone`` adds it).
    """
    if cfg.ffn == "swiglu":
        # SwiGLUPacked's fc1 holds both branches: int(D * ratio) must equal 2 * hidden exactly, hence the +0.5.
        mlp_ratio = (2 * cfg.mlp_hidden_features + 0.5) / cfg.embed_dim_
    else:
        mlp_ratio = cfg.mlp_ratio
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim_,
        depth=cfg.depth_,
        num_heads=cfg.num_heads_,
        mlp_ratio=mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        # timm.create_model drops None kwargs (the dinov2 family's default 1e-5 would then apply); 0 is its
        # "no LayerScale" (a falsy init_values builds nn.Identity).
        init_values=cfg.layerscale_init if cfg.layerscale_init is not None else 0.0,
        reg_tokens=cfg.num_register_tokens,
        # With registers neither CLS nor registers get a position (timm's conversion of dinov2-reg weights);
        # without, the pos embed has a CLS slot as in dinov2 checkpoints.
        no_embed_class=cfg.num_register_tokens > 0,
        dynamic_img_size=True,
        num_classes=0,
    )
    return cfg.timm_arch, kwargs


def build_backbone(cfg: BackboneConfig) -> VisionTransformer:
    """Build the timm ViT (random init, never downloads) with uniform drop path and SDPA attention."""
    arch, kwargs = timm_create_kwargs(cfg)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    for block in model.blocks:
        # timm's drop_path_rate is a linear ramp; DINOv2 uses the same rate in every block.
        block.drop_path1 = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        if cfg.drop_path_rate > SUBSET_DROP_PATH_ABOVE and type(block) is Block:
            # Same parameters and names: only the training forward differs (skips the dropped samples).
            block.__class__ = SubsetDropPathBlock
    set_fused_attention(model, True)  # F.scaled_dot_product_attention even if TIMM_FUSED_ATTN=0 is set
    return model


# dinov2's threshold: below it, whole-batch subsets would drop too coarsely for small per-process batches.
SUBSET_DROP_PATH_ABOVE = 0.1


def _add_residual_on_subset(x: torch.Tensor, branch, drop_ratio: float) -> torch.Tensor:
    """``x + branch(x)`` where the branch runs on a random int(B * (1 - drop_ratio)) samples only, scaled up by
    B / subset (the other samples keep ``x``): stochastic depth without computing the dropped samples."""
    b = x.shape[0]
    keep = max(int(b * (1 - drop_ratio)), 1)
    idx = torch.randperm(b, device=x.device)[:keep]
    residual = branch(x.index_select(0, idx))
    out = torch.index_add(x.flatten(1), 0, idx, residual.flatten(1).to(x.dtype), alpha=b / keep)
    return out.view_as(x)


class SubsetDropPathBlock(Block):
    """A timm ``Block`` whose training forward applies stochastic depth by running each residual branch on the
    kept samples only (see ``BackboneConfig.drop_path_rate``), at the rate of its ``drop_path1`` / ``drop_path2``
    (timm ``DropPath`` modules, which act only in the plain forward: eval, or an attention mask)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if not self.training or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = _add_residual_on_subset(x, lambda t: self.ls1(self.attn(self.norm1(t))), self.drop_path1.drop_prob)
        return _add_residual_on_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_path2.drop_prob)


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    """Use `F.scaled_dot_product_attention` (True) or timm's plain q·kᵀ-softmax attention (False) in every block.

    A runtime switch only: weights and exported models are unaffected. On CPUs under bf16 autocast the plain path is
    faster (ViT-S/14 DINOv2 step, 2-core Xeon: 1.6-2.0 vs 1.2-1.45 img/s; SDPA's CPU flash-attention backward was
    26% of the step), while in fp32 SDPA is slightly ahead (0.90 vs 0.83 img/s).
    """
    for sub in module.modules():
        if hasattr(sub, "fused_attn") and hasattr(sub, "qkv"):
            sub.fused_attn = enabled


class MaskedViT(nn.Module):
    """Backbone + learned mask token for iBOT; the mask token belongs to the trainer, not the exported encoder.

    ``forward(x, masks)`` returns ``dict(cls=[B, D], registers=[B, R, D], patch=[B, N, D])`` after the final norm,
    where N is the number of patches of ``x`` (any size that is a multiple of the patch size).
    """

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        if not backbone.has_class_token:
            raise ValueError("MaskedViT needs a backbone with a class token")
        self.backbone = backbone
        # Zero init as DINOv2; [1, D] so dinov2 checkpoints' mask_token loads unchanged.
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def num_register_tokens(self) -> int:
        return self.backbone.num_reg_tokens

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode images ``x`` [B, 3, H, W]; ``masks`` [B, N] bool (row-major patches) marks iBOT-masked patches."""
        bb = self.backbone
        tokens = self.embed(x, masks)
        if bb.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint_seq(bb.blocks, tokens)
        else:
            tokens = bb.blocks(tokens)
        tokens = bb.norm(tokens)
        n_prefix = bb.num_prefix_tokens
        return {"cls": tokens[:, 0], "registers": tokens[:, 1:n_prefix], "patch": tokens[:, n_prefix:]}

    def embed(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The first block's input [B, prefix + N, D]: patch embedding, mask token at ``masks``, positions, prefix."""
        bb = self.backbone
        tokens = bb.patch_embed(x)  # [B, h, w, D] with dynamic_img_size, else [B, N, D]
        if masks is not None:
            n_patches = math.prod(tokens.shape[1:-1])
            if masks.dtype != torch.bool or masks.shape != (tokens.shape[0], n_patches):
                raise ValueError(
                    f"MaskedViT: masks must be bool [{tokens.shape[0]}, {n_patches}] for input {tuple(x.shape)}, "
                    f"got {masks.dtype} {tuple(masks.shape)}"
                )
            masked = masks.reshape(tokens.shape[:-1]).unsqueeze(-1)
            # Before the position embedding, so a masked token still knows where it is (iBOT / DINOv2).
            tokens = torch.where(masked, self.mask_token.to(tokens.dtype), tokens)
        # timm has no public way to add position embeddings and prefix tokens to patch tokens we have edited;
        # tests/test_private_apis.py pins this private method's behaviour against forward_features.
        tokens = bb._pos_embed(tokens)
        tokens = bb.patch_drop(tokens)
        return bb.norm_pre(tokens)

    def forward_crops(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        global_masks: torch.Tensor | None = None,
    ) -> dict[str, dict[str, torch.Tensor] | None]:
        """Run global crops (with optional iBOT masks) and local crops as two calls (their lengths differ).

        Returns ``{"global": forward(global_crops, global_masks), "local": forward(local_crops) or None}``; None
        when there are no local crops (``local_crops`` None or with 0 rows).
        """
        out_global = self.forward(global_crops, global_masks)
        out_local = None
        if local_crops is not None and local_crops.shape[0] > 0:
            out_local = self.forward(local_crops)
        return {"global": out_global, "local": out_local}
