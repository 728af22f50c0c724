"""Where a run reports: Python logging (once, from the main process), ``metrics.jsonl`` and accelerate's trackers.

``open_metrics`` starts a run's metrics: ``config.yaml``, ``metrics.jsonl`` cut back to the resume point (so the
log matches the run), the trackers and the start/resume event. Nothing here knows the model or the objective.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tiling.fsio import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator


def setup_logging(is_main: bool) -> None:
    """One handler on the ``pathdino`` logger; INFO from the main process, warnings (errors for training messages,
    which every process would repeat) from the others."""
    logger = logging.getLogger("pathdino")
    if not any(getattr(h, "_pathdino", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._pathdino = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    # Training messages are the same on every process (metrics are all-reduced): print them once.
    logging.getLogger("pathdino.train").setLevel(logging.INFO if is_main else logging.ERROR)


def default_trackers(requested: list[str] | None) -> list[str]:
    """``log.trackers`` as given, or (None) tensorboard if installed plus wandb if installed and configured."""
    if requested is not None:
        return list(requested)
    found = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        found.append("tensorboard")
    if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


class MetricLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and forwards scalars to accelerate's trackers.

    Only the main process writes. Values are written with full precision (exact-resume checks compare them).
    """

    def __init__(self, path: Path, accelerator: Accelerator | None, enabled: bool) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = enabled
        self._fh = open(path, "a", buffering=1) if enabled else None  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any], step: int, to_trackers: bool = True) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        if to_trackers and self.accelerator is not None and self.accelerator.trackers:
            scalars = {
                k: v
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (the resume point; 0 = start a new log), so the log matches the run."""
    if not path.exists():
        return
    kept = []
    if step > 0:
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def flat_config(d: dict[str, Any], prefix: str = "", *, raw: bool = False) -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``: trackers' hyperparameters, where anything but a number,
    string or bool becomes a string; with ``raw`` the values as they are (config diffs, where None must stay None)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}.", raw=raw))
        else:
            out[key] = v if raw or isinstance(v, (int, float, str, bool)) else str(v)
    return out


def open_metrics(
    accelerator: Accelerator,
    out_dir: Path,
    *,
    config: dict[str, Any],
    step: int,
    project_name: str,
    resumed_from: Path | None,
) -> MetricLogger:
    """config.yaml, metrics.jsonl cut back to ``step`` (the resume point), trackers, and the start/resume event."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        truncate_metrics(out_dir / "metrics.jsonl", step)
    accelerator.wait_for_everyone()
    metrics = MetricLogger(out_dir / "metrics.jsonl", accelerator, enabled=accelerator.is_main_process)
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(project_name, config=flat_config(config))
    metrics.write(
        {
            "event": "resume" if resumed_from else "start",
            "step": step,
            "world_size": accelerator.num_processes,
            "checkpoint": str(resumed_from) if resumed_from else None,
        },
        step,
        to_trackers=False,
    )
    return metrics
