"""Gram anchoring (DINOv3): the student's patch-to-patch cosine similarities held to those of a Gram teacher.

For one image with student patch features ``S`` [N, D] and Gram-teacher patch features ``T`` [N, D] (the same
N patches), rows L2-normalised: ``G_S = S S^T`` and ``G_T = T T^T`` are N x N cosine-similarity matrices. With
``remove_negative`` (dinov3's default ``remove_neg``) both have their negative entries set to 0. The loss is the
mean squared difference of the two matrices over all images and entries (``img_level``: one Gram matrix per
image, never across the batch). It is computed in fp32 whatever the autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_loss(
    student_patches: torch.Tensor, teacher_patches: torch.Tensor, *, remove_negative: bool = True
) -> torch.Tensor:
    """Mean squared difference of per-image patch cosine-similarity matrices; inputs [B, N, D] (D may differ)."""
    if student_patches.ndim != 3 or teacher_patches.shape[:2] != student_patches.shape[:2]:
        raise ValueError(
            f"gram_loss: expected [B, N, D] inputs with the same B and N, got "
            f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}"
        )
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    s_sim = s @ s.transpose(1, 2)
    t_sim = t @ t.transpose(1, 2)
    if remove_negative:
        s_sim = s_sim.clamp_min(0.0)
        t_sim = t_sim.clamp_min(0.0)
    return (s_sim - t_sim).square().mean()


def resample_patch_grid(patches: torch.Tensor, side: int) -> torch.Tensor:
    """Patch tokens [B, n*n, D] of a square grid resampled to ``side`` x ``side`` (bicubic): a Gram teacher that saw
    the crop at a higher resolution, or a distillation teacher with another patch size, read on the student's grid."""
    b, n_tokens, dim = patches.shape
    n = int(round(n_tokens**0.5))
    if n * n != n_tokens:
        raise ValueError(f"resample_patch_grid: {n_tokens} patch tokens are not a square grid")
    if n == side:
        return patches
    grid = patches.transpose(1, 2).reshape(b, dim, n, n)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bicubic", align_corners=False)
    return grid.reshape(b, dim, side * side).transpose(1, 2).to(patches.dtype)
