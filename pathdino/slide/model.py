"""The slide encoder: a LongNet transformer over one slide's tile embeddings (and packed batches of slides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pathdino.slide.attention import DEFAULT_SCORE_BUDGET, DilatedAttention, PackedLayout, pack_layout
from pathdino.slide.config import SlideEncoderConfig
from pathdino.slide.positions import PositionError, row_major_order, sincos_2d


@dataclass(frozen=True)
class SlideEncoderOutput:
    cls: Tensor  # [B, D]: each slide's CLS token after the final norm
    tiles: Tensor  # [N_total, D]: contextualised tile embeddings after the final norm, in the caller's tile order


class SlideBlock(nn.Module):
    """Pre-norm transformer block: x + DilatedAttention(LN(x)), x + MLP(LN(x)), for tiles and CLS together."""

    def __init__(
        self,
        cfg: SlideEncoderConfig,
        *,
        drop_path: float = 0.0,
        score_budget: int = DEFAULT_SCORE_BUDGET,
        attention_backend: str = "torch",
    ):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = DilatedAttention(
            dim,
            num_heads=cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            proj_drop=cfg.dropout,
            score_budget=score_budget,
            backend=attention_backend,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * cfg.mlp_ratio), drop=cfg.dropout)

    def forward(self, tiles: Tensor, cls: Tensor, layout: PackedLayout) -> tuple[Tensor, Tensor]:
        n_tiles = tiles.shape[0]
        attn_tiles, attn_cls = self.attn(self.norm1(tiles), self.norm1(cls), layout)
        x = torch.cat([tiles, cls]) + self.drop_path(torch.cat([attn_tiles, attn_cls]))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x[:n_tiles], x[n_tiles:]


class SlideEncoder(nn.Module):
    """LongNet slide encoder: tile embeddings [N_total, in_dim] of B packed slides -> CLS [B, D], tiles [N_total, D].

    Linear projection of the tile embeddings, plus a 2D sin-cos embedding of each tile's (col, row) on its slide's
    tile grid; a learned CLS token per slide (no position); ``depth`` pre-norm blocks of dilated attention
    (pathdino.slide.attention); a final LayerNorm. Tiles may come in any order: each slide's tiles are sorted to
    row-major grid order inside (the order LongNet's segments cut) and the outputs are returned in the input order.
    """

    def __init__(
        self,
        cfg: SlideEncoderConfig,
        *,
        grad_checkpointing: bool = False,
        score_budget: int = DEFAULT_SCORE_BUDGET,
        attention_backend: str = "torch",
    ):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = grad_checkpointing
        self.proj = nn.Linear(cfg.in_dim, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            SlideBlock(cfg, drop_path=rate, score_budget=score_budget, attention_backend=attention_backend)
            for rate in rates
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears, zero biases, unit LayerNorms, CLS ~ N(0, 0.02) (MAE/GigaPath's init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed_tokens(self, tile_embeddings: Tensor, grid_xy: Tensor) -> Tensor:
        """Projected tile embeddings plus their grid positions [N, D] (the blocks' input; also for MAE decoders)."""
        pos = sincos_2d(grid_xy.to(tile_embeddings.device), self.cfg.embed_dim, scale=self.cfg.pos_scale)
        return self.proj(tile_embeddings) + pos.to(self.proj.weight.dtype)

    def forward(
        self, tile_embeddings: Tensor, grid_xy: Tensor, lengths: Sequence[int] | None = None
    ) -> SlideEncoderOutput:
        """Encode B slides packed end to end: ``lengths`` tiles each (None: one slide of all the tiles)."""
        lengths = [tile_embeddings.shape[0]] if lengths is None else [int(n) for n in lengths]
        _check_inputs(tile_embeddings, grid_xy, lengths, in_dim=self.cfg.in_dim)
        order = packed_row_major_order(grid_xy, lengths)
        x = self.embed_tokens(tile_embeddings[order], grid_xy[order])
        layout = pack_layout(
            lengths,
            segment_lengths=self.cfg.segment_lengths,
            dilation_ratios=self.cfg.dilation_ratios,
            num_heads=self.cfg.num_heads,
            device=x.device,
        )
        cls = self.cls_token.to(x.dtype).expand(len(lengths), -1)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, cls = checkpoint(block, x, cls, layout, use_reentrant=False)
            else:
                x, cls = block(x, cls, layout)
        inverse = torch.argsort(order)
        return SlideEncoderOutput(cls=self.norm(cls), tiles=self.norm(x)[inverse])


def packed_row_major_order(grid_xy: Tensor, lengths: Sequence[int]) -> Tensor:
    """The permutation [N_total] that puts each packed slide's tiles in row-major grid order (slides stay apart)."""
    parts, start = [], 0
    for n in lengths:
        parts.append(start + row_major_order(grid_xy[start : start + n]).to(grid_xy.device))
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _check_inputs(tile_embeddings: Tensor, grid_xy: Tensor, lengths: list[int], *, in_dim: int) -> None:
    if tile_embeddings.ndim != 2 or tile_embeddings.shape[1] != in_dim:
        raise PositionError(
            f"tile embeddings must be [N, {in_dim}] (SlideEncoderConfig.in_dim), got "
            f"{tuple(tile_embeddings.shape)}: was the slide encoder built for another tile encoder?"
        )
    if tuple(grid_xy.shape) != (tile_embeddings.shape[0], 2):
        raise PositionError(
            f"grid_xy must be [N, 2] (col, row) for the {tile_embeddings.shape[0]} tiles, got {tuple(grid_xy.shape)}"
        )
    if sum(lengths) != tile_embeddings.shape[0] or any(n < 1 for n in lengths):
        raise PositionError(
            f"lengths {lengths[:8]}{'...' if len(lengths) > 8 else ''} must be >= 1 each and sum "
            f"to the {tile_embeddings.shape[0]} packed tiles"
        )
