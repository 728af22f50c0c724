"""`pathdino tile` end to end: round trip on the real slide, resume, kills, concurrent shards, bad slides."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest

from tests.synthetic import write_pyramid
from tiling.config import TilingConfig
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import TileStore, decode_tile, encode_tile

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
EDGE = Path(__file__).parent / "data" / "slides"


def _pathdino(*args: str, check: bool = False, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pathdino.cli", *args], capture_output=True, text=True, env=env, check=check, timeout=240
    )


def _tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Mirror the sample slide's pixels into a larger image: real tissue texture, any size."""
    with openslide.OpenSlide(str(SAMPLE)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    reps_y, reps_x = -(-height // src.shape[0]), -(-width // src.shape[1]) + 1
    rows = [np.concatenate([src[:, :: (-1) ** c] for c in range(reps_x)], axis=1) for _ in range(reps_y)]
    mosaic = np.concatenate([r[:: (-1) ** i] for i, r in enumerate(rows)], axis=0)
    offset = (seed * 397) % max(1, mosaic.shape[1] - width + 1)
    return np.ascontiguousarray(mosaic[:height, offset : offset + width])


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory) -> Path:
    url = tmp_path_factory.mktemp("run") / "tiles.zarr"
    outcomes = run_tiling(collect_slides([str(SAMPLE)]), str(url), TilingConfig(workers=1))
    assert [o.status for o in outcomes] == ["done"]
    return url


def test_real_slide_round_trip_matches_direct_reads(sample_store):
    store = TileStore(sample_store)
    slide = store.slide("CMU-1-Small-Region")
    attrs = slide.attrs
    assert slide.n_tiles > 20
    assert attrs["read_level"] == 0 and attrs["within_tolerance"] and attrs["slide_mpp"] == pytest.approx(0.499)
    assert attrs["source_fingerprint"].startswith("sha256-3MiB:") and attrs["params_key"]
    coords = slide.coords
    tiles = slide.read_tiles(0, slide.n_tiles)
    with openslide.OpenSlide(str(SAMPLE)) as s:
        for i in np.linspace(0, slide.n_tiles - 1, 8).astype(int):
            x, y = coords[i]
            direct = np.asarray(s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
            # same pixels as a direct read, up to the store's own JPEG q90 encoding (deterministic)
            np.testing.assert_array_equal(tiles[i], decode_tile(encode_tile(direct)), err_msg=f"tile {i} at {x},{y}")
            # q90 with 4:2:0 chroma on this q30-compressed slide's chroma noise: 4-8 grey levels mean abs error
            assert np.abs(tiles[i].astype(int) - direct.astype(int)).mean() < 12.0
    # every tile lies inside the slide, on the grid
    step = attrs["level0_step_px"]
    assert np.allclose(coords / step, np.round(coords / step), atol=1e-6)
    assert (coords >= 0).all() and (coords[:, 0] + 224 <= attrs["level0_width"]).all()
    assert Path(TileStore(sample_store).qc_image_path("CMU-1-Small-Region")).stat().st_size > 1000
    assert not (Path(sample_store) / "qc").exists()  # beside the store, not in its Zarr hierarchy


def test_rerun_skips_and_changed_params_redo(sample_store, tmp_path):
    url = tmp_path / "copy.zarr"
    shutil.copytree(sample_store, url)
    before = TileStore(url).n_tiles("CMU-1-Small-Region")
    again = run_tiling(collect_slides([str(SAMPLE)]), str(url), TilingConfig(workers=1))
    assert [o.status for o in again] == ["skipped"] and again[0].n_tiles == before
    redo = run_tiling(collect_slides([str(SAMPLE)]), str(url), TilingConfig(workers=1, tile_px=112))
    assert [o.status for o in redo] == ["done"]
    assert TileStore(url).slide("CMU-1-Small-Region").tile_px == 112
    forced = run_tiling(collect_slides([str(SAMPLE)]), str(url), TilingConfig(workers=1, tile_px=112), overwrite=True)
    assert [o.status for o in forced] == ["done"]


def test_bad_slides_are_recorded_and_others_go_on(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "good.svs")
    for name in ("unreadable.svs", "unopenable.tiff", "broken.svs", "boxes.tiff"):
        shutil.copy(EDGE / name, folder / name)
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(folder), "--out", str(url), "-j", "2")
    assert result.returncode == 1, result.stderr
    store = TileStore(url)
    assert store.slide_ids == ["good"]
    assert set(store.failures) == {"unreadable", "unopenable", "broken", "boxes"}
    assert "--slide-mpp" in store.failures["boxes"]["reason"]  # the absurd 72-dpi mpp names the override
    assert all(f["traceback"] for f in store.failures.values())
    assert "failed" in result.stderr and "unopenable" in result.stderr
    info = _pathdino("info", str(url), "--json", check=True)
    summary = json.loads(info.stdout)
    assert summary["n_slides"] == 1 and summary["n_failures"] == 4
    # an override fixes the absurd mpp: only that slide is retried and it now succeeds
    result = _pathdino(
        "tile",
        str(folder / "boxes.tiff"),
        "--out",
        str(url),
        "--slide-mpp",
        "0.25",
        "--target-mpp",
        "0.5",
        "--tile-px",
        "32",
        "-j",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "boxes" in TileStore(url).slide_ids and "boxes" not in TileStore(url).failures


def test_downsampled_slide_covers_right_area(tmp_path):
    # 0.25 µm/px single level: tiles at 0.5 µm/px are read at level 0 and downsampled 2x
    image = _tissue_image(1200, 1000)
    path = write_pyramid(tmp_path / "fine.tif", image, downsamples=(1,), mpp=0.25, compression=None)
    url = tmp_path / "tiles.zarr"
    run_tiling(collect_slides([str(path)]), str(url), TilingConfig(workers=1, tile_px=64, encoding="png"))
    slide = TileStore(url).slide("fine")
    assert slide.attrs["scale"] == pytest.approx(2.0) and slide.attrs["level0_tile_px"] == pytest.approx(128)
    tiles = slide.read_tiles(0, slide.n_tiles)
    for i in range(0, slide.n_tiles, max(1, slide.n_tiles // 5)):
        x, y = slide.coords[i]
        expected = image[y : y + 128, x : x + 128].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(tiles[i].astype(float) - expected).mean() < 1.0  # lossless store: only the filter differs


def test_killed_mid_slide_then_rerun_is_complete_and_consistent(tmp_path):
    image = _tissue_image(4000, 3000)
    path = write_pyramid(tmp_path / "big.tif", image, downsamples=(1, 4), mpp=0.5)
    reference = tmp_path / "ref.zarr"
    run_tiling(
        collect_slides([str(path)]),
        str(reference),
        TilingConfig(workers=1, tile_px=64, tiles_per_shard=32, tiles_per_chunk=16),
    )
    ref = TileStore(reference).slide("big")

    url = tmp_path / "tiles.zarr"
    args = ["tile", str(path), "--out", str(url), "--tile-px", "64", "-j", "1", "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text("tiles_per_shard: 32\ntiles_per_chunk: 16\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pathdino.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staging = tmp_path / "tiles.zarr.pathdino" / "staging"
    deadline = time.time() + 120
    # wait until at least one shard of the slide has been written, then kill the run hard
    while time.time() < deadline and proc.poll() is None:
        if staging.exists() and any(staging.glob("*/tiles/c/*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "tiling finished before it could be killed; make the slide bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert TileStore(url).slide_ids == []  # nothing half-written is visible

    result = _pathdino(*args)
    assert result.returncode == 0, result.stderr
    slide = TileStore(url).slide("big")
    assert slide.n_tiles == ref.n_tiles
    np.testing.assert_array_equal(slide.coords, ref.coords)
    assert slide.read_encoded(0, slide.n_tiles) == ref.read_encoded(0, ref.n_tiles)
    assert not any(staging.iterdir())  # the dead run's staging folder was cleaned


def test_two_concurrent_shard_runs_fill_one_store(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(4):
        write_pyramid(folder / f"s{i}.tif", _tissue_image(700, 600, seed=i), downsamples=(1,), mpp=0.5)
    url = tmp_path / "tiles.zarr"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pathdino.cli",
                "tile",
                str(folder),
                "--out",
                str(url),
                "--tile-px",
                "64",
                "-j",
                "1",
                "--shard",
                f"{i}/2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    store = TileStore(url)
    assert store.slide_ids == ["s0", "s1", "s2", "s3"] and store.failures == {}
    # the same tiles as one sequential run
    run_tiling(collect_slides([str(folder)]), str(tmp_path / "seq.zarr"), TilingConfig(workers=1, tile_px=64))
    seq = TileStore(tmp_path / "seq.zarr")
    assert sum(seq.n_tiles(s) for s in seq.slide_ids) > 0
    for sid in seq.slide_ids:
        assert store.slide(sid).read_encoded(0, store.n_tiles(sid)) == seq.slide(sid).read_encoded(0, seq.n_tiles(sid))


def test_tiling_into_an_fsspec_url(tmp_path):
    import fsspec

    url = "memory://pathdino-run/tiles.zarr"
    outcomes = run_tiling(collect_slides([str(SAMPLE)]), url, TilingConfig(workers=1))
    assert [o.status for o in outcomes] == ["done"]
    store = TileStore(url)
    assert store.n_tiles("CMU-1-Small-Region") == outcomes[0].n_tiles > 0
    assert fsspec.filesystem("memory").exists("/pathdino-run/tiles.zarr.pathdino/qc/CMU-1-Small-Region.jpg")


def test_a_killed_worker_fails_the_run_cleanly_and_a_rerun_resumes(tmp_path):
    import psutil

    image = _tissue_image(4000, 3000)
    path = write_pyramid(tmp_path / "big.tif", image, downsamples=(1, 4), mpp=0.5)
    url = tmp_path / "tiles.zarr"
    args = [
        sys.executable,
        "-m",
        "pathdino.cli",
        "tile",
        str(path),
        "--out",
        str(url),
        "--tile-px",
        "64",
        "-j",
        "2",
        "--config",
        str(tmp_path / "c.yaml"),
    ]
    (tmp_path / "c.yaml").write_text("tiles_per_shard: 32\ntiles_per_chunk: 16\n")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((tmp_path / "tiles.zarr.pathdino" / "staging").glob("*/tiles/c/*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "tiling finished before a worker could be killed"
    workers = [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())
    ]
    assert workers, "no worker processes found"
    workers[0].kill()  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    store = TileStore(url)
    assert store.slide_ids == [] and "worker process died" in store.failures["big"]["reason"]
    result = _pathdino(*args[3:])
    assert result.returncode == 0, result.stderr
    assert TileStore(url).n_tiles("big") > 0 and TileStore(url).failures == {}


def test_worker_results_cross_the_pool_pipe_in_atomic_messages_and_match_one_process(tmp_path, monkeypatch):
    # A message over PIPE_BUF (4096 bytes on Linux) can be cut by a worker killed mid-send, and the pool then waits
    # forever for its end (tiling/pool.py). Block results and plans are far bigger: they must travel another way.
    from multiprocessing.connection import Connection

    sizes: list[int] = []
    recv_bytes = Connection._recv_bytes

    def recording(self, maxsize=None):
        buf = recv_bytes(self, maxsize)
        sizes.append(buf.getbuffer().nbytes)
        return buf

    slides = collect_slides([str(SAMPLE)])
    monkeypatch.setattr(Connection, "_recv_bytes", recording)
    pooled = run_tiling(slides, str(tmp_path / "pooled.zarr"), TilingConfig(workers=2, tile_px=64, block_tiles=4))
    monkeypatch.undo()
    inline = run_tiling(slides, str(tmp_path / "inline.zarr"), TilingConfig(workers=1, tile_px=64, block_tiles=4))
    assert [o.status for o in pooled] == ["done"] and pooled[0].n_tiles == inline[0].n_tiles > 16
    assert len(sizes) > 4 and max(sizes) < 4096
    sid = slides[0].slide_id
    a, b = TileStore(tmp_path / "pooled.zarr").slide(sid), TileStore(tmp_path / "inline.zarr").slide(sid)
    assert a.read_encoded(0, a.n_tiles) == b.read_encoded(0, b.n_tiles)
