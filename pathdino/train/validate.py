"""Checks of a training config before any work starts: across sections, phases, the launch and the tile stores.

Single-field checks live in the config dataclasses (config.py); these need several sections, the number of
processes or the stores. Every failure is a ConfigError naming the key and what to do.
"""

from __future__ import annotations

from pathlib import Path

from pathdino.data import Catalog, validate_stores
from pathdino.train.config import RunConfig, crop_plan, per_process_batch
from pathdino.train.phases import phase_config
from tiling.configio import ConfigError
from tiling.store import StoreError


def validate_config(cfg: RunConfig, world_size: int = 1, check_stores: bool = True) -> Catalog | None:
    """Cross-section checks before any work starts; raises ConfigError naming the key and what to do. Returns the
    stores' `Catalog` (``Catalog.uses``: the line saying what the run trains on) when the stores were checked."""
    patch = cfg.model.backbone.patch_size
    plan = crop_plan(cfg)  # the global crop is checked against the patch size where the backbone follows it
    if plan.n_local and plan.local_px % patch:
        px = plan.local_px
        raise ConfigError(
            f"augment.local_crop_px={px} is not divisible by model.backbone.patch_size={patch}; use a multiple "
            f"(e.g. {max(patch, px - px % patch)} or {px - px % patch + patch})",
            key="augment.local_crop_px",
        )
    if plan.n_global < 1 or (plan.n_global < 2 and plan.n_local == 0):
        raise ConfigError("the DINO loss needs 2 global crops, or 1 global crop and some local crops")
    per_process_batch(cfg, world_size)
    t, o = cfg.train, cfg.optim
    _check_output_dir(Path(t.output_dir))
    if o.warmup_fraction is None and o.warmup_steps > t.total_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} exceeds train.total_steps={t.total_steps}", key="optim.warmup_steps"
        )
    if t.freeze_backbone_steps and not cfg.model.init_checkpoint:
        raise ConfigError(
            f"train.freeze_backbone_steps={t.freeze_backbone_steps} freezes a random backbone: set "
            "model.init_checkpoint to the backbone to continue from, or set it to 0",
            key="train.freeze_backbone_steps",
        )
    gram = cfg.loss.gram
    if gram.weight and round(plan.global_px * gram.input_scale) % patch:
        raise ConfigError(
            f"loss.gram.input_scale={gram.input_scale} makes the Gram teacher's crop "
            f"{plan.global_px * gram.input_scale:g} px, not a multiple of model.backbone.patch_size="
            f"{patch}; choose a scale that gives one (e.g. 2)",
            key="loss.gram.input_scale",
        )
    if t.phases:
        validate_phases(cfg, world_size, check_stores)
    if check_stores and not t.synthetic_data:
        return _check_stores(cfg, "data.stores")
    return None


def _check_output_dir(out: Path) -> None:
    """train.output_dir is (or can become) a folder: not a file, nor under one."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is under {folder}, which is a file"
                raise ConfigError(
                    f"train.output_dir={str(out)!r} {what}: the run writes a folder there (checkpoints, "
                    "metrics.jsonl); choose another train.output_dir",
                    key="train.output_dir",
                )
            return


def validate_phases(cfg: RunConfig, world_size: int, check_stores: bool) -> None:
    """Every phase fits the run, the patch size, the launch and (``check_stores``) the stores' tile size."""
    total = cfg.train.total_steps
    patch = cfg.model.backbone.patch_size
    used = sum(p.steps for p in cfg.train.phases)
    if used >= total:
        raise ConfigError(
            f"train.phases cover {used} steps but train.total_steps={total}: phases are the run's "
            "closing steps; leave at least one step before them (or change augment instead)"
        )
    for i, phase in enumerate(cfg.train.phases):
        key = f"train.phases[{i}]"
        if phase.steps < 1:
            raise ConfigError(f"{key}.steps={phase.steps} must be positive")
        for name in ("global_crop_px", "local_crop_px"):
            px = getattr(phase, name)
            if px is not None and (px < patch or px % patch):
                raise ConfigError(
                    f"{key}.{name}={px} must be a positive multiple of model.backbone.patch_size="
                    f"{patch} (e.g. {max(patch, px - px % patch)} or {px - px % patch + patch})"
                )
        for name in ("batch_size", "grad_accum_steps"):
            value = getattr(phase, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key}.{name}={value} must be positive")
        try:
            pcfg = phase_config(cfg, i + 1)
            per_process_batch(pcfg, world_size)
        except ValueError as exc:  # ConfigError included
            raise ConfigError(f"{key}: {exc}") from exc
        if check_stores and not cfg.train.synthetic_data:
            _check_stores(pcfg, key)


def _check_stores(cfg: RunConfig, key: str) -> Catalog:
    """The stores exist and hold tiles large enough for the crops of ``cfg`` (the run's, or a phase's)."""
    try:
        return validate_stores(cfg.data, cfg.augment)
    except (StoreError, ValueError) as exc:
        if key == "data.stores":
            raise ConfigError(f"data.stores: {exc}") from exc
        px = cfg.augment.global_crop_px
        raise ConfigError(
            f"{key} crops {px}/{cfg.augment.local_crop_px} px, but data.stores cannot serve them: {exc}. A phase's "
            f"crops must fit in the stores' tiles: tile the slides again at the same target_mpp with tile_px >= {px} "
            "(pathdino tile ... --tile-px) into a new store and train on it (docs/training.md, 'Phases')"
        ) from exc
