"""Uniformity regularisers on the L2-normalised backbone CLS of each global crop: KoLeo (DINOv2) and KDE.

Both are applied per global-crop chunk (rows ``k*B .. (k+1)*B`` of the crop-major CLS batch; never between the
crops of one tile) and summed over chunks, as DINOv2 does; the trainer multiplies by the weight
(``DEFAULT_WEIGHTS``: KoLeo 0.1 as DINOv2, KDE 0.05 as OpenMidnight).

KoLeo (Kozachenko-Leonenko entropy estimate), for unit vectors x_1..x_n::

    loss = -(1/n') sum_i log d_i,     d_i = min_{j: ||x_i - x_j|| >= tol} ||x_i - x_j||

GUARD (dinov2 issue #492): upstream takes the nearest neighbour among all other points, so an exact duplicate
tile gives d_i = 0 and -log(0) (only an eps of 1e-8 in between: loss ~18 and gradients ~1e8, inf in half
precision). Here neighbours closer than ``duplicate_tol`` (1e-3 on the unit sphere, whose diameter is 2) are
treated as the same point and skipped; points with no other neighbour are left out of the mean (n' counts the
rest). The per-point term is therefore at most -log(tol) ~ 6.9 and its gradient at most 1/tol.

KDE (von Mises-Fisher kernel density entropy, Virchow2 / Midnight), with kappa = 5::

    loss = (1/n) sum_i log( (1/(n-1)) sum_{j != i} exp(kappa (x_i . x_j - 1)) )

i.e. minus a leave-one-out KDE entropy estimate (constants dropped): 0 when all points coincide, negative when they
spread out. Duplicates are harmless (the kernel is bounded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WEIGHTS = {"koleo": 0.1, "kde": 0.05}


def _chunks(features: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, ...]:
    if features.dim() != 2:
        raise ValueError(f"regulariser features must be [n, D], got {tuple(features.shape)}")
    if n_chunks < 1 or features.shape[0] % n_chunks:
        raise ValueError(f"{features.shape[0]} rows cannot be split into n_chunks={n_chunks} global-crop chunks")
    return features.chunk(n_chunks) if features.shape[0] else (features,)


def koleo_loss(features: torch.Tensor, duplicate_tol: float = 1e-3) -> torch.Tensor:
    """Guarded KoLeo loss of one set of vectors [n, D] (normalised here); see the module docstring."""
    x = F.normalize(features.float(), dim=-1, eps=1e-8)
    n = x.shape[0]
    if n == 0:
        return features.sum() * 0.0
    with torch.no_grad():
        dist_sq = (2.0 - 2.0 * (x @ x.t())).clamp_min(0.0)
        same = dist_sq < duplicate_tol**2
        same |= torch.eye(n, dtype=torch.bool, device=x.device)
        nearest = dist_sq.masked_fill(same, float("inf")).argmin(dim=1)
        has_neighbour = ~same.all(dim=1)
    # Recomputed with autograd; the clamp only matters for rounding differences near tol.
    dist = (x - x[nearest]).norm(dim=-1).clamp_min(duplicate_tol)
    terms = -torch.log(dist)
    weights = has_neighbour.float()
    # No data-dependent branch: zero weight for points without neighbours, 0 loss (with a graph) if none have one.
    return (terms * weights).sum() / weights.sum().clamp_min(1.0)


def kde_loss(features: torch.Tensor, kappa: float = 5.0) -> torch.Tensor:
    """vMF-kernel KDE uniformity loss of one set of vectors [n, D] (normalised here); see the module docstring."""
    x = F.normalize(features.float(), dim=-1, eps=1e-8)
    n = x.shape[0]
    if n < 2:
        return features.sum() * 0.0  # undefined for one point; keep the graph
    logits = kappa * (x @ x.t() - 1.0)
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - math.log(n - 1)).mean()


class KoLeoLoss(nn.Module):
    """Guarded KoLeo, summed over ``n_chunks`` global-crop chunks of the CLS batch."""

    def __init__(self, duplicate_tol: float = 1e-3) -> None:
        super().__init__()
        if not duplicate_tol > 0:
            raise ValueError(f"KoLeo duplicate_tol={duplicate_tol} must be positive (it is the guard)")
        self.duplicate_tol = duplicate_tol

    def forward(self, features: torch.Tensor, n_chunks: int = 1) -> torch.Tensor:
        return sum(koleo_loss(c, self.duplicate_tol) for c in _chunks(features, n_chunks))


class KDELoss(nn.Module):
    """KDE uniformity (vMF kernel, concentration ``kappa``), summed over ``n_chunks`` global-crop chunks."""

    def __init__(self, kappa: float = 5.0) -> None:
        super().__init__()
        if not kappa > 0:
            raise ValueError(f"KDE kappa={kappa} must be positive")
        self.kappa = kappa

    def forward(self, features: torch.Tensor, n_chunks: int = 1) -> torch.Tensor:
        return sum(kde_loss(c, self.kappa) for c in _chunks(features, n_chunks))


def build_uniformity_loss(name: str, **kwargs: float) -> nn.Module:
    """``"koleo"`` -> ``KoLeoLoss(**kwargs)``, ``"kde"`` -> ``KDELoss(**kwargs)``."""
    if name == "koleo":
        return KoLeoLoss(**kwargs)
    if name == "kde":
        return KDELoss(**kwargs)
    raise ValueError(f"uniformity regulariser {name!r}: expected 'koleo' or 'kde' (weights {DEFAULT_WEIGHTS})")
