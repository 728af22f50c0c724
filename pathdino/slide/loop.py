"""Slide-encoder pretraining: ``train(cfg)`` reads top to bottom (docs/slide.md, "Training").

The tile trainer's runtime is reused as it is: ``open_context`` (processes, launch check, logging, CPU settings),
``StopSignals``, ``open_metrics``, ``NonFiniteGuard``, ``save_checkpoint`` / ``load_checkpoint`` /
``resume_point`` (atomic, full-state, reshardable), the schedule shapes, AdamW parameter groups and gradient
clipping. What is slide-specific: the data (pathdino.slide.data, .plan), the objective (pathdino.slide.mae) and
the step below. Each optimizer step runs ``packs_per_step / processes`` micro-batches per process; every
micro-batch's loss is divided by the masked tiles of the whole step (known to every process from the plan), so
the step's gradient is the mean over its masked tiles whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathdino.slide.data import PackDataset, SlidePack, SlidePackLoader, SlideSource
from pathdino.slide.mae import SlideMAE, mae_loss_sums
from pathdino.slide.model import SlideEncoder
from pathdino.slide.plan import EpochPlan, step_masked_tiles
from pathdino.slide.pretrained import CHECKPOINT_KIND
from pathdino.slide.train_config import RESUME_MAY_CHANGE, SlidePretrainConfig, config_to_dict
from pathdino.train.checkpoint import CheckpointParts, load_checkpoint, resume_point, save_checkpoint
from pathdino.train.config import config_changes
from pathdino.train.context import RunContext, finish_run, open_context
from pathdino.train.distributed import all_reduce_sum_, gradient_sync
from pathdino.train.health import NonFiniteGuard, effective_rank, memory_mb
from pathdino.train.host import StopSignals
from pathdino.train.loader import gather_loader_states, loader_state_for
from pathdino.train.logs import MetricLogger, open_metrics
from pathdino.train.model import ema_update_
from pathdino.train.param_groups import apply_schedule, param_groups
from pathdino.train.schedules import ScheduleValues, cosine, warmup_cosine
from pathdino.train.step import clip_gradients
from tiling.configio import ConfigError

log = logging.getLogger("pathdino.train")

# The step's figures, summed over micro-steps and processes in one collective.
TERMS = ("loss_sum", "baseline_sum", "masked_tiles", "tiles", "slides")


@dataclass(frozen=True)
class Parts:
    """What an optimizer step works on."""

    mae: SlideMAE  # unwrapped: parameters, the EMA's source
    model: nn.Module  # as trained: DDP-wrapped, or ``mae`` itself
    ema: SlideEncoder | None  # EMA of the encoder (optim.ema_momentum), exported instead of it
    optimizer: torch.optim.Optimizer
    autocast: AbstractContextManager
    cfg: SlidePretrainConfig

    def checkpoint_parts(self) -> CheckpointParts:
        models: dict[str, nn.Module] = {"model": self.model}
        if self.ema is not None:
            models["ema"] = self.ema
        return CheckpointParts(models=models, buffers={}, optimizer=self.optimizer, optimized="model")


def train(cfg: SlidePretrainConfig, resume: bool | str | None = None) -> dict[str, Any]:
    """Pretrain (or resume) as ``cfg`` says; every process of the launch calls this. Returns a summary.

    ``resume``: None/False starts fresh (error if the output directory already holds checkpoints); True resumes
    from the newest checkpoint there (fresh start if none); a path resumes from that checkpoint.
    """
    with contextlib.ExitStack() as cleanup:
        ctx = open_context(cfg.train, cfg.log.trackers, cleanup)
        source = SlideSource(
            cfg.data.embeddings,
            feature=cfg.data.feature,
            min_tiles=cfg.data.min_tiles_per_slide,
            cache=cfg.data.cache_slides,
        )
        cfg = resolve_config(cfg, source, world=ctx.world)
        if ctx.use_fsdp:
            raise ConfigError(
                "slide pretraining runs DDP (the slide encoder fits one device); launch without an "
                "FSDP accelerate config",
                key="train.parallel",
            )
        checkpoint = resume_point(ctx.out_dir, resume)
        parts = build_parts(ctx, cfg)
        plan, loader = _build_loader(ctx, cfg, source)
        cleanup.callback(loader.close)
        step, nonfinite = _start(ctx, cfg, checkpoint, parts=parts, loader=loader)
        metrics = open_metrics(
            ctx.accelerator,
            ctx.out_dir,
            config=config_to_dict(cfg),
            step=step,
            project_name=cfg.log.project_name,
            resumed_from=checkpoint,
        )
        cleanup.callback(metrics.close)
        guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, total=nonfinite)
        stop = cleanup.enter_context(StopSignals())
        _log_start(ctx, cfg, source=source, loader=loader, parts=parts, checkpoint=checkpoint)
        stop_at = cfg.train.stop_at_step or cfg.train.total_steps
        last_checkpoint = str(checkpoint) if checkpoint else None
        data, clock = iter(loader), _Clock()
        parts.model.train()
        while step < stop_at:
            values = schedule_at(cfg, step)
            apply_schedule(parts.optimizer, values)
            total_masked = step_masked_tiles(
                plan, step, packs_per_step=cfg.train.packs_per_step, mask_ratio=cfg.objective.mask_ratio
            )
            terms = torch.zeros(len(TERMS), dtype=torch.float64, device=ctx.device)
            for micro in range(loader.accum):
                t0 = time.perf_counter()
                pack = next(data).to(ctx.device)
                clock.data_wait_s += time.perf_counter() - t0
                micro_terms, cls = micro_step(
                    parts, pack, total_masked=total_masked, world=ctx.world, sync=micro == loader.accum - 1
                )
                terms += micro_terms
            log_now = (step + 1) % cfg.log.every_steps == 0 or step + 1 == stop_at
            reduced = reduce_step(parts, terms, stop_flag=stop.requested)
            if reduced["finite"]:
                parts.optimizer.step()
                if parts.ema is not None:
                    ema_update_(parts.ema, parts.mae.encoder, values.momentum)
            parts.optimizer.zero_grad(set_to_none=True)
            step += 1
            clock.steps += 1
            record = _record(step, values=values, reduced=reduced, guard=guard, epoch=pack.epoch)
            if parts.ema is None:
                del record["ema_momentum"]
            if log_now:
                record.update(_health(ctx, cls, clock=clock, total=cfg.train.total_steps, record=record))
            metrics.write(record, step)
            guard.update(reduced["finite"], step, last_checkpoint)
            if (
                step % cfg.train.checkpoint_every_steps == 0
                or (step == stop_at and cfg.train.checkpoint_at_end)
                or reduced["stop_requested"]
            ):
                last_checkpoint = _save(ctx, parts, metrics, step=step, loader=loader, guard=guard, source=source)
            if reduced["stop_requested"]:
                log.warning("stop requested by a signal: stopped after step %d with a checkpoint", step)
                break
    return finish_run(
        ctx, total_steps=cfg.train.total_steps, step=step, last_checkpoint=last_checkpoint, nonfinite_total=guard.total
    )


def _log_start(ctx: RunContext, cfg: SlidePretrainConfig, *, source, loader, parts, checkpoint) -> None:
    """One line of what the run trains on and with."""
    log.info(
        "%d slide(s) (%d skipped: fewer than %d tiles), tile embeddings of width %d; %d process(es), %d "
        "packs per step (%d per process); %.1fM encoder parameters%s",
        len(source.slides),
        len(source.skipped),
        cfg.data.min_tiles_per_slide,
        source.dim,
        ctx.world,
        cfg.train.packs_per_step,
        loader.accum,
        sum(p.numel() for p in parts.mae.encoder.parameters()) / 1e6,
        f", resumed from {checkpoint}" if checkpoint else "",
    )


def _build_loader(ctx, cfg: SlidePretrainConfig, source: SlideSource) -> tuple[EpochPlan, SlidePackLoader]:
    """The epoch plan and this process's pack loader (a share of every epoch's packs, ``loader.accum`` per step)."""
    plan = EpochPlan(
        [s.n_tiles for s in source.slides],
        max_tokens_per_slide=cfg.data.max_tokens_per_slide,
        tokens_per_pack=cfg.data.tokens_per_pack,
        seed=cfg.train.seed,
    )
    dataset = PackDataset(
        source,
        plan,
        max_tokens_per_slide=cfg.data.max_tokens_per_slide,
        mask_ratio=cfg.objective.mask_ratio,
        seed=cfg.train.seed,
    )
    loader = SlidePackLoader(
        dataset,
        packs_per_step=cfg.train.packs_per_step,
        rank=ctx.rank,
        world=ctx.world,
        num_workers=cfg.data.num_workers,
    )
    return plan, loader


def resolve_config(cfg: SlidePretrainConfig, source: SlideSource, *, world: int) -> SlidePretrainConfig:
    """The config as the run uses it: ``model.in_dim`` is the stores' tile-embedding width (logged when the YAML
    said otherwise); ConfigError when ``train.packs_per_step`` does not divide over the processes."""
    if cfg.train.packs_per_step % world:
        raise ConfigError(
            f"train.packs_per_step={cfg.train.packs_per_step} is not divisible by the {world} "
            f"processes; choose a multiple of {world}",
            key="train.packs_per_step",
        )
    if cfg.model.in_dim != source.dim:
        log.info(
            "model.in_dim=%d set to %d, the width of the tile embeddings in %s",
            cfg.model.in_dim,
            source.dim,
            source.paths[0],
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_dim=source.dim))
    return cfg


def build_parts(ctx: RunContext, cfg: SlidePretrainConfig) -> Parts:
    """The autoencoder (identical initial weights on every process), its EMA encoder, AdamW (no weight decay on
    biases, norms and tokens: pathdino.train.param_groups), the bf16 autocast."""
    torch.manual_seed(cfg.train.seed)
    o = cfg.objective
    mae = SlideMAE(
        cfg.model, decoder_dim=o.decoder_dim, decoder_depth=o.decoder_depth, decoder_heads=o.decoder_heads
    ).to(ctx.device)
    ema = None
    if cfg.optim.ema_momentum is not None:
        ema = copy.deepcopy(mae.encoder).requires_grad_(False).eval()
    groups = param_groups(
        mae.named_parameters(), cfg.model.depth, layerwise_decay=1.0, patch_embed_lr_mult=1.0, decay_tokens=False
    )
    optimizer = torch.optim.AdamW(
        groups, lr=0.0, betas=tuple(cfg.optim.betas), weight_decay=0.0, fused=ctx.device.type in ("cuda", "cpu")
    )
    model = ctx.accelerator.prepare_model(mae) if ctx.world > 1 else mae  # DDP
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    return Parts(mae=mae, model=model, ema=ema, optimizer=optimizer, autocast=autocast, cfg=cfg)


def schedule_at(cfg: SlidePretrainConfig, step: int) -> ScheduleValues:
    """lr: linear warm-up then cosine to ``min_lr``; weight decay and EMA momentum: cosines over the run."""
    o, total = cfg.optim, cfg.train.total_steps
    return ScheduleValues(
        lr=warmup_cosine(step, o.lr, o.min_lr, total_steps=total, warmup_steps=o.warmup_steps),
        weight_decay=cosine(step, o.weight_decay, o.weight_decay_end, n_steps=total),
        momentum=cosine(step, o.ema_momentum or 0.0, o.ema_momentum_end, n_steps=total),
        teacher_temp=0.0,
        last_layer_frozen=False,
    )


def micro_step(
    parts: Parts, pack: SlidePack, *, total_masked: int, world: int, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one pack; returns its ``TERMS`` and the encoder's slide embeddings (detached).

    The loss is scaled so that the gradients, summed over micro-steps and averaged over processes (DDP), are the
    step's mean over its masked tiles."""
    with gradient_sync(parts.model, enabled=sync):
        with parts.autocast:
            out = parts.model(pack.features, pack.grid_xy, pack.lengths, masked=pack.masked)
        loss_sum, baseline_sum = mae_loss_sums(
            out.pred, pack.features[pack.masked], norm_targets=parts.cfg.objective.norm_targets
        )
        (loss_sum * (world / max(total_masked, 1))).backward()
    counts = [float(pack.masked.sum()), float(pack.lengths.sum()), float(len(pack.lengths))]
    terms = torch.cat(
        [
            torch.stack([loss_sum.detach(), baseline_sum]).double(),
            torch.tensor(counts, dtype=torch.float64, device=loss_sum.device),
        ]
    )
    return terms, out.cls.detach()


def reduce_step(parts: Parts, terms: torch.Tensor, *, stop_flag: bool) -> dict[str, Any]:
    """Clip; agree across processes on the step's terms, whether it is finite and whether to stop (one
    collective, one device -> host copy)."""
    norm = clip_gradients({"model": parts.mae}, parts.cfg.optim.clip_grad)["model"].double()
    bad = (~torch.isfinite(terms[0]) | ~torch.isfinite(norm)).double()
    packed = all_reduce_sum_(torch.cat([terms, bad.view(1), terms.new_tensor([float(stop_flag)])]))
    flat = torch.cat([packed, norm.view(1)]).tolist()
    n = len(TERMS)
    return {
        **dict(zip(TERMS, flat[:n])),
        "finite": flat[n] == 0,
        "stop_requested": flat[n + 1] > 0,
        "grad_norm": flat[n + 2],
    }


# ---- start, logging and checkpointing (no training logic below) -----------------------------------------------


def _start(
    ctx: RunContext, cfg: SlidePretrainConfig, checkpoint: Path | None, *, parts: Parts, loader: SlidePackLoader
) -> tuple[int, int]:
    """Seed this process (dropout, drop path) and load ``checkpoint`` if any; returns (step, non-finite steps)."""
    seed = cfg.train.seed + 1 + ctx.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if checkpoint is None:
        return 0, 0
    state = load_checkpoint(checkpoint, parts.checkpoint_parts())
    if state.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(
            f"{checkpoint} is not a slide-pretraining checkpoint (kind {state.get('kind')!r}); "
            "give a step_* folder of a `pathdino.slide.train` run",
            key="--resume",
        )
    step = state["step"]
    loader.load_state_dict(loader_state_for(state["loader_states"], ctx.rank, ctx.world))
    if not state["rng_restored"]:
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank + 1_000_003 * step)
        log.warning(
            "checkpoint has no RNG state for rank %d (saved with %d processes): reseeded",
            ctx.rank,
            state.get("world_size"),
        )
    if state.get("world_size") != ctx.world:
        log.info("resharded: checkpoint saved with %s processes, resumed with %d", state.get("world_size"), ctx.world)
    changed = config_changes(state.get("config", {}), config_to_dict(cfg), may_change=RESUME_MAY_CHANGE)
    if changed:
        log.warning("config differs from the checkpoint's in %d key(s): %s", len(changed), "; ".join(changed[:8]))
    return step, int(state.get("nonfinite_total", 0))


@dataclass
class _Clock:
    """Wall time, data wait and steps since the last logging step."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    data_wait_s: float = 0.0
    steps: int = 0


def _record(
    step: int, *, values: ScheduleValues, reduced: dict[str, Any], guard: NonFiniteGuard, epoch: int
) -> dict[str, Any]:
    masked = max(reduced["masked_tiles"], 1.0)
    loss, baseline = reduced["loss_sum"] / masked, reduced["baseline_sum"] / masked
    return {
        "step": step,
        "loss": loss,
        "loss_mean_baseline": baseline,
        "loss_vs_baseline": loss / baseline if baseline > 0 else math.nan,
        "lr": values.lr,
        "weight_decay": values.weight_decay,
        "ema_momentum": values.momentum,
        "grad_norm": reduced["grad_norm"],
        "masked_tiles": int(reduced["masked_tiles"]),
        "tiles": int(reduced["tiles"]),
        "slides": int(reduced["slides"]),
        "epoch": epoch,
        "skipped": not reduced["finite"],
        "nonfinite_total": guard.total + (not reduced["finite"]),
    }


def _health(ctx: RunContext, cls: torch.Tensor, *, clock: _Clock, total: int, record: dict[str, Any]) -> dict[str, Any]:
    """Full figures of a logging step: throughput since the last one, memory, the rank of the slide embeddings."""
    elapsed = max(time.perf_counter() - clock.t0, 1e-9)
    out = {
        "steps_per_s": clock.steps / elapsed,
        "tiles_per_s": clock.steps * record["tiles"] / elapsed,
        "data_wait_share": clock.data_wait_s / elapsed,
        "memory_mb": memory_mb(ctx.device),
    }
    if cls.shape[0] >= 2:  # RankMe of this process's last micro-batch of slide embeddings
        out["embedding_rank"] = effective_rank(cls)
    clock.t0, clock.data_wait_s, clock.steps = time.perf_counter(), 0.0, 0
    log.info(
        "step %d/%d loss %.4f (predicting the mean: %.4f) lr %.2e %.0f tiles/s",
        record["step"],
        total,
        record["loss"],
        record["loss_mean_baseline"],
        record["lr"],
        out["tiles_per_s"],
    )
    return out


def _save(
    ctx: RunContext,
    parts: Parts,
    metrics: MetricLogger,
    *,
    step: int,
    loader: SlidePackLoader,
    guard: NonFiniteGuard,
    source: SlideSource,
) -> str:
    """Checkpoint the run at ``step`` (every process takes part); returns its path."""
    trainer_state = {
        "kind": CHECKPOINT_KIND,
        "world_size": ctx.world,
        "nonfinite_total": guard.total,
        "loader_states": gather_loader_states(loader, ctx.world),
        "config": config_to_dict(parts.cfg),
        "tile_encoder": source.encoder,
        "embeddings": list(source.paths),
    }
    path = save_checkpoint(
        ctx.out_dir, step, parts.checkpoint_parts(), trainer_state=trainer_state, keep=parts.cfg.train.keep_checkpoints
    )
    metrics.write({"event": "checkpoint", "step": step, "path": str(path)}, step, to_trackers=False)
    log.info("checkpoint %s", path)
    return str(path)
