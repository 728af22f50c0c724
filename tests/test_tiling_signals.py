"""Stopping `pathdino tile`: Ctrl-C and SIGTERM say what was kept and exit 130/143 without worker tracebacks; a parent
killed outright (SIGKILL, the OOM killer) takes its workers and resource tracker with it, so `| tee log` ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.synthetic import tissue_image, write_pyramid
from tiling.store import TileStore

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc")


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("signals")
    slide = write_pyramid(folder / "big.tif", tissue_image(4000, 3000), downsamples=(1, 4), mpp=0.5)
    config = folder / "c.yaml"  # small blocks and shards: many tasks, so the run is caught mid-slide
    config.write_text("tiles_per_shard: 16\ntiles_per_chunk: 16\nblock_tiles: 2\n")
    return slide, config


def _start(slide: Path, config: Path, url: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start a 2-worker run in its own process group (as a shell job is) and wait until it is mid-slide;
    returns the process and its descendants (workers, resource tracker)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pathdino.cli",
            "tile",
            str(slide),
            "--out",
            str(url),
            "-j",
            "2",
            "--tile-px",
            "64",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    staging = Path(f"{url}.pathdino") / "staging"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if staging.is_dir() and any(staging.glob("*/tiles/c/*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be stopped: make the slide bigger"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3, [c.cmdline() for c in children]  # two workers and the resource tracker
    return proc, children


def _gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies, not yet reaped by init, count as exited); returns the rest."""
    deadline = time.time() + timeout_s
    alive = list(procs)
    while alive and time.time() < deadline:
        still = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.NoSuchProcess:
                pass
        alive = still
        time.sleep(0.05)
    return alive


def test_killing_only_the_parent_stops_workers_and_tracker_and_ends_the_pipe(tmp_path, big_slide):
    proc, children = _start(*big_slide, tmp_path / "tiles.zarr")
    os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
    proc.wait()
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    reader.join(timeout=20)  # `pathdino tile ... | tee log`: EOF only once every holder of the pipe is gone
    assert not reader.is_alive(), "the output pipe stayed open after the parent died"
    alive = _gone(children, timeout_s=10)
    assert not alive, f"still running after the parent died: {[p.cmdline() for p in alive]}"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_say_what_was_kept_and_rerunning_resumes(tmp_path, big_slide, signum, code):
    url = tmp_path / "tiles.zarr"
    proc, children = _start(*big_slide, url)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C in a terminal reaches the whole process group, workers included
    else:
        proc.send_signal(signum)  # SIGTERM from a scheduler or `kill PID`: the parent only
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert f"interrupted ({signal.Signals(signum).name})" in out and "rerun the same command to resume" in out
    assert "1 partial" in out and "Traceback" not in out and "KeyboardInterrupt" not in out
    assert not _gone(children, timeout_s=10)
    assert TileStore(url).slide_ids == [] and TileStore(url).failures == {}  # nothing half-written, no failure
    staging = Path(f"{url}.pathdino") / "staging"
    assert not any(staging.iterdir())  # the slide in progress was discarded, lease included
    if signum != signal.SIGINT:
        return  # resuming is the same either way: checked once
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathdino.cli",
            "tile",
            str(big_slide[0]),
            "--out",
            str(url),
            "-j",
            "1",
            "--tile-px",
            "64",
            "--config",
            str(big_slide[1]),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert TileStore(url).n_tiles("big") > 0
