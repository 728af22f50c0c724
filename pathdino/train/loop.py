"""The DINOv2 training loop: ``train(cfg)`` reads top to bottom.

``open_context`` (context.py) starts the processes; ``start_phase`` (run.py) checks the config, finds the resume
point and builds the phase it falls in: its config resolved once, student/teacher, objective, optimizer, schedules
and data; ``start_monitors`` opens the metrics. Each optimizer step then runs ``training_step`` per micro-batch
(teacher targets -> student passes -> DINO + iBOT + KoLeo/KDE -> backward; step.py), ``reduce_step`` (clip; loss
terms, NaN/inf flag, stop request and health agreed by all processes in one collective) and ``apply_update``
(AdamW -> EMA teacher -> teacher centers), then logs and checkpoints with the helpers below. Schedules are
functions of the optimizer step (``schedules.py``); parameter groups carry their multipliers
(``param_groups.py``); checkpoints are full-state and atomic (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from pathdino.train.checkpoint import save_checkpoint
from pathdino.train.config import RunConfig, config_to_dict
from pathdino.train.context import RunContext, finish_run, open_context
from pathdino.train.health import memory_mb
from pathdino.train.host import StopSignals
from pathdino.train.loader import Loader, close_loader, gather_loader_states, loader_stats
from pathdino.train.param_groups import apply_schedule
from pathdino.train.probe import probe_metrics
from pathdino.train.run import Monitors, Phase, start_monitors, start_phase, switch_phase
from pathdino.train.schedules import ScheduleValues
from pathdino.train.step import (
    HEALTH_TERMS,
    LOSS_TERMS,
    ReducedStep,
    apply_update,
    reduce_step,
    refresh_gram_teacher,
    training_step,
)

__all__ = ["HEALTH_TERMS", "LOSS_TERMS", "train"]

log = logging.getLogger("pathdino.train")


def train(cfg: RunConfig, resume: bool | str | None = None, loader: Loader | None = None) -> dict[str, Any]:
    """Train (or resume) as ``cfg`` says; every process of the launch calls this. Returns a summary.

    ``resume``: None/False starts fresh (error if the output directory already holds checkpoints); True resumes
    from the newest checkpoint there (fresh start if none); a path resumes from that checkpoint. ``loader``
    replaces the tile-store loader (any ``pathdino.train.loader.Loader``), e.g. for tests.
    """
    with contextlib.ExitStack() as cleanup:  # undoes what the run changed in this process, however it ends
        ctx = open_context(cfg.train, cfg.log.trackers, cleanup)
        phase, progress = start_phase(ctx, cfg, resume=resume, loader=loader)
        cleanup.callback(close_loader, phase.loader)  # stop data workers now rather than at garbage collection
        monitors = start_monitors(ctx, cfg, progress, cleanup=cleanup)
        cleanup.push(lambda *exc: _end_trackers_on_error(ctx, exc[0]))
        stop = cleanup.enter_context(StopSignals())
        stop_at = cfg.train.stop_at_step or cfg.train.total_steps
        step, last_checkpoint = progress.step, str(progress.checkpoint) if progress.checkpoint else None
        data = iter(phase.loader)
        phase.parts.model.train()
        phase.parts.teacher.eval()
        stopped_early = False
        if step == 0:  # the initial teacher: the baseline (and the first best) of the run's probes
            probed = probe_metrics(monitors.probe, 0, phase.parts.teacher)
            if probed:  # process 0 holds the scores
                monitors.metrics.write({"step": 0, **probed}, 0)
            _keep_best(ctx, phase, monitors, step=0, record=probed)
        while step < stop_at:
            values = phase.schedules.at(step)
            apply_schedule(phase.parts.optimizer, values)
            if values.gram_refresh:  # loss.gram: the Gram teacher becomes a copy of the EMA teacher
                refresh_gram_teacher(phase.parts)
            log_now = (step + 1) % cfg.log.every_steps == 0 or step + 1 == stop_at
            accum = phase.cfg.train.grad_accum_steps
            terms = None
            outputs = []
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(data).to(ctx.device)
                phase.throughput.add_data_wait(time.perf_counter() - t0)
                out = training_step(phase.parts, batch, values, sync=micro == accum - 1)
                part = out.terms.float() / accum
                terms = part if terms is None else terms + part
                outputs.append(out)
            reduced = reduce_step(
                phase.parts, terms, outputs[-1], values=values, with_health=log_now, stop_flag=stop.requested
            )
            apply_update(phase.parts, outputs, values=values, finite=reduced.finite)
            step += 1
            phase.throughput.step_done()

            record = _log_step(ctx, phase, monitors, step=step, values=values, reduced=reduced, full=log_now)
            _keep_best(ctx, phase, monitors, step=step, record=record)
            monitors.guard.update(reduced.finite, step, last_checkpoint)  # raises after too many in a row
            # A new phase starts from a checkpoint of the step before it, exactly as a resume there would.
            switch = phase.end_step <= step < stop_at
            if (
                step % cfg.train.checkpoint_every_steps == 0
                or (step == stop_at and cfg.train.checkpoint_at_end)
                or reduced.stop_requested
                or switch
            ):
                last_checkpoint = _save(ctx, phase, monitors, step=step)
            if reduced.stop_requested:
                log.warning("stop requested by a signal: stopped after step %d with a checkpoint", step)
                stopped_early = True
                break
            if switch:
                index, old_loader = phase.index + 1, phase.loader
                del phase  # the old phase's models are freed before the next phase's are built
                phase = switch_phase(ctx, cfg, index=index, checkpoint=Path(last_checkpoint), old_loader=old_loader)
                cleanup.callback(close_loader, phase.loader)
                monitors.metrics.write(
                    {
                        "event": "phase",
                        "step": step,
                        "phase": phase.index,
                        "global_crop_px": phase.plan.global_px,
                        "local_crop_px": phase.plan.local_px,
                        "batch_size": phase.cfg.train.batch_size,
                    },
                    step,
                    to_trackers=False,
                )
                data = iter(phase.loader)
                phase.parts.model.train()
    return _finish(
        ctx,
        cfg,
        step=step,
        last_checkpoint=last_checkpoint,
        stopped_early=stopped_early,
        nonfinite_total=monitors.guard.total,
    )


def _end_trackers_on_error(ctx: RunContext, error: type[BaseException] | None) -> bool:
    if error is not None:
        with contextlib.suppress(Exception):
            ctx.accelerator.end_training()  # flush the trackers before the error propagates
    return False  # the error, if any, propagates


# ---- logging and checkpointing (no training logic below) -------------------------------------------------------


def _log_step(
    ctx: RunContext,
    phase: Phase,
    monitors: Monitors,
    *,
    step: int,
    values: ScheduleValues,
    reduced: ReducedStep,
    full: bool,
) -> dict[str, Any]:
    """Write the step's record (losses, schedules, grad norms; health, throughput and data figures if ``full``;
    probe scores when probed) and return it."""
    world, parts = ctx.world, phase.parts
    record: dict[str, Any] = {"step": step}
    record.update({k: v / world for k, v in zip(LOSS_TERMS, reduced.terms)})
    record.update(
        lr=values.lr,
        weight_decay=values.weight_decay,
        momentum=values.momentum,
        teacher_temp=values.teacher_temp,
        last_layer_frozen=values.last_layer_frozen,
        backbone_lr_mult=values.backbone_lr_mult,
        grad_norm=reduced.grad_norm,
        skipped=not reduced.finite,
        nonfinite_total=monitors.guard.total + (not reduced.finite),
    )
    record.update({f"grad_norm_{k}": v for k, v in reduced.grad_norms.items()})
    if full:
        record.update({k: v / world for k, v in zip(HEALTH_TERMS, reduced.health)})
        record["center_norm_dino"] = parts.losses["dino"].targets.center.norm().item()
        record["center_norm_ibot"] = parts.losses["ibot"].targets.center.norm().item()
        per_process = step * phase.batch_per_process * phase.cfg.train.grad_accum_steps  # samples so far, this process
        record["epoch"] = per_process / max(phase.loader.samples_per_epoch or 1, 1)  # samples_per_epoch: per process
        record.update(phase.throughput.summary())
        record["memory_mb"] = memory_mb(ctx.device)
        record.update({f"data_{k}": v for k, v in loader_stats(phase.loader).items()})
        record["collapse_warning"] = monitors.collapse.check(step, record)
        log.info(
            "step %d/%d loss %.4f (dino %.4f + %.4f, ibot %.4f, %s %.4f) lr %.2e %.1f img/s%s",
            step,
            phase.cfg.train.total_steps,
            record["loss"],
            record["dino_global"],
            record["dino_local"],
            record["ibot"],
            phase.cfg.loss.uniformity,
            record["uniformity"],
            values.lr,
            record["images_per_s"],
            f" MFU {record['mfu']:.1%}" if "mfu" in record else "",
        )
    record.update(probe_metrics(monitors.probe, step, parts.teacher))  # every process calls it; {} off its period
    monitors.metrics.write(record, step)
    return record


def _keep_best(ctx: RunContext, phase: Phase, monitors: Monitors, *, step: int, record: dict[str, Any]) -> None:
    """After a probe: the best score so far (a warning if it fell well below it, health.ProbeMonitor), and with
    ``eval.probe.keep_best`` the checkpoint of a new best in ``checkpoints/best`` (every process takes part).

    Step 0's probe (the initial teacher) sets the bar but is not saved: gathering an optimizer that has no state
    yet makes torch create it with a zero-lr step, which would shift AdamW's step count and change the run. So
    ``checkpoints/best`` holds a trained step that beat the initial teacher, or does not exist."""
    probe = monitors.probe
    if probe is None or not probe.new_best(step, record) or not probe.cfg.keep_best or step == 0:
        return
    path = _save(ctx, phase, monitors, step=step, name="best")
    log.info(
        "new best probe score: %s %.3f at step %d, kept in %s", probe.cfg.metric, probe.best.best or 0.0, step, path
    )


def _save(ctx: RunContext, phase: Phase, monitors: Monitors, *, step: int, name: str | None = None) -> str:
    """Checkpoint the run at ``step`` (every process takes part; ``name``: ``checkpoints/<name>`` rather than
    ``step_*``); returns the checkpoint's path."""
    trainer_state = {
        "world_size": ctx.world,
        "batch_size": phase.cfg.train.batch_size,
        "nonfinite_total": monitors.guard.total,
        "collapse_best": monitors.collapse.best,
        "loader_states": gather_loader_states(phase.loader, ctx.world),
        # The config in effect for these weights (a phase's crops, img_size and batch): export reads it.
        "config": config_to_dict(phase.cfg),
        "phase": phase.index,
        "probe_best": monitors.probe.best.state() if monitors.probe is not None else {},
    }
    if phase.parts.distill is not None:  # the teacher's path and weights hash, never its weights
        trainer_state["distill_teacher"] = phase.parts.distill.record()
    path = save_checkpoint(
        ctx.out_dir,
        step,
        phase.parts.checkpoint_parts(),
        trainer_state=trainer_state,
        keep=phase.cfg.train.keep_checkpoints,
        name=name,
    )
    event = {"event": "checkpoint", "step": step, "path": str(path)}
    if name is not None and monitors.probe is not None:
        event.update(kept=name, metric=monitors.probe.cfg.metric, value=monitors.probe.best.best)
    monitors.metrics.write(event, step, to_trackers=False)
    log.info("checkpoint %s", path)
    return str(path)


def _finish(
    ctx: RunContext,
    cfg: RunConfig,
    *,
    step: int,
    last_checkpoint: str | None,
    stopped_early: bool,
    nonfinite_total: int,
) -> dict[str, Any]:
    """:func:`finish_run`, and whether a signal stopped the run before ``train.total_steps``."""
    summary = finish_run(
        ctx,
        total_steps=cfg.train.total_steps,
        step=step,
        last_checkpoint=last_checkpoint,
        nonfinite_total=nonfinite_total,
    )
    return {**summary, "stopped_early": stopped_early}
