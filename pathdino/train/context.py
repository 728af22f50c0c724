"""The process-wide part of a run: the processes (accelerate), where the run writes, how it is parallel.

``open_context`` builds a ``RunContext`` once per ``train`` call, before any model: it starts accelerate, checks
that a multi-process launch really forms one job, sets up logging and tunes the CPU runtime, registering every
undo on the caller's ``ExitStack``. It reads only the ``train`` and ``log`` sections, so another trainer (a slide
encoder) starts its processes the same way.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from pathdino.train.distributed import check_launch, make_accelerator, use_fsdp
from pathdino.train.host import tune_cpu_runtime
from pathdino.train.logs import default_trackers, setup_logging
from tiling.fsio import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator


class RuntimeSettings(Protocol):
    """The fields of a trainer's ``train`` section that ``open_context`` reads (``pathdino.train.config.TrainConfig``,
    ``pathdino.slide.train_config.SlideTrainConfig``): same names, same meaning."""

    output_dir: str
    precision: str
    parallel: str
    cpu_flush_denormal: bool
    cpu_reuse_freed_memory: bool


@dataclass(frozen=True)
class RunContext:
    """What every phase of a run shares in this process; built once by ``open_context``."""

    accelerator: Accelerator
    device: torch.device
    rank: int  # this process, in [0, world)
    world: int  # processes in the job
    is_main: bool  # the process that writes metrics, config.yaml and done.json
    use_fsdp: bool  # FSDP2-sharded models (else DDP across processes, or a single process)
    out_dir: Path  # train.output_dir


def open_context(train: RuntimeSettings, trackers: list[str] | None, cleanup: contextlib.ExitStack) -> RunContext:
    """Start accelerate for ``train`` (precision, output_dir, parallel, CPU settings) with ``trackers``
    (``log.trackers``); what this changes in the process is undone when ``cleanup`` closes."""
    out_dir = Path(train.output_dir)
    accelerator = make_accelerator(train.precision, str(out_dir), default_trackers(trackers))
    check_launch(accelerator)
    cleanup.callback(tune_cpu_runtime(accelerator.device, train.cpu_flush_denormal, train.cpu_reuse_freed_memory))
    setup_logging(accelerator.is_main_process)
    return RunContext(
        accelerator=accelerator,
        device=accelerator.device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        is_main=accelerator.is_main_process,
        use_fsdp=use_fsdp(train.parallel, accelerator),
        out_dir=out_dir,
    )


def finish_run(
    ctx: RunContext, *, total_steps: int, step: int, last_checkpoint: str | None, nonfinite_total: int
) -> dict[str, object]:
    """End any trainer's run: the done/stopped event in metrics.jsonl, done.json (atomically) when ``step`` reached
    ``total_steps``, every process waiting for the others, tracker shutdown. Returns the run's summary."""
    done = step >= total_steps
    if ctx.is_main:
        event = {
            "event": "done" if done else "stopped",
            "step": step,
            "checkpoint": last_checkpoint,
            "nonfinite_total": nonfinite_total,
        }
        with open(ctx.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
        if done:
            atomic_write_text(ctx.out_dir / "done.json", json.dumps(event))
    ctx.accelerator.wait_for_everyone()
    ctx.accelerator.end_training()
    return {"step": step, "checkpoint": last_checkpoint, "nonfinite_total": nonfinite_total, "done": done}
