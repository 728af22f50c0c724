"""Training phases: the run's closing steps at other crop sizes (DINOv2's high-resolution phase).

Phase 0 is the run as ``augment`` and ``train`` describe it; phase i >= 1 is ``train.phases[i - 1]``. Phases fill
the end of ``train.total_steps`` in order, so ``phase_at(cfg, step)`` is a pure function of the optimizer step and
schedules simply continue. ``phase_config`` gives the config in effect during a phase: crop sizes, the backbone's
``img_size`` (its position-embedding grid) and the batch replaced. The switch itself (loop.py) checkpoints, then
rebuilds the run for the new phase from that checkpoint, exactly as a resume would;
``models.pos_embed.resample_position_embeddings`` fits the checkpoint's position embedding to the new grid (timm's ``resample_abs_pos_embed``) on the way in.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pathdino.train.config import RunConfig, per_process_batch
from tiling.configio import ConfigError


def phase_starts(cfg: RunConfig) -> list[int]:
    """First optimizer step of every phase (phase 0 starts at 0)."""
    starts = [0]
    remaining = cfg.train.total_steps - sum(p.steps for p in cfg.train.phases)
    for phase in cfg.train.phases:
        starts.append(remaining)
        remaining += phase.steps
    return starts


def phase_at(cfg: RunConfig, step: int) -> int:
    """The phase that runs optimizer step ``step`` (0-based; step ``total_steps`` belongs to the last phase)."""
    starts = phase_starts(cfg)
    return max(i for i, start in enumerate(starts) if start <= step)


def phase_config(cfg: RunConfig, index: int) -> RunConfig:
    """The config in effect during phase ``index``: crops, backbone img_size and batch of that phase."""
    if index == 0:
        return cfg
    phase = cfg.train.phases[index - 1]
    aug = replace(cfg.augment, global_crop_px=phase.global_crop_px,
                  local_crop_px=phase.local_crop_px if phase.local_crop_px is not None else cfg.augment.local_crop_px)
    backbone = replace(cfg.model.backbone, img_size=phase.global_crop_px)
    train = replace(cfg.train,
                    batch_size=phase.batch_size if phase.batch_size is not None else cfg.train.batch_size,
                    grad_accum_steps=(phase.grad_accum_steps if phase.grad_accum_steps is not None
                                      else cfg.train.grad_accum_steps))
    return replace(cfg, augment=aug, model=replace(cfg.model, backbone=backbone), train=train)


def describe_phase(cfg: RunConfig, index: int) -> str:
    starts = phase_starts(cfg) + [cfg.train.total_steps]
    p = phase_config(cfg, index)
    return (f"phase {index} (steps {starts[index]}-{starts[index + 1]}): global {p.augment.global_crop_px} px, "
            f"local {p.augment.local_crop_px} px, {p.train.batch_size} images per step")


def validate_phases(cfg: RunConfig, world_size: int, check_stores: bool) -> None:
    """Every phase fits the run, the patch size, the launch and (``check_stores``) the stores' tile size."""
    total = cfg.train.total_steps
    patch = cfg.model.backbone.patch_size
    used = sum(p.steps for p in cfg.train.phases)
    if used >= total:
        raise ConfigError(f"train.phases cover {used} steps but train.total_steps={total}: phases are the run's "
                          "closing steps; leave at least one step before them (or change augment instead)")
    for i, phase in enumerate(cfg.train.phases):
        key = f"train.phases[{i}]"
        if phase.steps < 1:
            raise ConfigError(f"{key}.steps={phase.steps} must be positive")
        for name in ("global_crop_px", "local_crop_px"):
            px = getattr(phase, name)
            if px is not None and (px < patch or px % patch):
                raise ConfigError(f"{key}.{name}={px} must be a positive multiple of model.backbone.patch_size="
                                  f"{patch} (e.g. {max(patch, px - px % patch)} or {px - px % patch + patch})")
        for name in ("batch_size", "grad_accum_steps"):
            value = getattr(phase, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key}.{name}={value} must be positive")
        try:
            pcfg = phase_config(cfg, i + 1)
            per_process_batch(pcfg, world_size)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from exc
        if check_stores and not cfg.train.synthetic_data:
            _check_phase_stores(pcfg, key)


def _check_phase_stores(pcfg: RunConfig, key: str) -> None:
    from pathdino.data import validate_stores
    from tiling.store import StoreError

    try:
        validate_stores(pcfg.data, pcfg.augment)
    except (StoreError, ValueError) as exc:
        px = pcfg.augment.global_crop_px
        raise ConfigError(
            f"{key} crops {px}/{pcfg.augment.local_crop_px} px, but data.stores cannot serve them: {exc}. A phase's "
            f"crops must fit in the stores' tiles: tile the slides again at the same target_mpp with tile_px >= {px} "
            "(pathdino tile ... --tile-px) into a new store and train on it (docs/training.md, 'Phases')") from exc



def drop_mismatched_optimizer_state(optim_state: dict, shapes: dict[str, torch.Size]) -> list[str]:
    """Drop AdamW moments whose shape no longer fits their parameter (a resampled position embedding): the
    parameter starts fresh moments (and bias correction) at the switch. Returns the dropped names."""
    dropped = []
    for name, entry in list(optim_state["state"].items()):
        moments = [v for k, v in entry.items() if k != "step" and isinstance(v, torch.Tensor) and v.dim() > 0]
        if name in shapes and any(tuple(v.shape) != tuple(shapes[name]) for v in moments):
            del optim_state["state"][name]
            dropped.append(name)
    return dropped
