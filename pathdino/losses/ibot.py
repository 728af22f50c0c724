"""iBOT masked-patch loss: the student predicts, at masked patches, the teacher's prototypes for the unmasked crop.

Only masked tokens go through the heads (about 1,200 per step for DINOv2's defaults, against ~130,000 patch
tokens on the full grid): gather them first with ``gather_masked_tokens`` (same order for teacher and student).

For global crops n = 1..G*B with M_n masked patches (``masks`` [G*B, N_patches], crop-major), teacher targets
``t_j`` over the masked tokens only (centering with its own center, or Sinkhorn over all processes' masked tokens)
and ``s_j = log_softmax(student_logits_j / 0.1)``::

    per_image_n = (1 / M_n) sum_{j in n} CE(t_j, s_j)                  (crops with M_n = 0 contribute 0)
    loss        = (1 / (G B)) sum_n per_image_n  x  2 / G

The 1/(G B) divides by every global crop, masked or not, and 2/G is upstream's ``loss_scales (2) x
ibot_loss_scale (1/G)``: for DINOv2's 2 global crops the scale is 1 and the loss is the mean over global crops of
the per-image mean masked-token cross-entropy. (Upstream displays this value / 2.)
"""

from __future__ import annotations

import torch

from pathdino.losses.dino import PrototypeCrossEntropy
from pathdino.losses.prototype_ce import prototype_cross_entropy


def _check_masks(tokens_or_none: torch.Tensor | None, masks: torch.Tensor) -> None:
    if masks.dtype != torch.bool or masks.dim() != 2:
        raise ValueError(f"iBOT masks must be bool [n_crops, n_patches], got {masks.dtype} {tuple(masks.shape)}")
    if tokens_or_none is not None and tokens_or_none.shape[:2] != masks.shape:
        raise ValueError(
            f"patch tokens {tuple(tokens_or_none.shape)} do not match masks {tuple(masks.shape)} "
            "(expected tokens [n_crops, n_patches, D])"
        )


def gather_masked_tokens(patch_tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked patch tokens [M, D] from ``patch_tokens`` [n_crops, N, D], in row-major order of ``masks``.

    Boolean indexing costs one host sync (M is data-dependent); call it once per crop set and reuse ``masks``.
    """
    _check_masks(patch_tokens, masks)
    return patch_tokens[masks]


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked token weight 1 / (masked patches of its crop), shape [M], same order as ``gather_masked_tokens``."""
    _check_masks(None, masks)
    per_crop = 1.0 / masks.sum(dim=1).clamp_min(1).float()
    return per_crop.unsqueeze(1).expand_as(masks)[masks]


class IBOTPatchLoss(PrototypeCrossEntropy):
    """Cross-entropy between teacher targets and student logits over masked patch tokens (module docstring).

    Usage: ``t = loss.teacher_targets(teacher_masked_logits, teacher_temp)`` then
    ``loss(student_masked_logits, t, masks, n_global_crops)``.
    """

    def forward(
        self,
        student_masked_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks: torch.Tensor,
        n_global_crops: int = 2,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar iBOT loss from student logits [M, K] and teacher targets [M, K] at the M masked tokens of
        ``masks`` [G*B, N]; ``token_weights`` defaults to ``masked_token_weights(masks)``."""
        _check_masks(None, masks)
        if student_masked_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"student logits {tuple(student_masked_logits.shape)} and teacher targets "
                f"{tuple(teacher_probs.shape)} must both be [M, K] over the masked tokens"
            )
        if token_weights is None:
            token_weights = masked_token_weights(masks)
        if token_weights.shape[0] != student_masked_logits.shape[0]:
            raise ValueError(
                f"{student_masked_logits.shape[0]} masked-token logits but masks select {token_weights.shape[0]}"
            )
        ce = prototype_cross_entropy(student_masked_logits, teacher_probs, self.student_temp)
        n_crops = masks.shape[0]
        return (ce * token_weights).sum() / n_crops * (2.0 / n_global_crops)
