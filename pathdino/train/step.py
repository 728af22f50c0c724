"""One optimizer step, in three functions the loop calls in order.

* ``training_step``: the DINOv2 objective on one micro-batch (teacher targets, student passes, DINO + iBOT +
  KoLeo/KDE, backward); read it beside dinov2's ``SSLMetaArch.forward_backward``.
* ``reduce_step``: clip the gradients, and agree across processes on the loss terms, whether the step is finite,
  whether to stop, and (on logging steps) the health figures, in one collective.
* ``apply_update``: AdamW, the EMA teacher and the teacher centers, only for a finite step.

Each takes the phase's ``StepParts`` (the models, losses and optimizer, and the objective's numbers).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pathdino.data.batch import MultiCropBatch
from pathdino.losses import cosine_distance, gram_loss, resample_patch_grid
from pathdino.train.checkpoint import CheckpointParts
from pathdino.train.distill import DistillTeacher
from pathdino.train.distributed import all_reduce_sum_, gradient_sync
from pathdino.train.health import effective_rank, entropy
from pathdino.train.model import SSLModel, copy_backbone_, ema_update_
from pathdino.train.param_groups import drop_frozen_grads
from pathdino.train.schedules import ScheduleValues

LOSS_TERMS = ("loss", "dino_global", "dino_local", "ibot", "uniformity", "gram", "distill", "masked_tokens")
HEALTH_TERMS = ("teacher_entropy", "teacher_usage_entropy", "student_entropy", "embedding_rank", "embedding_std")


@dataclass(frozen=True)
class Objective:
    """The numbers of the objective and the update, from a phase's config (``loss``, ``optim``, ``train``; run.py)."""

    dino_weight: float
    ibot_weight: float
    uniformity_weight: float
    student_temp: float
    update_centers: bool  # loss.targets == "centering" (Sinkhorn targets keep no center)
    grad_accum_steps: int  # micro-steps per optimizer step
    clip_grad: float  # max grad norm per clipped module; 0: no clipping
    freeze_last_layer: Literal["zero_lr", "drop_grads"]
    gram_input_scale: float = 2.0  # loss.gram: the Gram teacher sees the global crops resampled by this factor
    gram_remove_negative: bool = True
    distill_cls_weight: float = 1.0  # train.distill from an encoder: CLS and patch cosine-loss weights
    distill_patch_weight: float = 1.0


@dataclass(frozen=True)
class StepParts:
    """What an optimizer step works on: one phase's models, objective and optimizer (built by run.py)."""

    student: SSLModel  # unwrapped: parameters, heads, the EMA's source
    teacher: SSLModel  # no grads, eval mode; sharded like the student under FSDP2
    model: nn.Module  # the student as trained: DDP-wrapped, FSDP2-sharded or the student itself
    losses: nn.ModuleDict  # "dino" and "ibot", with their teacher centers
    uniformity: nn.Module | None  # KoLeo / KDE on the student's global CLS, or None
    optimizer: torch.optim.Optimizer
    clip_modules: dict[str, nn.Module]  # clipped separately (backbone, each head), as DINOv2
    autocast: AbstractContextManager  # bf16 autocast, or disabled
    objective: Objective
    # loss.gram: a copy of the EMA teacher's backbone (a MaskedViT, not sharded), refreshed on the Gram schedule
    gram_teacher: nn.Module | None = None
    distill: DistillTeacher | None = None  # train.distill: the frozen teacher (never saved; its sha256 is)

    def checkpoint_parts(self) -> CheckpointParts:
        """student / teacher (gathered), the loss centers and AdamW: the files of a DINOv2 checkpoint; the Gram
        teacher too when there is one (it cannot be rebuilt: the EMA teacher it copied has moved on)."""
        models = {"student": self.model, "teacher": self.teacher}
        if self.gram_teacher is not None:
            models["gram_teacher"] = self.gram_teacher
        return CheckpointParts(
            models=models, buffers={"losses": self.losses}, optimizer=self.optimizer, optimized="student"
        )


@dataclass(frozen=True)
class StepOutputs:
    """What the rest of the step needs from one micro-step's objective (all detached)."""

    terms: torch.Tensor  # [len(LOSS_TERMS)]: total loss, its parts, and the number of masked tokens
    teacher_cls_logits: torch.Tensor  # [G*B, K]: input to the DINO center update
    teacher_patch_logits: torch.Tensor  # [M, K]: input to the iBOT center update
    teacher_targets: torch.Tensor  # [G*B, K]: the DINO targets (teacher probabilities), for health figures
    teacher_cls: torch.Tensor  # [G*B, D]: teacher backbone CLS, for the embedding rank
    student_cls_logits: torch.Tensor  # [G*B, K]


def training_step(parts: StepParts, batch: MultiCropBatch, values: ScheduleValues, *, sync: bool) -> StepOutputs:
    """The objective on one micro-batch: teacher targets -> student passes -> losses -> backward.

    Gradients are divided by the number of micro-steps; ``sync`` lets DDP/FSDP2 reduce them (the last micro-step).
    The teacher centers are not updated here: only once the whole step is known to be finite (``apply_update``).
    """
    obj = parts.objective
    dino_loss, ibot_loss = parts.losses["dino"], parts.losses["ibot"]
    n_global = batch.n_global
    # The one host sync of the micro-step: where the masked patches are (teacher, student, iBOT).
    mask_idx = batch.masks.flatten().nonzero().squeeze(1)
    token_weights = (1.0 / batch.masks.sum(dim=1).clamp_min(1).float()).index_select(
        0, torch.div(mask_idx, batch.masks.shape[1], rounding_mode="floor")
    )
    gram_on = values.gram_weight > 0
    dt = parts.distill
    # A checkpoint teacher's heads give the targets (the student is masked as usual: the same iBOT loss; dinov3's
    # distillation unmasks it); an encoder teacher's tokens are matched by cosine beside the usual objective.
    from_heads, features = dt is not None and dt.kind == "checkpoint", dt is not None and dt.kind == "encoder"
    side = math.isqrt(batch.masks.shape[1])
    with gradient_sync(parts.model, enabled=sync):
        with parts.autocast:
            with torch.no_grad():
                t_out = (dt.model if from_heads else parts.teacher)(
                    batch.global_crops, None, batch.masks, teacher=True, mask_indices=mask_idx
                )
                feat_t = dt.model(batch.global_crops, side) if features else None
                dino_t = dino_loss.teacher_targets(t_out["global_cls_logits"], values.teacher_temp, update_center=False)
                ibot_t = ibot_loss.teacher_targets(
                    t_out["masked_patch_logits"], values.teacher_temp, update_center=False
                )
                gram_t = gram_targets(parts, batch.global_crops, side=side) if gram_on else None
            s_out = parts.model(
                batch.global_crops,
                batch.local_crops,
                batch.masks,
                mask_indices=mask_idx,
                return_patches=gram_on or features,
            )
            dino_global, dino_local = dino_loss.forward_terms(
                s_out["global_cls_logits"], s_out["local_cls_logits"], dino_t, n_global
            )
            ibot = ibot_loss(s_out["masked_patch_logits"], ibot_t, batch.masks, n_global, token_weights=token_weights)
            reg = (
                parts.uniformity(s_out["global_cls"], n_chunks=n_global)
                if parts.uniformity is not None
                else dino_global.new_zeros(())
            )
            gram = (
                gram_loss(s_out["global_patch"], gram_t, remove_negative=obj.gram_remove_negative)
                if gram_on
                else dino_global.new_zeros((), dtype=torch.float32)
            )
            distill = (
                (
                    obj.distill_cls_weight * cosine_distance(s_out["distill_cls"], feat_t[0])
                    + obj.distill_patch_weight * cosine_distance(s_out["distill_patch"], feat_t[1])
                )
                if features
                else dino_global.new_zeros((), dtype=torch.float32)
            )
            loss = (
                obj.dino_weight * (dino_global + dino_local)
                + obj.ibot_weight * ibot
                + obj.uniformity_weight * reg
                + values.gram_weight * gram
                + distill
            )
        (loss / obj.grad_accum_steps).backward()
    terms = torch.stack(
        [
            loss.detach(),
            dino_global.detach(),
            dino_local.detach(),
            ibot.detach(),
            reg.detach().float(),
            gram.detach(),
            distill.detach(),
            loss.new_tensor(float(mask_idx.shape[0])),
        ]
    )
    return StepOutputs(
        terms=terms,
        teacher_cls_logits=t_out["global_cls_logits"].detach(),
        teacher_patch_logits=t_out["masked_patch_logits"].detach(),
        teacher_targets=dino_t,
        teacher_cls=t_out["global_cls"],
        student_cls_logits=s_out["global_cls_logits"].detach(),
    )


def gram_targets(parts: StepParts, global_crops: torch.Tensor, *, side: int) -> torch.Tensor:
    """The Gram teacher's patch features [G*B, side*side, D] for the global crops: it sees them resampled by
    ``objective.gram_input_scale`` (bicubic) and its patch grid is resampled back to the student's ``side``."""
    scale = parts.objective.gram_input_scale
    crops = global_crops
    if scale != 1:
        px = round(global_crops.shape[-1] * scale)
        crops = F.interpolate(global_crops, size=(px, px), mode="bicubic", align_corners=False)
    patches = parts.gram_teacher.forward_crops(crops)["global"]["patch"]
    return resample_patch_grid(patches, side)


def refresh_gram_teacher(parts: StepParts) -> None:
    """Copy the EMA teacher's backbone into the Gram teacher (loss.gram's start step and refresh interval)."""
    copy_backbone_(parts.gram_teacher, parts.teacher.backbone)


@dataclass(frozen=True)
class ReducedStep:
    """The step's figures as every process agrees on them (host floats)."""

    terms: list[float]  # LOSS_TERMS summed over processes (divide by world size for the mean)
    finite: bool  # every process's loss and gradient norm are finite
    stop_requested: bool  # some process received a stop signal
    health: list[float]  # HEALTH_TERMS summed over processes; empty except on logging steps
    grad_norm: float  # total, over all clipped modules, before clipping
    grad_norms: dict[str, float]  # per clipped module, before clipping


def reduce_step(
    parts: StepParts,
    terms: torch.Tensor,
    last: StepOutputs,
    *,
    values: ScheduleValues,
    with_health: bool,
    stop_flag: bool,
) -> ReducedStep:
    """Drop frozen gradients, clip per module, and make the step's one collective and one device -> host copy.

    ``terms`` are the micro-steps' loss terms (averaged); ``last`` the last micro-step's outputs (health figures).
    """
    obj = parts.objective
    drop_frozen_grads(parts.optimizer, values, obj.freeze_last_layer)
    grad_norms = clip_gradients(parts.clip_modules, obj.clip_grad)
    grad_norm = torch.stack(list(grad_norms.values())).float().square().sum().sqrt()
    health = torch.zeros(0, device=terms.device)
    if with_health:
        with torch.no_grad():
            student_probs = F.softmax(last.student_cls_logits.float() / obj.student_temp, dim=-1)
            dino_t = last.teacher_targets
            health = torch.tensor(
                [
                    entropy(dino_t).item(),
                    entropy(dino_t.float().mean(dim=0, keepdim=True)).item(),
                    entropy(student_probs).item(),
                    effective_rank(last.teacher_cls),
                    # per-dimension std over the batch of the L2-normalised CLS, averaged (collapse drives it to 0)
                    F.normalize(last.teacher_cls.float(), dim=-1).std(dim=0).mean().item(),
                ],
                device=terms.device,
            )
    bad = (~torch.isfinite(terms[0]) | ~torch.isfinite(grad_norm)).float()
    # One collective per step: loss terms, the finite flag, a stop request and health figures.
    packed = all_reduce_sum_(torch.cat([terms, bad.view(1), terms.new_tensor([float(stop_flag)]), health.float()]))
    # Grad norms are identical on every process (taken after the gradient all-reduce): not reduced.
    norm_values = torch.stack([grad_norm, *grad_norms.values()]).float()
    flat = torch.cat([packed, norm_values]).tolist()  # the step's one device -> host transfer
    n = len(LOSS_TERMS)
    reduced, norms = flat[: packed.numel()], flat[packed.numel() :]
    return ReducedStep(
        terms=reduced[:n],
        finite=reduced[n] == 0,
        stop_requested=reduced[n + 1] > 0,
        health=reduced[n + 2 :],
        grad_norm=norms[0],
        grad_norms=dict(zip(grad_norms, norms[1:])),
    )


def apply_update(parts: StepParts, outputs: list[StepOutputs], *, values: ScheduleValues, finite: bool) -> None:
    """AdamW, EMA teacher and teacher centers (from every micro-step's teacher logits) if ``finite``; clear grads."""
    if finite:
        parts.optimizer.step()
        ema_update_(parts.teacher, parts.student, values.momentum)
        if parts.objective.update_centers:
            # Once per optimizer step over all micro-steps' rows (not once per micro-step): 2 x 4 == 1 x 8.
            parts.losses["dino"].targets.update_center([out.teacher_cls_logits for out in outputs])
            parts.losses["ibot"].targets.update_center([out.teacher_patch_logits for out in outputs])
    parts.optimizer.zero_grad(set_to_none=True)


def clip_gradients(modules: dict[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each module's gradients to ``max_norm`` separately (as DINOv2); returns the norms before clipping."""
    norms = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            norms[name] = torch.zeros((), device=next(module.parameters()).device)
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norms
