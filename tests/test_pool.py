"""The spilling process pool: every message a worker sends back is one atomic pipe write, results and exceptions
round-trip intact, and scratch folders never outlive their run."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from tiling import pool
from tiling.errors import SlideError
from tiling.pool import SpillingProcessPool, call_and_spill, unspill

PIPE_BUF = 4096  # Linux: pipe writes up to this size are atomic


def _big(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _fails_in_worker(slide: str) -> None:
    raise SlideError(f"{slide}: cannot be opened " + "x" * 20000)


class _NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str):  # pickle rebuilds exceptions with self.args only: this one cannot be
        super().__init__(f"{a} {b}")


def _raises_unrebuildable() -> None:
    raise _NeedsTwoArgs("first", "second")


class _KilledWhileHandedBack:
    """A big result whose worker is SIGKILLed (as by the OOM killer) `delay_s` after it starts being pickled, i.e.
    while it is pickled or written out."""

    def __init__(self, n_bytes: int, delay_s: float):
        self.n_bytes, self.delay_s = n_bytes, delay_s

    def __reduce__(self):
        threading.Timer(self.delay_s, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return bytes, (b"\x01" * self.n_bytes,)


def _killed_while_handing_back(n_bytes: int, delay_s: float) -> _KilledWhileHandedBack:
    return _KilledWhileHandedBack(n_bytes, delay_s)


@pytest.fixture
def scratch(tmp_path):
    dirs = (str(tmp_path / "shm"), str(tmp_path / "tmp"))
    for d in dirs:
        os.mkdir(d)
    return dirs


def test_small_outcomes_travel_inline_and_big_ones_through_a_file_read_once(scratch):
    small = call_and_spill(scratch, sum, ([1, 2, 3],), {})
    assert isinstance(small, bytes) and len(small) <= pool.INLINE_MAX_BYTES and unspill(small) == 6
    handed = call_and_spill(scratch, _big, (500_000,), {})
    assert isinstance(handed, str) and len(handed) < 300 and Path(handed).parent == Path(scratch[0])
    np.testing.assert_array_equal(unspill(handed), _big(500_000))
    assert not os.listdir(scratch[0])  # read once, then deleted


def test_a_worker_exception_comes_back_with_its_type_message_and_worker_traceback(scratch):
    handed = call_and_spill(scratch, _fails_in_worker, ("slide-7",), {})
    assert isinstance(handed, str)  # too long to travel inline
    with pytest.raises(SlideError, match="slide-7: cannot be opened") as info:
        unspill(handed)
    text = "".join(traceback.format_exception(info.value))
    assert "_fails_in_worker" in text and 'raise SlideError(f"{slide}: cannot be opened' in text
    assert not os.listdir(scratch[0])


def test_an_exception_that_cannot_be_rebuilt_still_names_its_class_and_message(scratch):
    with pytest.raises(RuntimeError, match="_NeedsTwoArgs: first second") as info:
        unspill(call_and_spill(scratch, _raises_unrebuildable, (), {}))
    assert "_raises_unrebuildable" in "".join(traceback.format_exception(info.value))


def test_a_full_scratch_folder_falls_back_to_the_next_and_then_fails_small(scratch, tmp_path):
    missing = str(tmp_path / "gone")  # writing there fails like a full /dev/shm would
    handed = call_and_spill((missing, scratch[1]), _big, (10_000,), {})
    assert Path(handed).parent == Path(scratch[1]) and len(unspill(handed)) == 10_000
    handed = call_and_spill((missing,), _big, (10_000,), {})
    assert isinstance(handed, bytes) and len(handed) <= pool.INLINE_MAX_BYTES
    with pytest.raises(RuntimeError, match="could not hand its result back"):
        unspill(handed)


def test_scratch_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "scratch_roots", lambda: [tmp_path])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_dir = tmp_path / f"{pool.SCRATCH_PREFIX}{int(dead.stdout)}-abc"
    live_dir = tmp_path / f"{pool.SCRATCH_PREFIX}{os.getpid()}-abc"
    other = tmp_path / "someone-elses"
    for d in (dead_dir, live_dir, other):
        d.mkdir()
        (d / "x.pkl").write_bytes(b"x")
    pool.clean_dead_scratch()
    assert not dead_dir.exists() and live_dir.exists() and other.exists()
    made = pool.make_scratch_dirs()
    assert all(Path(d).name.startswith(f"{pool.SCRATCH_PREFIX}{os.getpid()}-") for d in made)


def test_every_message_on_the_result_pipe_is_one_atomic_write_and_scratch_is_removed(monkeypatch):
    sizes: list[int] = []
    recv_bytes = Connection._recv_bytes

    def recording(self, maxsize=None):  # the pool's management thread reads results with this
        buf = recv_bytes(self, maxsize)
        sizes.append(buf.getbuffer().nbytes)
        return buf

    monkeypatch.setattr(Connection, "_recv_bytes", recording)
    executor = SpillingProcessPool(2, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [executor.submit(_big, n) for n in (10, 100_000, 1_000_000)]
        failing = executor.submit(_fails_in_worker, "s1")
        assert [len(f.result(timeout=120)) for f in futures] == [10, 100_000, 1_000_000]
        with pytest.raises(SlideError, match="s1: cannot be opened"):
            failing.result(timeout=120)
    finally:
        executor.shutdown(wait=True)
    assert len(sizes) >= 4 and max(sizes) < PIPE_BUF
    assert not any(Path(d).exists() for d in executor.scratch_dirs)


def test_a_worker_killed_while_handing_back_a_big_result_breaks_the_pool_instead_of_hanging():
    # With a plain ProcessPoolExecutor, kills from ~0.2 s on land mid-send and hang the pool forever (measured on a
    # 2-core Zen 4). Here each run ends, either broken or, when the kill came after the hand-back, with the result.
    outcomes = []
    for delay_s in (0.0, 0.1, 0.25, 0.4):
        executor = SpillingProcessPool(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            future = executor.submit(_killed_while_handing_back, 200_000_000, delay_s)
            exc = future.exception(timeout=120)
            assert exc is None or isinstance(exc, BrokenProcessPool), exc
            outcomes.append(type(exc).__name__)
        finally:
            executor.shutdown(wait=True)
        assert not any(Path(d).exists() for d in executor.scratch_dirs)
    assert "BrokenProcessPool" in outcomes


def test_pickled_outcomes_are_plain_tuples():
    # the main process trusts only this shape; anything else is a bug in call_and_spill
    assert pickle.loads(call_and_spill((), abs, (-2,), {})) == ("result", 2)


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_workers_ignore_sigint_and_terminate_stops_them_mid_task():
    """Ctrl-C reaches the whole process group: the workers must leave it to the parent (no KeyboardInterrupt
    tracebacks), and an interrupted run stops them without waiting for their tasks. `terminate` relies on
    ProcessPoolExecutor's private `_processes` (pid -> Process), pinned here."""
    import time

    p = SpillingProcessPool(2, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [p.submit(_sleep, 60) for _ in range(2)]
        deadline = time.time() + 60
        while time.time() < deadline and len(getattr(p.pool, "_processes", {})) < 2:
            time.sleep(0.05)
        workers = list(p.pool._processes.values())
        assert len(workers) == 2 and all(w.is_alive() for w in workers)
        time.sleep(2)  # let them import and run their initializer
        os.kill(workers[0].pid, signal.SIGINT)
        time.sleep(0.5)
        assert workers[0].is_alive(), "a worker died of SIGINT"
        assert not any(f.done() for f in futures), "a task was interrupted by SIGINT"
        started = time.time()
        p.terminate()
    finally:
        p.shutdown(wait=True, cancel_futures=True)
    assert time.time() - started < 30 and not any(w.is_alive() for w in workers)
    assert all(f.done() for f in futures)
