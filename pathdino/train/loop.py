"""The DINOv2 training loop: ``train(cfg)`` reads top to bottom.

``build_run`` (run.py) sets up processes, student/teacher, objective, optimizer, data and the resume point; each
optimizer step then runs ``training_step`` per micro-batch (teacher targets -> student passes -> DINO + iBOT +
KoLeo/KDE -> backward; step.py), ``reduce_step`` (clip; loss terms, NaN/inf flag, stop request and health agreed by
all processes in one collective) and ``apply_update`` (AdamW -> EMA teacher -> teacher centers), then logs and
checkpoints with the helpers below. Schedules are functions of the optimizer step (``schedules.py``); parameter
groups carry their multipliers (``param_groups.py``); checkpoints are full-state and atomic (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pathdino.train.checkpoint import save_checkpoint
from pathdino.train.config import RunConfig, config_to_dict
from pathdino.train.health import memory_mb
from pathdino.train.param_groups import apply_schedule
from pathdino.train.phases import phase_at
from pathdino.train.probe import probe_metrics
from pathdino.train.run import Run, build_run, switch_phase
from pathdino.train.runtime import gather_loader_states, install_stop_handlers, restore_stop_handlers
from pathdino.train.schedules import ScheduleValues
from pathdino.train.step import HEALTH_TERMS, LOSS_TERMS, ReducedStep, apply_update, reduce_step, training_step
from pathdino.train.step import _clip_gradients  # noqa: F401  (its home before the split; old imports keep working)
from tiling.fsio import atomic_write_text

__all__ = ["HEALTH_TERMS", "LOSS_TERMS", "train"]

log = logging.getLogger("pathdino.train")


def train(cfg: RunConfig, resume: bool | str | None = None, loader: Any = None) -> dict[str, Any]:
    """Train (or resume) as ``cfg`` says; every process of the launch calls this. Returns a summary.

    ``resume``: None/False starts fresh (error if the output directory already holds checkpoints); True resumes
    from the newest checkpoint there (fresh start if none); a path resumes from that checkpoint. ``loader``
    replaces the tile-store loader (anything with the ``TrainLoader`` contract), e.g. for tests.
    """
    run = build_run(cfg, resume, loader)
    tc = cfg.train
    stop_requested = install_stop_handlers()
    try:  # from here on, the finally below undoes what build_run and the stop handlers changed
        stop_at = tc.stop_at_step or tc.total_steps
        last_checkpoint = str(run.resume_from) if run.resume_from else None
        data_iter = iter(run.loader)
        run.model.train()
        run.teacher.eval()
        stopped_early = False
        if run.step == 0 and (probed := probe_metrics(run.probe, 0, run.teacher)):  # the initial teacher: baseline
            run.metrics.write({"step": 0, **probed}, 0)
        while run.step < stop_at:
            values = run.schedules.at(run.step)
            apply_schedule(run.optimizer, values)
            log_now = (run.step + 1) % cfg.log.every_steps == 0 or run.step + 1 == stop_at
            terms = None
            outputs = []
            for micro in range(run.cfg.train.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(data_iter).to(run.device)
                run.throughput.add_data_wait(time.perf_counter() - t0)
                out = training_step(run, batch, values, sync=micro == run.cfg.train.grad_accum_steps - 1)
                part = out.terms.float() / run.cfg.train.grad_accum_steps
                terms = part if terms is None else terms + part
                outputs.append(out)
            reduced = reduce_step(run, terms, outputs[-1], values, log_now, stop_requested())
            apply_update(run, values, reduced.finite, outputs)
            run.step += 1
            run.throughput.step_done()

            _log_step(run, values, reduced, log_now)
            run.guard.update(reduced.finite, run.step, last_checkpoint)  # raises after too many in a row
            # A new phase starts from a checkpoint of the step before it, exactly as a resume there would.
            switch = run.step < stop_at and phase_at(cfg, run.step) != run.phase
            if (run.step % tc.checkpoint_every_steps == 0 or (run.step == stop_at and tc.checkpoint_at_end)
                    or reduced.stop_requested or switch):
                last_checkpoint = _save(run)
            if reduced.stop_requested:
                log.warning("stop requested by a signal: stopped after step %d with a checkpoint", run.step)
                stopped_early = True
                break
            if switch:
                run = switch_phase(run, Path(last_checkpoint))
                run.metrics.write({"event": "phase", "step": run.step, "phase": run.phase,
                                   "global_crop_px": run.plan.global_px, "local_crop_px": run.plan.local_px,
                                   "batch_size": run.cfg.train.batch_size}, run.step, to_trackers=False)
                data_iter = iter(run.loader)
                run.model.train()
    except BaseException:
        with contextlib.suppress(Exception):
            run.accelerator.end_training()  # flush the trackers before the error propagates
        raise
    finally:
        restore_stop_handlers()
        run.restore_cpu_runtime()  # leave the caller's process as it was
        run.metrics.close()
        if hasattr(run.loader, "close"):
            run.loader.close()  # stop data workers now rather than at garbage collection
    return _finish(run, last_checkpoint, stopped_early)


# ---- logging and checkpointing (no training logic below) -------------------------------------------------------

def _log_step(run: Run, values: ScheduleValues, reduced: ReducedStep, full: bool) -> None:
    """Write the step's record (losses, schedules, grad norms; health, throughput and data figures if ``full``)."""
    cfg, step, world = run.cfg, run.step, run.world
    record: dict[str, Any] = {"step": step}
    record.update({k: v / world for k, v in zip(LOSS_TERMS, reduced.terms)})
    record.update(lr=values.lr, weight_decay=values.weight_decay, momentum=values.momentum,
                  teacher_temp=values.teacher_temp, last_layer_frozen=values.last_layer_frozen,
                  grad_norm=reduced.grad_norm, skipped=not reduced.finite,
                  nonfinite_total=run.guard.total + (not reduced.finite))
    record.update({f"grad_norm_{k}": v for k, v in reduced.grad_norms.items()})
    if full:
        record.update({k: v / world for k, v in zip(HEALTH_TERMS, reduced.health)})
        record["center_norm_dino"] = run.losses["dino"].targets.center.norm().item()
        record["center_norm_ibot"] = run.losses["ibot"].targets.center.norm().item()
        per_process = step * run.batch_per_process * cfg.train.grad_accum_steps  # samples_per_epoch: per process
        record["epoch"] = per_process / max(getattr(run.loader, "samples_per_epoch", 0) or 1, 1)
        record.update(run.throughput.summary())
        record["memory_mb"] = memory_mb(run.device)
        record.update({f"data_{k}": v for k, v in getattr(run.loader, "stats", {}).items()})
        record["collapse_warning"] = run.collapse.check(step, record)
        log.info("step %d/%d loss %.4f (dino %.4f + %.4f, ibot %.4f, %s %.4f) lr %.2e %.1f img/s%s",
                 step, cfg.train.total_steps, record["loss"], record["dino_global"], record["dino_local"],
                 record["ibot"], cfg.loss.uniformity, record["uniformity"], values.lr, record["images_per_s"],
                 f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
    record.update(probe_metrics(run.probe, step, run.teacher))  # every process calls it; {} off its period
    run.metrics.write(record, step)


def _save(run: Run) -> str:
    """Checkpoint the run at its current step (every process takes part); returns the checkpoint's path."""
    tc = run.cfg.train
    trainer_state = {
        "world_size": run.world, "batch_size": tc.batch_size, "nonfinite_total": run.guard.total,
        "collapse_best": run.collapse.best, "loader_states": gather_loader_states(run.loader, run.world),
        # The config in effect for these weights (a phase's crops, img_size and batch): export reads it.
        "config": config_to_dict(run.cfg), "phase": run.phase,
    }
    path = save_checkpoint(run.out_dir, run.step, run.model, run.teacher, run.losses, run.optimizer, trainer_state,
                           tc.keep_checkpoints)
    run.metrics.write({"event": "checkpoint", "step": run.step, "path": str(path)}, run.step, to_trackers=False)
    log.info("checkpoint %s", path)
    return str(path)


def _finish(run: Run, last_checkpoint: str | None, stopped_early: bool) -> dict[str, Any]:
    """The done/stopped event, done.json (atomically) for a completed run, tracker shutdown; the summary."""
    done = run.step >= run.cfg.train.total_steps
    if run.is_main:
        event = {"event": "done" if done else "stopped", "step": run.step, "checkpoint": last_checkpoint,
                 "nonfinite_total": run.guard.total}
        with open(run.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
        if done:
            atomic_write_text(run.out_dir / "done.json", json.dumps(event))
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return {"step": run.step, "checkpoint": last_checkpoint, "nonfinite_total": run.guard.total, "done": done,
            "stopped_early": stopped_early}
