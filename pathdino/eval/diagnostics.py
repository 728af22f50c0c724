"""Label-free diagnostics of an embedding: effective rank, alignment and uniformity.

Formulas (``x_i`` are the ``N`` feature rows; ``z_i = x_i / ||x_i||``):

- **RankMe** (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained self-supervised
  representations by their rank"): with singular values ``s_1..s_m`` of the (uncentred) ``N x D`` feature
  matrix, ``p_j = s_j / sum(s) + eps`` and ``rankme = exp(-sum_j p_j log p_j)``. It lies in ``[1, min(N, D)]``:
  a matrix of rank ``r`` with equal singular values scores ``r``; a collapsed embedding (all rows parallel)
  scores 1. Collapse in self-supervised training shows as a falling RankMe.
- **Alignment** (Wang & Isola 2020, "Understanding contrastive representation learning through alignment and
  uniformity on the hypersphere"): for paired views ``(z_i, z'_i)`` of the same tile,
  ``alignment = mean_i ||z_i - z'_i||^2`` in ``[0, 4]``; lower means augmentation-invariant.
- **Uniformity** (same paper, ``t = 2``): ``uniformity = log mean_{i<j} exp(-t ||z_i - z_j||^2)`` over distinct
  pairs, in ``[-4t, 0]``; 0 when all features coincide (collapse), more negative when they spread over the sphere.

Uniformity is quadratic in ``N``; it uses a seeded random subset of ``max_items`` rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # the value in the RankMe paper; keeps log finite for zero singular values
UNIFORMITY_T = 2.0
DEFAULT_MAX_ITEMS = 4096


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """Effective rank ``exp(entropy(s / sum(s)))`` of the feature matrix (see the module docstring)."""
    if features.ndim != 2 or min(features.shape) == 0:
        raise ValueError(f"rankme needs a non-empty [N, D] matrix, got shape {tuple(features.shape)}")
    s = torch.linalg.svdvals(features.double())
    if float(s.sum()) == 0.0:
        return 1.0  # an all-zero matrix is the extreme of collapse
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(view_a: torch.Tensor, view_b: torch.Tensor) -> float:
    """Mean squared distance between L2-normalised paired rows of two views of the same tiles."""
    if view_a.shape != view_b.shape or view_a.ndim != 2:
        raise ValueError(
            f"alignment needs two [N, D] views of equal shape, got {tuple(view_a.shape)} and {tuple(view_b.shape)}"
        )
    a = F.normalize(view_a.double(), dim=1)
    b = F.normalize(view_b.double(), dim=1)
    return float((a - b).pow(2).sum(dim=1).mean())


def uniformity(
    features: torch.Tensor, t: float = UNIFORMITY_T, max_items: int = DEFAULT_MAX_ITEMS, seed: int = 0
) -> float:
    """``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` of L2-normalised rows (at most ``max_items``, seeded)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"uniformity needs at least two feature rows, got shape {tuple(features.shape)}")
    x = features
    if x.shape[0] > max_items:
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_items]
        x = x[idx]
    z = F.normalize(x.double(), dim=1)
    sq = torch.pdist(z).pow(2)
    # logsumexp - log(count) is the stable form of log(mean(exp(.)))
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def diagnose(
    features: torch.Tensor,
    view_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    seed: int = 0,
) -> dict[str, object]:
    """RankMe, normalised RankMe (÷ min(N, D)), uniformity, and alignment when ``view_pairs`` are given."""
    n, d = features.shape
    rank = rankme(features)
    out: dict[str, object] = {
        "n": int(n),
        "dim": int(d),
        "rankme": rank,
        "rankme_normalised": rank / min(n, d),
        "uniformity": uniformity(features, max_items=max_items, seed=seed) if n >= 2 else float("nan"),
        "uniformity_t": UNIFORMITY_T,
    }
    if view_pairs is not None:
        out["alignment"] = alignment(*view_pairs)
        out["alignment_n"] = int(view_pairs[0].shape[0])
    return out
