"""Nominal FLOP counts for the ViT backbone, the heads and a DINOv2 training step (for MFU figures).

Convention: matrix multiplications only, 2 FLOPs per multiply-add (so a [n, a] x [a, b] matmul is 2nab), attention
included (QK^T and AV: 2 * 2 N^2 D per block); norms, softmax, activations and the loss are ignored (< 1%).
Backward is counted as 2x forward, so a student forward+backward is 3x forward.

Per block with N tokens (patches + CLS + registers), width D, FFN hidden H:
    qkv 6 N D^2 + attention 4 N^2 D + proj 2 N D^2 + FFN (MLP: 4 N D H; SwiGLU: 6 N D H, H per branch)
plus the patch embedding 2 N_patches (3 p^2) D. A last block trimmed to n query tokens (``trim_last_block``,
pathdino/models/query_rows.py) costs keys/values 4 N D^2 + queries 2 n D^2 + attention 4 n N D + proj 2 n D^2 +
FFN on n tokens: the count follows what pathdino computes (the padding of its attention kernel is not counted, so
the figure errs low). The untrimmed count is the same model's full forward, as any other trainer computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathdino.models.backbone import BackboneConfig
from pathdino.models.heads import HeadConfig


def vit_forward_flops(cfg: BackboneConfig, img_size_px: int) -> int:
    """Forward FLOPs of the backbone for one square image of ``img_size_px`` (floor(px / patch) patches a side)."""
    return int(sum(_vit_forward_parts(cfg, img_size_px)))


def _block_flops(cfg: BackboneConfig, n_tokens: float, n_queries: float) -> float:
    """One block's forward FLOPs with keys/values from ``n_tokens`` and queries, output and FFN on ``n_queries``."""
    d, h = cfg.embed_dim_, cfg.mlp_hidden_features
    attention = 4 * n_tokens * d * d + 2 * n_queries * d * d + 4 * n_queries * n_tokens * d + 2 * n_queries * d * d
    return attention + (6 if cfg.ffn == "swiglu" else 4) * n_queries * d * h


def _vit_forward_parts(
    cfg: BackboneConfig, img_size_px: int, last_block_queries: float | None = None
) -> tuple[float, float]:
    """(patch embedding, all blocks) forward FLOPs for one image; the last block's queries limited to
    ``last_block_queries`` tokens if given (None: every token)."""
    grid = img_size_px // cfg.patch_size
    if grid < 1:
        raise ValueError(f"img_size_px={img_size_px} is smaller than one {cfg.patch_size}-px patch")
    n_patches = grid * grid
    n_tokens = n_patches + 1 + cfg.num_register_tokens
    patch_embed = 2 * n_patches * 3 * cfg.patch_size**2 * cfg.embed_dim_
    full = _block_flops(cfg, n_tokens, n_tokens)
    last = full if last_block_queries is None else _block_flops(cfg, n_tokens, min(last_block_queries, n_tokens))
    blocks = (cfg.depth_ - 1) * full + last
    return patch_embed, blocks


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
        return (
            f"{self.total / g:.1f} GFLOPs/img (teacher backbone {self.teacher_backbone / g:.1f}, student "
            f"backbone fwd+bwd {self.student_backbone / g:.1f}, heads {self.heads / g:.1f}; "
            f"{self.masked_tokens_per_image:.1f} masked tokens/img)"
        )


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
    trim_last_block: bool = False,
) -> TrainFlops:
    """Nominal training FLOPs per tile: teacher forward on the global crops (DINO head on CLS, iBOT head on the
    masked positions), student forward+backward on global and local crops (DINO head on every CLS, iBOT head on
    masked tokens). Heads default to ``HeadConfig.for_arch``; the expected masked tokens per tile are
    ``n_global * mask_probability * mask_ratio_mean * patches`` (DINOv2: half the global crops, ratio ~U[0.1, 0.5]).
    ``subset_drop_path``: the student's blocks run on (1 - this) of the samples (subset stochastic depth, see
    ``BackboneConfig.drop_path_rate``), so only that share of their FLOPs is counted: MFU stays what was computed.
    ``trim_last_block``: the last block runs queries for the tokens the objective reads only (every CLS, the
    global crops' masked patches; ``SSLModel(trim_last_block=True)``, pathdino's trainer); False counts the full
    forward of every crop (what another DINOv2 trainer computes for the same model and crops)."""
    dino_head = dino_head or HeadConfig.for_arch(cfg.arch)
    ibot_head = ibot_head or dino_head
    global_px = global_px or cfg.img_size
    masked_per_crop = mask_probability * mask_ratio_mean * (global_px // cfg.patch_size) ** 2
    global_queries = 1 + masked_per_crop if trim_last_block else None
    local_queries = 1 if trim_last_block else None
    embed_g, blocks_g = _vit_forward_parts(cfg, global_px, global_queries)
    keep = 1.0 - subset_drop_path
    fwd_global = embed_g + blocks_g
    student_global = embed_g + keep * blocks_g
    student_local = 0.0
    if n_local:
        embed_l, blocks_l = _vit_forward_parts(cfg, local_px, local_queries)
        student_local = embed_l + keep * blocks_l
    d = cfg.embed_dim_
    masked = n_global * masked_per_crop
    dino_tok, ibot_tok = head_flops_per_token(d, dino_head), head_flops_per_token(d, ibot_head)
    teacher_heads = n_global * dino_tok + masked * ibot_tok
    student_heads = 3 * ((n_global + n_local) * dino_tok + masked * ibot_tok)
    return TrainFlops(
        teacher_backbone=float(n_global * fwd_global),
        student_backbone=float(3 * (n_global * student_global + n_local * student_local)),
        heads=float(teacher_heads + student_heads),
        masked_tokens_per_image=masked,
    )
