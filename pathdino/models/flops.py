"""Nominal FLOP counts for the ViT backbone, the heads and a DINOv2 training step (for MFU figures).

Convention: matrix multiplications only, 2 FLOPs per multiply-add (so a [n, a] x [a, b] matmul is 2nab), attention
included (QK^T and AV: 2 * 2 N^2 D per block); norms, softmax, activations and the loss are ignored (< 1%).
Backward is counted as 2x forward, so a student forward+backward is 3x forward.

Per block with N tokens (patches + CLS + registers), width D, FFN hidden H:
    qkv 6 N D^2 + attention 4 N^2 D + proj 2 N D^2 + FFN (MLP: 4 N D H; SwiGLU: 6 N D H, H per branch)
plus the patch embedding 2 N_patches (3 p^2) D.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathdino.models.backbone import BackboneConfig
from pathdino.models.heads import HeadConfig


def vit_forward_flops(cfg: BackboneConfig, img_size_px: int) -> int:
    """Forward FLOPs of the backbone for one square image of ``img_size_px`` (floor(px / patch) patches a side)."""
    return sum(_vit_forward_parts(cfg, img_size_px))


def _vit_forward_parts(cfg: BackboneConfig, img_size_px: int) -> tuple[int, int]:
    """(patch embedding, all blocks) forward FLOPs for one image."""
    grid = img_size_px // cfg.patch_size
    if grid < 1:
        raise ValueError(f"img_size_px={img_size_px} is smaller than one {cfg.patch_size}-px patch")
    n_patches = grid * grid
    n_tokens = n_patches + 1 + cfg.num_register_tokens
    d, h = cfg.embed_dim_, cfg.mlp_hidden_features
    patch_embed = 2 * n_patches * 3 * cfg.patch_size**2 * d
    attention = 6 * n_tokens * d * d + 4 * n_tokens * n_tokens * d + 2 * n_tokens * d * d
    ffn = (6 if cfg.ffn == "swiglu" else 4) * n_tokens * d * h
    return patch_embed, cfg.depth_ * (attention + ffn)


def head_flops_per_token(in_dim: int, cfg: HeadConfig) -> int:
    """Forward FLOPs of a ``DINOHead`` for one token (MLP + prototype layer)."""
    dims = [in_dim] + [cfg.hidden_dim] * (cfg.n_layers - 1) + [cfg.bottleneck_dim]
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return mlp + 2 * cfg.bottleneck_dim * cfg.n_prototypes


@dataclass(frozen=True)
class TrainFlops:
    """FLOPs per tile (image) of one DINOv2 training step, split by where they are spent."""

    teacher_backbone: float
    student_backbone: float
    heads: float
    masked_tokens_per_image: float

    @property
    def total(self) -> float:
        return self.teacher_backbone + self.student_backbone + self.heads

    def summary(self) -> str:
        g = 1e9
        return (f"{self.total / g:.1f} GFLOPs/img (teacher backbone {self.teacher_backbone / g:.1f}, student "
                f"backbone fwd+bwd {self.student_backbone / g:.1f}, heads {self.heads / g:.1f}; "
                f"{self.masked_tokens_per_image:.1f} masked tokens/img)")


def dinov2_train_flops_per_image(
    cfg: BackboneConfig,
    dino_head: HeadConfig | None = None,
    ibot_head: HeadConfig | None = None,
    global_px: int | None = None,
    local_px: int = 98,
    n_global: int = 2,
    n_local: int = 8,
    mask_probability: float = 0.5,
    mask_ratio_mean: float = 0.3,
    subset_drop_path: float = 0.0,
) -> TrainFlops:
    """Nominal training FLOPs per tile: teacher forward on the global crops (DINO head on CLS, iBOT head on the
    masked positions), student forward+backward on global and local crops (DINO head on every CLS, iBOT head on
    masked tokens). Heads default to ``HeadConfig.for_arch``; the expected masked tokens per tile are
    ``n_global * mask_probability * mask_ratio_mean * patches`` (DINOv2: half the global crops, ratio ~U[0.1, 0.5]).
    ``subset_drop_path``: the student's blocks run on (1 - this) of the samples (subset stochastic depth, see
    ``BackboneConfig.drop_path_rate``), so only that share of their FLOPs is counted: MFU stays what was computed."""
    dino_head = dino_head or HeadConfig.for_arch(cfg.arch)
    ibot_head = ibot_head or dino_head
    global_px = global_px or cfg.img_size
    fwd_global = vit_forward_flops(cfg, global_px)
    keep = 1.0 - subset_drop_path
    student_global = _vit_forward_parts(cfg, global_px)[0] + keep * _vit_forward_parts(cfg, global_px)[1]
    student_local = (_vit_forward_parts(cfg, local_px)[0] + keep * _vit_forward_parts(cfg, local_px)[1]
                     if n_local else 0)
    d = cfg.embed_dim_
    masked = n_global * mask_probability * mask_ratio_mean * (global_px // cfg.patch_size) ** 2
    dino_tok, ibot_tok = head_flops_per_token(d, dino_head), head_flops_per_token(d, ibot_head)
    teacher_heads = n_global * dino_tok + masked * ibot_tok
    student_heads = 3 * ((n_global + n_local) * dino_tok + masked * ibot_tok)
    return TrainFlops(
        teacher_backbone=float(n_global * fwd_global),
        student_backbone=float(3 * (n_global * student_global + n_local * student_local)),
        heads=float(teacher_heads + student_heads),
        masked_tokens_per_image=masked,
    )
