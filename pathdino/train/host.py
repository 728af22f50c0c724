"""What a run changes in, or needs from, the process it runs in: CPU settings, stop signals, a C/C++ compiler.

Each change comes with its undo (``tune_cpu_runtime`` returns one, ``StopSignals`` is a context manager), so a run
that ends, fails or is interrupted leaves the caller's process as it was (``train`` registers them on one
``ExitStack``). Nothing here knows the model or the objective.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import torch

from tiling.configio import ConfigError

# What torch.compile's inductor backend may call to build its kernels (C++ on CPUs; Triton's launcher on GPUs).
_COMPILERS = ("g++", "c++", "clang++", "gcc", "cc", "clang")


def check_compiler() -> None:
    """Raise ConfigError naming ``train.compile`` when no C/C++ compiler can be found, before any model is built:
    inductor would otherwise fail inside the first training step with a long traceback."""
    named = [os.environ[v] for v in ("CXX", "CC") if os.environ.get(v)]
    if any(shutil.which(c.split()[0]) for c in named) or any(shutil.which(c) for c in _COMPILERS):
        return
    raise ConfigError(
        "train.compile=true: torch.compile builds its kernels with a C/C++ compiler, and none was "
        f"found ({', '.join(_COMPILERS)} on PATH, or $CXX / $CC): install one (e.g. "
        "`apt install g++`) or set train.compile=false"
    )


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
            undo.append(
                lambda: (
                    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX),
                    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD),
                )
            )

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


class StopSignals:
    """SIGTERM / SIGUSR1 (cluster preemption) and a first Ctrl-C (SIGINT) set ``requested``: the loop finishes the
    step, checkpoints, stops. A second Ctrl-C raises KeyboardInterrupt at once (the last checkpoint stays).

    A context manager: the handlers are installed on entry (from the main thread only; elsewhere none are and
    ``requested`` stays False) and the previous ones restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._owner_pid = os.getpid()

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - the signal module's signature
        if os.getpid() != self._owner_pid:
            # a DataLoader worker forked while the handlers are installed, before its init ignores the signals: the
            # training process alone acknowledges and counts a signal
            return
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            # Set before the message: a second Ctrl-C can run this handler again while the first is still printing
            # (Python handlers nest), and it must find the first one counted.
            self.requested = True
            if os.environ.get("RANK", "0") == "0":
                print(
                    "\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
