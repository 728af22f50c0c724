"""Several hosts tiling one store: a run never removes another host's (or a live writer's) staging; stale staging is
reclaimed only when provably dead (same host and pid gone, or lease expired); commits refuse reclaimed staging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import tissue_image, write_pyramid
from tiling import staging
from tiling.config import TilingConfig
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import StoreError, TileStore, encode_tile
from tiling.store_write import TileStoreWriter

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"

# Runs `pathdino tile` as if on another machine: another host name, and a pid that means nothing here (a dead one).
# Each block is slowed down so that the run is still mid-slide when this host's run starts.
_OTHER_HOST = textwrap.dedent("""
    import os, socket, sys, time
    dead_pid = int(sys.argv[1])
    socket.gethostname = lambda: "simulated-other-host"
    os.getpid = lambda: dead_pid
    import tiling.runner
    real_tile_block = tiling.runner.tile_block
    def slow_tile_block(*args, **kwargs):
        time.sleep(0.15)
        return real_tile_block(*args, **kwargs)
    tiling.runner.tile_block = slow_tile_block
    from pathdino.cli.main import app
    app(sys.argv[2:])
""")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tiles(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_tile(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _check_readable(url: Path, slide_id: str) -> int:
    """Every tile of the slide decodes and has coordinates; returns the number of tiles."""
    slide = TileStore(url).slide(slide_id)
    assert slide.n_tiles > 0
    tiles = slide.read_tiles(0, slide.n_tiles)  # raises on a missing shard (b"" does not decode)
    assert tiles.shape[0] == slide.n_tiles == len(slide.coords) == len(slide.tissue_fraction)
    return slide.n_tiles


def test_staging_names_carry_host_and_pid_and_policy_reclaims_only_the_provably_dead(tmp_path):
    root = tmp_path / "staging"
    root.mkdir()
    me, other = staging.host_id(), "0123456789ab"
    dead = _dead_pid()
    assert me != other and len(me) == 12
    name = staging.staging_name("a.b-c")  # slide ids may contain dots
    assert staging.parse_staging_name(name) == staging.StagingOwner("a.b-c", me, os.getpid())
    folders = {
        "mine_alive": root / f"s1.{me}-{os.getpid()}.0000aaaa",
        "mine_dead": root / f"s2.{me}-{dead}.0000bbbb",
        "other_fresh": root / f"s3.{other}-{os.getpid()}.0000cccc",  # its pid may be anything: not ours to judge
        "other_dead_pid_fresh": root / f"s4.{other}-{dead}.0000dddd",
        "other_expired": root / f"s5.{other}-{dead}.0000eeee",
        "not_staging": root / "notes",
    }
    for key, folder in folders.items():
        folder.mkdir()
        if key != "not_staging":
            folder.with_name(folder.name + staging.LEASE_SUFFIX).write_text("{}")
    expired = folders["other_expired"].with_name(folders["other_expired"].name + staging.LEASE_SUFFIX)
    old = time.time() - staging.LEASE_S - 60
    os.utime(expired, (old, old))
    now = staging.staging_clock(root)
    verdict = {key: staging.is_reclaimable(folder, now=now) for key, folder in folders.items()}
    assert verdict == {
        "mine_alive": False,
        "mine_dead": True,
        "other_fresh": False,
        "other_dead_pid_fresh": False,
        "other_expired": True,
        "not_staging": False,
    }


def test_clean_stale_staging_removes_only_what_it_may(tmp_path):
    url = tmp_path / "t.zarr"
    writer = TileStoreWriter(url)
    root = Path(writer.sidecar) / "staging"
    root.mkdir(exist_ok=True)
    dead = _dead_pid()
    keep = root / f"s1.0123456789ab-{dead}.0000aaaa"  # another host, lease fresh: a live writer elsewhere
    gone = root / f"s2.{staging.host_id()}-{dead}.0000bbbb"  # this host, process gone
    for folder in (keep, gone):
        (folder / "tiles" / "c").mkdir(parents=True)
        (folder / "tiles" / "c" / "0").write_bytes(b"x")
        folder.with_name(folder.name + ".lease").write_text("{}")
    removed = writer.clean_stale_staging()
    assert removed == [gone.name]
    assert keep.exists() and keep.with_name(keep.name + ".lease").exists()
    assert not gone.exists() and not gone.with_name(gone.name + ".lease").exists()
    # the same folder once its lease has lapsed (its writer died or hung for LEASE_S): reclaimed
    lease = keep.with_name(keep.name + ".lease")
    os.utime(lease, (time.time() - staging.LEASE_S - 5,) * 2)
    assert writer.clean_stale_staging() == [keep.name] and not keep.exists() and not lease.exists()


def test_the_heartbeat_renews_leases_and_a_reclaimed_slide_is_never_committed(tmp_path):
    url = tmp_path / "t.zarr"
    writer = TileStoreWriter(url)
    sw = writer.begin_slide("s1", 32, tiles_per_shard=16, tiles_per_chunk=16)
    lease = Path(sw._final_key + staging.LEASE_SUFFIX)
    record = json.loads(lease.read_text())
    assert record["host_id"] == staging.host_id() and record["pid"] == os.getpid()
    os.utime(lease, (time.time() - 100,) * 2)
    staging.renew_leases_now()
    assert time.time() - lease.stat().st_mtime < 30
    sw.add(_tiles(40), np.zeros((40, 2)), np.ones(40))  # two full shards written
    # another run reclaims the staging (as if this process had hung past the lease), then this one goes on
    shutil.rmtree(sw._final_key)
    lease.unlink()
    staging.renew_leases_now()
    sw.add(_tiles(8), np.zeros((8, 2)), np.ones(8))
    with pytest.raises(StoreError, match="cannot be committed"):
        sw.commit({"source_path": "x"})
    assert TileStore(url).slide_ids == []  # nothing half-written became visible


def test_two_hosts_tiling_one_store_both_finish_complete_and_readable(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(slides / "big.tif", tissue_image(2000, 1500), downsamples=(1, 4), mpp=0.5)
    url = tmp_path / "tiles.zarr"
    config = tmp_path / "c.yaml"
    config.write_text("tiles_per_shard: 16\ntiles_per_chunk: 16\nblock_tiles: 4\n")
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _OTHER_HOST,
            str(_dead_pid()),
            "tile",
            str(slides / "big.tif"),
            "--out",
            str(url),
            "--tile-px",
            "64",
            "-j",
            "1",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging_root = tmp_path / "tiles.zarr.pathdino" / "staging"
    deadline = time.time() + 120
    while time.time() < deadline and other.poll() is None:  # wait until the other host is mid-slide
        if staging_root.exists() and any(staging_root.glob("big.*/tiles/c/*")):
            break
        time.sleep(0.02)
    assert other.poll() is None, "the other host finished before this one started: slow its blocks down more"
    # this host starts a run into the same store while the other one writes
    mine = run_tiling(collect_slides([str(SAMPLE)]), str(url), TilingConfig(workers=1, tile_px=64))
    assert [o.status for o in mine] == ["done"]
    assert other.poll() is None, "the other host finished before this one's run ended: slow its blocks down more"
    _, err = other.communicate(timeout=240)
    assert other.returncode == 0, err
    store = TileStore(url)
    assert store.slide_ids == ["CMU-1-Small-Region", "big"] and store.failures == {}
    for sid in store.slide_ids:
        _check_readable(url, sid)
    info = subprocess.run(
        [sys.executable, "-m", "pathdino.cli", "info", str(url), "--json"], capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["n_slides"] == 2
    assert not any(staging_root.iterdir())  # both writers cleaned up after themselves


def test_a_pid_namespace_is_another_host():
    """Containers with their own PID namespace on one machine cannot judge each other's pids: distinct host ids."""
    probe = [sys.executable, "-c", "from tiling.staging import host_id; print(host_id())"]
    try:
        inside = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", *probe],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if inside.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {inside.stderr.strip()[:200]}")
    outside = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=True)
    assert inside.stdout.strip() != outside.stdout.strip() == staging.host_id()
