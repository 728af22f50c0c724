"""Training schedules as pure functions of the optimizer step (no "epochs" of 1,250 iterations).

Every schedule is evaluated at the optimizer step ``step`` in ``[0, total_steps)``; a resumed run therefore needs
only the step counter to be exactly where it was. Shapes follow facebookresearch/dinov2:

* learning rate: linear warm-up 0 -> peak over ``warmup_steps``, then cosine peak -> ``min_lr`` at ``total_steps``;
* weight decay: cosine ``weight_decay`` -> ``weight_decay_end`` over the whole run;
* teacher momentum: cosine ``momentum_teacher`` -> ``momentum_teacher_end`` over the whole run;
* teacher temperature: linear ``teacher_temp_warmup_start`` -> ``teacher_temp`` over ``teacher_temp_warmup_steps``,
  then constant;
* last layer: learning rate 0 for the first ``freeze_last_layer_steps`` steps (param_groups.py: how);
* backbone (continued pretraining): no update for the first ``freeze_backbone_steps`` steps, then its lr
  multiplier rises linearly 0 -> 1 over ``backbone_lr_ramp_steps`` (on top of the lr schedule);
* Gram anchoring: weight 0 before ``gram_start_step``, then ``gram_weight``; the Gram teacher is refreshed at the
  start step and every ``gram_refresh_every_steps`` after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, start: float, end: float, *, n_steps: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``n_steps``); ``end`` from then on."""
    if n_steps <= 0 or step >= n_steps:
        return end
    progress = max(step, 0) / n_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, start: float, end: float, *, n_steps: int) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``n_steps``); ``end`` from then on."""
    if n_steps <= 0 or step >= n_steps:
        return end
    return start + (end - start) * max(step, 0) / n_steps


def warmup_cosine(step: int, peak: float, final: float, *, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up 0 -> ``peak`` over ``warmup_steps`` (step 0 gives 0), then cosine ``peak`` -> ``final``."""
    if step < warmup_steps:
        return linear(step, 0.0, peak, n_steps=warmup_steps)
    return cosine(step - warmup_steps, peak, final, n_steps=total_steps - warmup_steps)


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt") -> float:
    """Peak learning rate for ``global_batch`` images per optimizer step: DINOv2's ``sqrt_wrt_1024`` rule
    (``base_lr * sqrt(batch / 1024)``), ``"linear"`` (``base_lr * batch / 1024``) or ``"none"``."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear":
        return base_lr * global_batch / 1024
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule {rule!r}: expected 'sqrt', 'linear' or 'none'")


@dataclass(frozen=True)
class ScheduleValues:
    """Every scheduled quantity at one optimizer step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_frozen: bool
    backbone_lr_mult: float = 1.0  # 0 while the backbone is frozen, then the ramp to 1 (continued pretraining)
    backbone_frozen: bool = False  # the backbone's gradients are dropped: no AdamW step, no weight decay
    gram_weight: float = 0.0  # Gram anchoring's weight this step (0 before loss.gram.start_step)
    gram_refresh: bool = False  # copy the EMA teacher into the Gram teacher before this step


@dataclass(frozen=True)
class Schedules:
    """All schedules of a run; ``at(step)`` gives their values (see the module docstring for the shapes)."""

    total_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    momentum_teacher_end: float
    teacher_temp: float
    teacher_temp_warmup_start: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int
    freeze_backbone_steps: int = 0
    backbone_lr_ramp_steps: int = 0
    gram_weight: float = 0.0
    gram_start_step: int = 0
    gram_refresh_every_steps: int = 0

    def at(self, step: int) -> ScheduleValues:
        gram_on = self.gram_weight > 0 and step >= self.gram_start_step
        since = step - self.gram_start_step
        return ScheduleValues(
            lr=warmup_cosine(
                step, self.peak_lr, self.min_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps
            ),
            weight_decay=cosine(step, self.weight_decay, self.weight_decay_end, n_steps=self.total_steps),
            momentum=cosine(step, self.momentum_teacher, self.momentum_teacher_end, n_steps=self.total_steps),
            teacher_temp=linear(
                step, self.teacher_temp_warmup_start, self.teacher_temp, n_steps=self.teacher_temp_warmup_steps
            ),
            last_layer_frozen=step < self.freeze_last_layer_steps,
            # step freeze + i of the ramp gets (i + 1) / ramp: the first step after the freeze already moves.
            backbone_lr_mult=0.0
            if step < self.freeze_backbone_steps
            else linear(step - self.freeze_backbone_steps + 1, 0.0, 1.0, n_steps=self.backbone_lr_ramp_steps),
            backbone_frozen=step < self.freeze_backbone_steps,
            gram_weight=self.gram_weight if gram_on else 0.0,
            gram_refresh=gram_on
            and (since == 0 or (self.gram_refresh_every_steps > 0 and since % self.gram_refresh_every_steps == 0)),
        )
