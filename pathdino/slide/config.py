"""The slide encoder's typed config and its presets (every default documented here and in docs/slide.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tiling.configio import ConfigError, check_int, check_prob, fail, freeze_tuples

OWNER = "SlideEncoderConfig"

# GigaPath's slide encoder (prov-gigapath slide_encoder.py, LongNet_12_layers_768_dim): 12 blocks of width 768,
# 16 heads, MLP 3072, dilation ratios 1..16, and segment lengths 2**linspace(10, 20, 5) for slides up to
# 262144 px of 256 px tiles (1024**2 tiles): its get_optimal_segment_length gives these five lengths.
GIGAPATH_SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATION_RATIOS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class SlideEncoderConfig:
    """A LongNet slide encoder over one slide's tile embeddings (docs/slide.md, "The model")."""

    in_dim: int = 768  # width of the tile embeddings it reads (the tile encoder's embed dim)
    embed_dim: int = 256  # transformer width; a multiple of 4 (2D sin-cos positions) and of num_heads
    depth: int = 4  # number of pre-norm blocks
    num_heads: int = 8
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * embed_dim
    # LongNet: branch i splits the row-major token sequence into segments of segment_lengths[i] tokens (a slide
    # shorter than that is one segment) and attends among every dilation_ratios[i]-th token of a segment;
    # head h takes offset h % dilation_ratios[i]. The branches are mixed by their softmax denominators.
    segment_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)
    dilation_ratios: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0  # dropout after the attention and MLP projections
    drop_path: float = 0.0  # stochastic depth, rising linearly to this value in the last block
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pos_scale: float = 1.0  # grid units per position step of the 2D sin-cos embedding (1: one tile)

    def __post_init__(self):
        freeze_tuples(self, ("segment_lengths", "dilation_ratios"))
        for name in ("in_dim", "embed_dim", "depth", "num_heads"):
            check_int(OWNER, name, getattr(self, name), 1)
        if self.embed_dim % 4:
            fail(
                OWNER,
                "embed_dim",
                self.embed_dim,
                "expected a multiple of 4 (2D sin-cos positions: sin and cos of the column and of the row)",
            )
        if self.embed_dim % self.num_heads:
            fail(OWNER, "num_heads", self.num_heads, f"expected a divisor of embed_dim={self.embed_dim}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            fail(OWNER, "mlp_ratio", self.mlp_ratio, "expected a number > 0")
        self._check_branches()
        check_prob(OWNER, "dropout", self.dropout)
        check_prob(OWNER, "drop_path", self.drop_path)
        if isinstance(self.pos_scale, bool) or not isinstance(self.pos_scale, (int, float)) or self.pos_scale <= 0:
            fail(OWNER, "pos_scale", self.pos_scale, "expected a number > 0")
        if not isinstance(self.layer_norm_eps, float) or self.layer_norm_eps <= 0:
            fail(OWNER, "layer_norm_eps", self.layer_norm_eps, "expected a float > 0")

    def _check_branches(self) -> None:
        for name in ("segment_lengths", "dilation_ratios"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple)
                or not value
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
            ):
                fail(OWNER, name, value, "expected a non-empty list of integers >= 1")
        if len(self.segment_lengths) != len(self.dilation_ratios):
            fail(
                OWNER,
                "dilation_ratios",
                self.dilation_ratios,
                f"expected one ratio per segment length ({len(self.segment_lengths)}: {self.segment_lengths})",
            )
        if 1 not in self.dilation_ratios:
            fail(
                OWNER,
                "dilation_ratios",
                self.dilation_ratios,
                "expected a ratio of 1 among them, so that every tile attends to its neighbours in every head",
            )
        for w, r in zip(self.segment_lengths, self.dilation_ratios):
            if w < r:
                fail(
                    OWNER,
                    "segment_lengths",
                    self.segment_lengths,
                    f"expected each segment length >= its dilation ratio (segment {w} < ratio {r})",
                )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


PRESETS: dict[str, dict] = {
    # a CPU-sized encoder: 4 x 256, 8 heads (head dim 32); w/r**2 = 1024 for every branch, so from 64k tiles on,
    # each branch costs the same per tile and time grows linearly with the tile count
    "small": dict(
        embed_dim=256, depth=4, num_heads=8, segment_lengths=(1024, 4096, 16384, 65536), dilation_ratios=(1, 2, 4, 8)
    ),
    # GigaPath's slide encoder architecture (12 x 768, 16 heads, MLP 3072), for tile embeddings of 1536 (its tile
    # encoder's width); GigaPath trained with drop_path 0.1 (dropout 0.25 only when fine-tuning)
    "gigapath": dict(
        in_dim=1536,
        embed_dim=768,
        depth=12,
        num_heads=16,
        mlp_ratio=4.0,
        segment_lengths=GIGAPATH_SEGMENT_LENGTHS,
        dilation_ratios=GIGAPATH_DILATION_RATIOS,
        drop_path=0.1,
    ),
}


def slide_encoder_preset(name: str, **overrides) -> SlideEncoderConfig:
    """The config of a named preset ("small", "gigapath"), with ``overrides`` (e.g. ``in_dim=384``) applied."""
    if name not in PRESETS:
        raise ConfigError(f"slide encoder preset {name!r} is unknown: expected one of {sorted(PRESETS)}", key="preset")
    fields = {f.name for f in dataclasses.fields(SlideEncoderConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"SlideEncoderConfig has no field {unknown[0]!r}: expected one of {sorted(fields)}",
            key=f"{OWNER}.{unknown[0]}",
        )
    return SlideEncoderConfig(**{**PRESETS[name], **overrides})
