"""Gated-attention multiple-instance learning (ABMIL; Ilse, Tomczak & Welling 2018, ICML).

A slide is a bag of tile embeddings ``x_1..x_N``. Each is projected, ``h_i = Dropout(ReLU(W x_i))``, scored by the
gated attention ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``, the scores are softmax-normalised over the bag, and
the attention-weighted sum of ``h_i`` is classified. The attention weights say which tiles drove the prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ABMILOutput(NamedTuple):
    logits: torch.Tensor  # [B, C] (or [C] for an unbatched bag)
    attention: torch.Tensor  # softmax weights over tiles, [B, N] (or [N]); 0 on padding
    attention_logits: torch.Tensor  # pre-softmax scores, same shape; -inf on padding


class ABMIL(nn.Module):
    """Gated-attention MIL classifier over per-tile embeddings.

    ``forward(features [N, D] or [B, N, D], mask [B, N] bool (True = real tile) = None)`` -> :class:`ABMILOutput`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        n_classes: int = 2,
        dropout: float = 0.25,
        attention_dim: int | None = None,
    ):
        super().__init__()
        if in_dim < 1 or hidden_dim < 1 or n_classes < 2:
            raise ValueError(
                f"ABMIL needs in_dim, hidden_dim >= 1 and n_classes >= 2; got {in_dim}, {hidden_dim}, {n_classes}"
            )
        attention_dim = attention_dim or hidden_dim
        self.in_dim, self.hidden_dim, self.n_classes = in_dim, hidden_dim, n_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid())
        self.attention_w = nn.Linear(attention_dim, 1)
        self.attention_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> ABMILOutput:
        unbatched = features.ndim == 2
        if unbatched:
            features = features.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None else None
        if features.ndim != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"ABMIL expects features [N, {self.in_dim}] or [B, N, {self.in_dim}], got {tuple(features.shape)}"
            )
        if features.shape[1] == 0:
            raise ValueError("ABMIL got an empty bag (0 tiles)")
        h = self.project(features)
        gated = self.attention_dropout(self.attention_v(h) * self.attention_u(h))
        scores = self.attention_w(gated).squeeze(-1)  # [B, N]
        if mask is not None:
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights = scores.softmax(dim=1)
        pooled = torch.einsum("bn,bnd->bd", weights, h)
        logits = self.classifier(pooled)
        if unbatched:
            return ABMILOutput(logits[0], weights[0], scores[0])
        return ABMILOutput(logits, weights, scores)
