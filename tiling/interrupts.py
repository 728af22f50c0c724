"""SIGINT (Ctrl-C) and SIGTERM during a tiling run: unwind like an exception, but never in the middle of a commit.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread is, e.g. between renaming a slide
into place and listing it in the index; SIGTERM kills the process without any cleanup. While a run is active both
raise `Interrupted` instead, which the runner turns into stopping the workers, discarding the slides in progress
and saying what was kept; inside `critical()` (changes to the store's index and slide folders) the signal is held
and raised when the section ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by `signum` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class InterruptGuard:
    """Turns SIGINT/SIGTERM into `Interrupted` while `installed()`, held back inside `critical()`."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handlers (main thread only; handlers someone else installed are left alone)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {}
        for signum in _SIGNALS:
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                saved[signum] = signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Hold SIGINT/SIGTERM until the block ends (then raise `Interrupted` if one came)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM in the block (an interrupted run's cleanup must not be cut short by a second Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
