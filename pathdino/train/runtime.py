"""Run bookkeeping for the training loop: resume point, loader construction and state, metric-log truncation,
trackers, logging, stop signals. No training logic lives here (see loop.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pathdino.train.checkpoint import latest_checkpoint, list_checkpoints
from pathdino.train.config import RunConfig
from tiling.configio import ConfigError
from tiling.fsio import atomic_write_text

log = logging.getLogger("pathdino.train")


def build_loader(cfg: RunConfig, plan: Any, batch_per_process: int, rank: int, world: int, device: torch.device):
    patch = cfg.model.backbone.patch_size
    if cfg.train.synthetic_data:
        from pathdino.train.synthetic import SyntheticLoader

        low, high = cfg.masks.mask_ratio
        return SyntheticLoader(plan.n_global, plan.global_px, plan.n_local, plan.local_px, patch, batch_per_process,
                               rank, cfg.train.seed, plan.mask_probability, low, high, device,
                               world_size=world)
    from pathdino.data import build_train_loader

    return build_train_loader(cfg.data, cfg.augment, cfg.masks, patch_size=patch,
                              batch_size_per_process=batch_per_process, rank=rank, world_size=world,
                              seed=cfg.train.seed, device=device)


# What torch.compile's inductor backend may call to build its kernels (C++ on CPUs; Triton's launcher on GPUs).
_COMPILERS = ("g++", "c++", "clang++", "gcc", "cc", "clang")


def check_compiler() -> None:
    """Raise ConfigError naming ``train.compile`` when no C/C++ compiler can be found, before any model is built:
    inductor would otherwise fail inside the first training step with a long traceback."""
    named = [os.environ[v] for v in ("CXX", "CC") if os.environ.get(v)]
    if any(shutil.which(c.split()[0]) for c in named) or any(shutil.which(c) for c in _COMPILERS):
        return
    raise ConfigError("train.compile=true: torch.compile builds its kernels with a C/C++ compiler, and none was "
                      f"found ({', '.join(_COMPILERS)} on PATH, or $CXX / $CC): install one (e.g. "
                      "`apt install g++`) or set train.compile=false")


# glibc mallopt parameters and their defaults (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def tune_cpu_runtime(device: torch.device, flush_denormal: bool, reuse_freed_memory: bool) -> Callable[[], None]:
    """CPU runs: flush denormals to zero and/or keep freed memory for reuse (``train.cpu_flush_denormal``,
    ``train.cpu_reuse_freed_memory``). Returns a function that undoes what was switched on.

    Flushing sets the calling thread's FP state, which threads started later (the intra-op pool, on first use)
    inherit; called before the models are built, so the pool usually is started after it. Reusing freed memory
    tells glibc's malloc never to serve large blocks by mmap and never to give freed memory back: otherwise every
    large tensor (65,536-prototype logits are ~360 MB a step) is fresh pages, and page faults, costly in VMs, are
    paid on every allocation. Resident memory then stays at the step's peak, as with a caching allocator.
    """
    undo: list[Callable[[], None]] = []
    if device.type == "cpu" and flush_denormal and torch.set_flush_denormal(True):
        undo.append(lambda: torch.set_flush_denormal(False))
    if device.type == "cpu" and reuse_freed_memory and sys.platform.startswith("linux"):
        libc = _glibc()
        if libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            undo.append(lambda: (libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX),
                                 libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)))

    def restore() -> None:
        for fn in undo:
            fn()
    return restore


def _glibc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS)
        return None


def gather_loader_states(loader: Any, world: int) -> list[Any]:
    state = loader.state_dict()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def loader_state_for(states: list[Any], rank: int, world: int) -> Any:
    """This process's saved loader state: its own rank's with the same number of processes, else rank 0's.

    ``TrainLoader`` states are identical on every rank and hold the old layout, from which the loader itself
    continues under a new world size (pathdino.data.loader); per-rank states are kept for loaders that differ.
    """
    if len(states) == world:
        return states[rank]
    return states[0]


def resume_point(out_dir: Path, resume: bool | str | None) -> Path | None:
    if resume is None or resume is False:
        found = list_checkpoints(out_dir)
        if found:
            raise ConfigError(
                f"{out_dir} already holds checkpoints (newest: {found[-1][1].name}); pass --resume to continue "
                "that run, or set train.output_dir to a new directory")
        return None
    if resume is True or resume == "latest":
        latest = latest_checkpoint(out_dir)
        if latest is None:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", out_dir)
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {path}: no such checkpoint directory")
    return path


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


def trackers(requested: list[str] | None) -> list[str]:
    import importlib.util

    if requested is not None:
        return list(requested)
    found = []
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        found.append("tensorboard")
    if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        found.append("wandb")
    return found


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs, ignoring keys that may legitimately change on resume."""
    ignore = {"train.output_dir", "train.stop_at_step", "train.checkpoint_every_steps", "train.keep_checkpoints",
              "train.checkpoint_at_end", "log.trackers", "log.every_steps", "data.num_workers"}
    old, new = flat_config(saved), flat_config(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)]


def setup_logging(is_main: bool) -> None:
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


_STOP = {"flag": False, "previous": {}}


def install_stop_handlers():
    """SIGTERM / SIGUSR1 (cluster preemption) -> finish the step, checkpoint, stop. Main thread only."""
    import threading

    _STOP["flag"] = False
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):  # noqa: ARG001
            _STOP["flag"] = True
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            _STOP["previous"][sig] = signal.signal(sig, handler)
    return lambda: _STOP["flag"]


def restore_stop_handlers() -> None:
    for sig, previous in _STOP["previous"].items():
        signal.signal(sig, previous)
    _STOP["previous"] = {}
