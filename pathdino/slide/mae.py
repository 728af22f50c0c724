"""Masked autoencoding on tile embeddings: the slide encoder's pretraining objective (docs/slide.md, "The objective").

Of each slide's tiles, ``objective.mask_ratio`` are masked (pathdino.slide.plan). The encoder (a ``SlideEncoder``)
reads only the visible tiles, at their own grid positions, in row-major order (MAE: the encoder never sees a mask
token). A light decoder, a ``SlideEncoder`` of ``objective.decoder_depth`` blocks of ``objective.decoder_dim``,
reads the encoded visible tokens plus a learned mask token at every masked tile, all with their grid positions,
and a linear head predicts each masked tile's embedding (standardised over its features with
``objective.norm_targets``, as MAE's normalised pixels). The loss is the mean squared error over masked tiles only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pathdino.slide.config import SlideEncoderConfig
from pathdino.slide.model import SlideEncoder


def decoder_config(encoder: SlideEncoderConfig, *, dim: int, depth: int, heads: int) -> SlideEncoderConfig:
    """The decoder's config: reads the encoder's width, ``depth`` blocks of ``dim`` with ``heads`` heads, the
    encoder's attention branches, no dropout or stochastic depth."""
    return dataclasses.replace(
        encoder, in_dim=encoder.embed_dim, embed_dim=dim, depth=depth, num_heads=heads, dropout=0.0, drop_path=0.0
    )


def segment_sums(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-slide sums of ``values`` [N_total] for slides of ``lengths`` [B] tokens laid end to end."""
    slide_of = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    return torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add_(0, slide_of, values)


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row minus its mean, over its standard deviation (MAE's normalised targets)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


@dataclass(frozen=True)
class MAEOutput:
    """One micro-batch through the autoencoder."""

    pred: torch.Tensor  # [M, in_dim]: predictions for the masked tiles, in token order
    cls: torch.Tensor  # [B, embed_dim]: the encoder's slide embedding of the visible tiles (health figures)


class SlideMAE(nn.Module):
    """Encoder (the slide encoder being pretrained), mask token, decoder and prediction head."""

    def __init__(self, encoder: SlideEncoderConfig, *, decoder_dim: int, decoder_depth: int, decoder_heads: int):
        super().__init__()
        self.encoder = SlideEncoder(encoder)
        self.mask_token = nn.Parameter(torch.zeros(1, encoder.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = SlideEncoder(decoder_config(encoder, dim=decoder_dim, depth=decoder_depth, heads=decoder_heads))
        self.head = nn.Linear(decoder_dim, encoder.in_dim)

    def forward(
        self, features: torch.Tensor, grid_xy: torch.Tensor, lengths: torch.Tensor, *, masked: torch.Tensor
    ) -> MAEOutput:
        """``features`` [N, in_dim], ``grid_xy`` [N, 2] and ``masked`` [N] of slides of ``lengths`` [B] tokens,
        each slide's tokens in row-major order (a subset of row-major order is row-major: so are the visible)."""
        visible = ~masked
        visible_lengths = segment_sums(visible.long(), lengths)
        encoded = self.encoder(features[visible], grid_xy[visible], visible_lengths)
        tokens = encoded.tiles
        full = self.mask_token.to(tokens.dtype).expand(features.shape[0], -1)
        full = full.index_put((visible.nonzero().squeeze(1),), tokens)  # out of place: autograd sees both
        decoded = self.decoder(full, grid_xy, lengths)
        return MAEOutput(pred=self.head(decoded.tiles[masked]), cls=encoded.cls)


def mae_loss_sums(pred: torch.Tensor, target: torch.Tensor, *, norm_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over masked tiles of (a) the squared error of ``pred`` (mean over features) and (b) that of
    predicting the mean target of the micro-batch instead (the baseline a model that learned nothing reaches).
    Divide both by the number of masked tiles (of the optimizer step) for the losses. In fp32."""
    target = standardise(target.float()) if norm_targets else target.float()
    loss = (pred.float() - target).square().mean(dim=-1).sum()
    baseline = (target - target.mean(dim=0, keepdim=True)).square().mean(dim=-1).sum().detach()
    return loss, baseline
