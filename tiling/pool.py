"""A process pool whose workers hand results back through scratch files, so a killed worker cannot hang the run.

Why: `concurrent.futures.ProcessPoolExecutor` (CPython 3.11, `_ExecutorManagerThread.wait_result_broken_or_wakeup`)
reads every result from one pipe shared by all workers, with a blocking `recv()`. A pipe write is atomic only up to
PIPE_BUF (4096 bytes on Linux) and multiprocessing writes a message over 16 KiB as header, then payload; a worker
killed (OOM killer) in the middle of a big message leaves part of it in the pipe, and `recv()` then waits forever
for the rest: the parent holds the pipe's write end too, so EOF never comes, and the dead worker's sentinel is never
looked at again. Here each worker pickles its outcome (the result, or the exception with its formatted traceback)
and sends back either those bytes, when they are far below PIPE_BUF, or the path of a scratch file holding them,
written atomically. Every message on the pipe is then one atomic write: a killed worker is seen as a
BrokenProcessPool, never as a hang.

The scratch files use pickle: they are private to one run on one machine (written by its own workers, read once and
deleted by the process that spawned them), never shared or kept. They live in a RAM-backed folder when there is one
(`/dev/shm`), else in the temporary folder; the folder carries the main process's id, is removed at shutdown, and
folders of processes that died before removing theirs are removed by the next pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from tiling.fsio import pid_alive

SCRATCH_PREFIX = "pathdino-tiling-"
# Outcomes up to this size travel inline in the pool's own message (which adds ~150 bytes), far below PIPE_BUF.
INLINE_MAX_BYTES = 2048
_MAX_TEXT_CHARS = 500  # of an error message that must travel inline


class RemoteTraceback(Exception):
    """The worker-side traceback, attached as `__cause__` of a re-raised worker exception (as concurrent.futures
    does), so failure records show where in the worker it went wrong."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def scratch_roots() -> list[Path]:
    """Where scratch folders go, best first: `/dev/shm` (RAM) when usable, then the temporary folder."""
    roots = [Path("/dev/shm")] if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK) else []
    return roots + [Path(tempfile.gettempdir())]


def make_scratch_dirs() -> tuple[str, ...]:
    """Fresh scratch folders (one per root) named after this process; a worker falls back to the next when one is
    full (a container's /dev/shm is often only 64 MB)."""
    dirs = []
    for root in scratch_roots():
        with contextlib.suppress(OSError):
            dirs.append(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))
    if not dirs:
        raise OSError(
            f"cannot create a scratch folder for worker results in any of "
            f"{', '.join(map(str, scratch_roots()))}: make one of them writable (or set TMPDIR)"
        )
    return tuple(dirs)


def clean_dead_scratch() -> None:
    """Remove scratch folders left by pools of processes that are gone (killed before their shutdown ran)."""
    for root in scratch_roots():
        with contextlib.suppress(OSError):
            for path in root.glob(f"{SCRATCH_PREFIX}*-*"):
                pid = path.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)


def _short_error(message: str) -> bytes:
    exc = RuntimeError(message[:_MAX_TEXT_CHARS])
    return pickle.dumps(("error", exc, f"RuntimeError: {exc}\n"))


def _pickled_outcome(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    try:
        outcome: tuple = ("result", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the main process, which re-raises it
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        exc.__traceback__ = None  # its frames may hold big arrays
        try:
            pickle.loads(pickle.dumps(exc))  # some exception classes cannot be rebuilt: check it here, not there
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        outcome = ("error", exc, tb)
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - an unpicklable result is a bug, reported as that task's failure
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return pickle.dumps(("error", RuntimeError(f"the worker's result could not be pickled: {exc}"), tb))


def _write_atomic(dirs: tuple[str, ...], data: bytes) -> str:
    errors = []
    for folder in dirs:
        part = ""
        try:
            fd, part = tempfile.mkstemp(dir=folder, suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            done = part[: -len(".part")] + ".pkl"
            os.replace(part, done)  # a worker killed before this leaves only a .part, never read as a result
            return done
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
            if part:
                with contextlib.suppress(OSError):
                    os.unlink(part)
    raise OSError("; ".join(errors))


def call_and_spill(dirs: tuple[str, ...], fn: Callable, args: tuple, kwargs: dict) -> bytes | str:
    """Worker side: run `fn`, return its pickled outcome if small, else the path of a scratch file holding it.

    Never raises: whatever goes back through the pool's pipe stays far below PIPE_BUF.
    """
    data = _pickled_outcome(fn, args, kwargs)
    if len(data) <= INLINE_MAX_BYTES:
        return data
    try:
        return _write_atomic(dirs, data)
    except BaseException as exc:  # noqa: BLE001 - e.g. every scratch folder full
        return _short_error(f"a worker could not hand its result back (scratch folders full?): {exc}")


def _read_outcome(handed: bytes | str) -> tuple[bool, Any]:
    """(True, result) or (False, the worker's exception with its traceback attached), deleting the scratch file."""
    if isinstance(handed, str):
        try:
            data = Path(handed).read_bytes()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(handed)
    else:
        data = handed
    try:
        outcome = pickle.loads(data)
    except Exception as exc:  # noqa: BLE001
        where = handed if isinstance(handed, str) else "inline"
        failure = RuntimeError(f"a worker's result could not be read back ({where}): {type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        return False, failure
    if outcome[0] == "error":
        exc = outcome[1]
        exc.__cause__ = RemoteTraceback(f'\n"""\n{outcome[2]}"""')
        return False, exc
    return True, outcome[1]


def unspill(handed: bytes | str) -> Any:
    """Main side: the result `call_and_spill` handed back, reading and deleting its scratch file; re-raises the
    worker's exception with the worker's traceback as its cause."""
    ok, value = _read_outcome(handed)
    if not ok:
        raise value
    return value


def _hand_over(outer: cf.Future, inner: cf.Future) -> None:
    # Runs in the pool's management thread: it must settle `outer` whatever happens, or its waiter would hang.
    try:
        if inner.cancelled():
            outer.cancel()
            outer.set_running_or_notify_cancel()
            return
        exc = inner.exception()
        if exc is not None:
            outer.set_exception(exc)  # BrokenProcessPool and the like: the pool's own failures
            return
        ok, value = _read_outcome(inner.result())
        if ok:
            outer.set_result(value)
        else:
            outer.set_exception(value)  # not raised here: the failure record shows the worker's traceback only
    except BaseException as exc:  # noqa: BLE001
        outer.set_exception(exc)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_POLL_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the process that started it dies, however it dies (SIGKILL, the OOM killer).

    Orphaned workers would otherwise go on for minutes, each holding ~100 MB and the terminal's stdout, so that
    `pathdino tile ... | tee log` never ends. Linux: the kernel sends SIGKILL on the parent's death
    (prctl PR_SET_PDEATHSIG); elsewhere a thread checks the parent id every second.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="pathdino-parent-watch", daemon=True).start()


def init_worker(parent_pid: int) -> None:
    """Run first in every worker: Ctrl-C is the parent's to handle (it stops the workers itself, so a terminal's
    SIGINT to the whole process group prints no worker tracebacks), and the worker dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


class SpillingProcessPool(cf.Executor):
    """A `ProcessPoolExecutor` whose tasks hand results back through `call_and_spill` (see the module docstring).

    Its workers ignore SIGINT and die with the parent (`init_worker`); `terminate` stops them at once.
    """

    def __init__(self, n_workers: int, mp_context: Any = None):
        clean_dead_scratch()
        self.scratch_dirs = make_scratch_dirs()
        self.pool = cf.ProcessPoolExecutor(
            n_workers, mp_context=mp_context, initializer=init_worker, initargs=(os.getpid(),)
        )

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        outer: cf.Future = cf.Future()
        inner = self.pool.submit(call_and_spill, self.scratch_dirs, fn, args, kwargs)
        inner.add_done_callback(functools.partial(_hand_over, outer))
        return outer

    def terminate(self) -> None:
        """Stop every worker now (SIGTERM), abandoning running tasks: for an interrupted run, which would otherwise
        wait for the plans and blocks in flight. `shutdown` is still needed afterwards."""
        # ProcessPoolExecutor has no public way to do this before Python 3.14 (terminate_workers); `_processes`
        # (pid -> Process) has been there since 3.2, pinned by tests/test_pool.py.
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.terminate()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        try:
            self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        finally:
            if wait:  # no worker writes any more; what is left was never read (a worker killed after writing it)
                for folder in self.scratch_dirs:
                    shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "SpillingProcessPool",
    "RemoteTraceback",
    "call_and_spill",
    "unspill",
    "clean_dead_scratch",
    "make_scratch_dirs",
    "scratch_roots",
    "INLINE_MAX_BYTES",
]
