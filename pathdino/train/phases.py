"""Training phases: the run's closing steps at other crop sizes (DINOv2's high-resolution phase).

Phase 0 is the run as ``augment`` and ``train`` describe it; phase i >= 1 is ``train.phases[i - 1]``. Phases fill
the end of ``train.total_steps`` in order, so ``phase_at(cfg, step)`` is a pure function of the optimizer step and
schedules simply continue. ``phase_config`` gives the config in effect during a phase: the crop sizes (and with
the global one the backbone's ``img_size``, its position-embedding grid) and the batch replaced. The trainer
resolves it once per phase (run.py); the switch itself (loop.py) checkpoints, then rebuilds the phase from that
checkpoint, exactly as a resume would; ``models.pos_embed.resample_position_embeddings`` fits the checkpoint's
position embedding to the new grid (timm's ``resample_abs_pos_embed``) on the way in.
"""

from __future__ import annotations

from dataclasses import replace

from pathdino.train.config import RunConfig


def phase_starts(cfg: RunConfig) -> list[int]:
    """First optimizer step of every phase (phase 0 starts at 0)."""
    starts = [0]
    remaining = cfg.train.total_steps - sum(p.steps for p in cfg.train.phases)
    for phase in cfg.train.phases:
        starts.append(remaining)
        remaining += phase.steps
    return starts


def phase_end(cfg: RunConfig, index: int) -> int:
    """The optimizer step at which phase ``index`` ends: the next phase's first step, or ``train.total_steps``."""
    return (phase_starts(cfg) + [cfg.train.total_steps])[index + 1]


def phase_at(cfg: RunConfig, step: int) -> int:
    """The phase that runs optimizer step ``step`` (0-based; step ``total_steps`` belongs to the last phase)."""
    starts = phase_starts(cfg)
    return max(i for i, start in enumerate(starts) if start <= step)


def phase_config(cfg: RunConfig, index: int) -> RunConfig:
    """The config in effect during phase ``index``: crops (and so the backbone's img_size) and batch of that phase."""
    if index == 0:
        return cfg
    phase = cfg.train.phases[index - 1]
    aug = replace(
        cfg.augment,
        global_crop_px=phase.global_crop_px,
        local_crop_px=phase.local_crop_px if phase.local_crop_px is not None else cfg.augment.local_crop_px,
    )
    train = replace(
        cfg.train,
        batch_size=phase.batch_size if phase.batch_size is not None else cfg.train.batch_size,
        grad_accum_steps=(phase.grad_accum_steps if phase.grad_accum_steps is not None else cfg.train.grad_accum_steps),
    )
    return replace(cfg, augment=aug, train=train)  # RunConfig derives the backbone's img_size from the crops


def describe_phase(cfg: RunConfig, index: int) -> str:
    starts = phase_starts(cfg) + [cfg.train.total_steps]
    p = phase_config(cfg, index)
    return (
        f"phase {index} (steps {starts[index]}-{starts[index + 1]}): global {p.augment.global_crop_px} px, "
        f"local {p.augment.local_crop_px} px, {p.train.batch_size} images per step"
    )
