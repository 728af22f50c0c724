"""DINO CLS loss and the teacher-target computations (centering, Sinkhorn-Knopp) shared with iBOT.

Notation: K prototypes, B tiles per process, G global and L local crops per tile, crops crop-major (row
``k * B + i`` is crop k of tile i, see ``pathdino.data.batch``). Teacher logits come from the G global crops only.

Teacher targets ``t`` (no gradient), for teacher logits ``z`` and temperature ``tau_t``:

* centering: ``t = softmax((z - c) / tau_t)``; afterwards ``c <- m c + (1 - m) mean(z)`` with m = 0.9 and the
  mean over every row of every process (one all-reduce of the row sum and row count).
* Sinkhorn-Knopp (3 iterations): ``Q = exp(z / tau_t)``, alternately scaled so every prototype gets total mass
  1/K and every row total mass 1/N_total, where N_total counts rows over all processes (the per-prototype sums are
  all-reduced). The row scaling comes last, so returned rows sum exactly to 1 and prototype marginals are only
  approximately N_total/K after 3 iterations. With P processes this equals running on the concatenated batch.

DINO loss, with ``s = log_softmax(student_logits / 0.1)`` and ``CE(t, s) = -sum_k t_k s_k``::

    global = sum_{g != h} sum_i CE(t[h, i], s_global[g, i]) / B / n_terms
    local  = sum_{l, h}   sum_i CE(t[h, i], s_local[l, i])  / B / n_terms
    n_terms = G (G - 1) + G L          loss = global + local

i.e. the mean, over every (student crop, teacher crop) pair except a global crop with itself, of the batch-mean
cross-entropy. For G = 2, L = 8 this is DINOv2's normalisation: local term / (2 + 16), global term
(batch mean over both crops, each against the other one) x 2 / 18.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pathdino.losses.prototype_ce import centered_softmax, sum_over_rows

TargetMethod = Literal["centering", "sinkhorn"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce across the default process group; a no-op without torch.distributed."""
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets [N, K] (rows sum to 1) with equal prototype marginals over all processes.

    Every process must call this (collectives inside), even with N = 0 rows; results equal a single-process run
    on the concatenation of all processes' rows.
    """
    scores = logits.detach().float() / teacher_temp
    n_prototypes = scores.shape[1]
    # Subtracting the global max changes nothing after normalisation but keeps exp() finite at low temperature.
    global_max = scores.max() if scores.numel() else scores.new_tensor(float("-inf"))
    all_reduce_(global_max, op=dist.ReduceOp.MAX)
    n_rows_total = all_reduce_(scores.new_tensor(float(scores.shape[0])))
    # No host sync and no branch on data: a process with 0 rows works on empty tensors but joins every collective.
    q = torch.exp(scores - global_max).t()  # [K, N]
    q /= all_reduce_(q.sum())
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        per_prototype = all_reduce_(q.sum(dim=1, keepdim=True))
        q /= per_prototype.clamp_min(tiny) * n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * n_rows_total
    return (q * n_rows_total).t()


class PrototypeTargets(nn.Module):
    """Teacher targets by centering (with its EMA center buffer) or Sinkhorn-Knopp; see the module docstring.

    The ``center`` buffer is part of ``state_dict`` (checkpoint it with the loss).
    """

    def __init__(
        self,
        n_prototypes: int,
        method: TargetMethod = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if method not in ("centering", "sinkhorn"):
            raise ValueError(f"teacher target method {method!r}: expected 'centering' or 'sinkhorn'")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum={center_momentum} must be in [0, 1)")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations={sinkhorn_iterations} must be >= 1")
        self.method = method
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """EMA of the mean teacher logit over all rows of all processes (no-op if there are none).

        A sequence (one [N_i, K] tensor per accumulation micro-step) is folded in as ONE batch, with one EMA step:
        so an optimizer step of 2 micro-batches of 4 moves the center exactly as one batch of 8 does.
        """
        chunks = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
        # Summed into fp32 without an fp32 copy of [N, K] (340 MB for iBOT at K = 65,536): see sum_over_rows.
        row_sum = sum_over_rows(chunks[0].detach())
        for z in chunks[1:]:
            row_sum = row_sum + sum_over_rows(z.detach())
        stats = torch.cat([row_sum, self.center.new_tensor([float(sum(z.shape[0] for z in chunks))])])
        all_reduce_(stats)  # one collective for sum and count, so unequal row counts per process are exact
        count = stats[-1]
        batch_center = (stats[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        updated = self.center * self.center_momentum + batch_center * (1.0 - self.center_momentum)
        # torch.where instead of `if count > 0` avoids a host sync (and a graph break under torch.compile).
        self.center.copy_(torch.where(count > 0, updated, self.center))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float, update_center: bool = True) -> torch.Tensor:
        """Targets [N, K] (rows sum to 1) for teacher logits [N, K]; centering uses the center from earlier steps
        and then (``update_center``) folds this batch in, as DINOv2."""
        if teacher_logits.dim() != 2 or teacher_logits.shape[1] != self.center.shape[1]:
            raise ValueError(f"teacher logits must be [N, {self.center.shape[1]}], got {tuple(teacher_logits.shape)}")
        if self.method == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        probs = centered_softmax(teacher_logits.detach(), self.center, teacher_temp)
        if update_center:
            self.update_center(teacher_logits)
        return probs


class PrototypeCrossEntropy(nn.Module):
    """Shared by the DINO and iBOT losses: a student temperature and the teacher-target method (with its state)."""

    def __init__(
        self,
        n_prototypes: int,
        student_temp: float = 0.1,
        targets: TargetMethod = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp={student_temp} must be positive")
        self.student_temp = student_temp
        self.targets = PrototypeTargets(n_prototypes, targets, center_momentum, sinkhorn_iterations)

    def teacher_targets(
        self, teacher_logits: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        """Teacher targets [rows, K] from the teacher's logits (DINO: CLS of the global crops, crop-major;
        iBOT: the masked positions, in ``gather_masked_tokens`` order)."""
        return self.targets(teacher_logits, teacher_temp, update_center)


class DINOLoss(PrototypeCrossEntropy):
    """DINO cross-entropy between teacher targets on global crops and student logits on all crops.

    Usage: ``t = loss.teacher_targets(teacher_global_logits, teacher_temp)`` then
    ``loss(student_global_logits, student_local_logits, t, n_global_crops)``.
    """

    def forward_terms(
        self,
        student_global_logits: torch.Tensor,
        student_local_logits: torch.Tensor | None,
        teacher_probs: torch.Tensor,
        n_global_crops: int = 2,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (global, local) terms of the loss (their sum is ``forward``); see the module docstring."""
        n_prototypes = teacher_probs.shape[-1]
        n_rows = teacher_probs.shape[0]
        if n_global_crops < 1 or n_rows % n_global_crops:
            raise ValueError(f"teacher targets have {n_rows} rows, not a multiple of n_global_crops={n_global_crops}")
        batch = n_rows // n_global_crops
        if student_global_logits.shape != teacher_probs.shape:
            raise ValueError(
                f"student global logits {tuple(student_global_logits.shape)} must match teacher targets "
                f"{tuple(teacher_probs.shape)} (crop-major [G*B, K])"
            )
        if student_local_logits is None:
            student_local_logits = student_global_logits.new_zeros(0, n_prototypes)
        if student_local_logits.shape[0] % max(batch, 1) or student_local_logits.shape[-1] != n_prototypes:
            raise ValueError(
                f"student local logits {tuple(student_local_logits.shape)} must be [L*{batch}, {n_prototypes}]"
            )
        n_local = student_local_logits.shape[0] // max(batch, 1)
        n_terms = n_global_crops * (n_global_crops - 1) + n_global_crops * n_local
        if n_terms == 0:
            raise ValueError("DINO loss needs >= 2 global crops or >= 1 local crop")

        t = teacher_probs.float().view(n_global_crops, batch * n_prototypes)
        s_global = F.log_softmax(student_global_logits.float() / self.student_temp, dim=-1)
        # pair_ce[h, g] = sum_i CE(t[h, i], s[g, i]); only h != g pairs count.
        pair_ce = -t @ s_global.view(n_global_crops, batch * n_prototypes).t()
        global_sum = pair_ce.sum() - pair_ce.diagonal().sum()
        if n_local:
            s_local = F.log_softmax(student_local_logits.float() / self.student_temp, dim=-1)
            # Every local crop against every teacher crop: sum_h sum_l <t_h, s_l> = <sum_h t_h, sum_l s_l>.
            local_sum = -(t.sum(dim=0) * s_local.view(n_local, -1).sum(dim=0)).sum()
        else:
            local_sum = global_sum.new_zeros(())
        scale = 1.0 / (batch * n_terms)
        return global_sum * scale, local_sum * scale

    def forward(
        self,
        student_global_logits: torch.Tensor,
        student_local_logits: torch.Tensor | None,
        teacher_probs: torch.Tensor,
        n_global_crops: int = 2,
    ) -> torch.Tensor:
        """Scalar DINO loss: global [G*B, K] and local [L*B, K] student logits vs teacher targets [G*B, K]."""
        global_term, local_term = self.forward_terms(
            student_global_logits, student_local_logits, teacher_probs, n_global_crops
        )
        return global_term + local_term
