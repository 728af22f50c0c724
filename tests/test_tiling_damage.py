"""Damaged or odd slides never cost data silently: replaced files, corrupt source tiles, tiny slides, empty and
truncated files, raw library warnings, and values that pass validation only to fail every slide."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tifffile

from tests.synthetic import corrupt_source_tile, tissue_image, write_pyramid
from tiling.config import TilingConfig
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import TileStore, local_root, summarise

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


def _pathdino(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pathdino.cli", *args], capture_output=True, text=True, env=env, timeout=240
    )


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    """Three copies of one 1536x1024 tissue pyramid (levels 1, 4; 256-px JPEG tiles; tissue on the right half): clean,
    one level-0 source tile under tissue garbled, and the thumbnail level's first source tile garbled."""
    folder = tmp_path_factory.mktemp("damaged")
    image = tissue_image(1536, 1024)
    paths = {
        name: write_pyramid(folder / f"{name}.tif", image, downsamples=(1, 4), mpp=0.5)
        for name in ("clean", "level0", "thumb")
    }
    corrupt_source_tile(paths["level0"], 0, 5)  # level 0, top row, last column: under tissue
    corrupt_source_tile(paths["thumb"], 2, 0)  # page 1 is the Aperio thumbnail, page 2 is level 1 (2 µm/px)
    return paths


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_replaced_slide_that_now_fails_keeps_no_old_tiles(tmp_path, overwrite):
    slide = tmp_path / "slides" / "case.svs"
    slide.parent.mkdir()
    shutil.copy(SAMPLE, slide)
    url = tmp_path / "tiles.zarr"
    cfg = TilingConfig(workers=1, tile_px=112)
    assert [o.status for o in run_tiling(collect_slides([str(slide)]), str(url), cfg)] == ["done"]
    slide.write_bytes(b"this is not a slide any more " * 100)  # replaced in place by an unreadable file
    outcomes = run_tiling(collect_slides([str(slide)]), str(url), cfg, overwrite=overwrite)
    assert [o.status for o in outcomes] == ["failed"]
    store = TileStore(url)
    assert store.slide_ids == [] and set(store.failures) == {"case"}  # failed, not served
    assert store.failures["case"]["replaced_committed"] is True
    assert not (local_root(url) / "slides" / "case").exists()  # the old tiles are gone, not just unlisted
    assert summarise(store)["n_slides"] == 0 and summarise(store)["n_failures"] == 1


def test_decode_failures_are_counted_shown_and_capped(tmp_path, damaged):
    url = tmp_path / "tiles.zarr"
    clean = run_tiling(
        collect_slides([str(damaged["clean"])]), str(tmp_path / "clean.zarr"), TilingConfig(workers=1, tile_px=64)
    )[0]
    result = _pathdino("tile", str(damaged["level0"]), "--out", str(url), "--tile-px", "64", "-j", "1")
    assert result.returncode == 0, result.stderr
    attrs = TileStore(url).slide("level0").attrs
    lost = attrs["n_decode_failures"]
    assert lost >= 1 and "JPEG" in attrs["decode_error"]
    assert attrs["n_candidates"] == clean.n_candidates  # the lost tiles were candidates, not QC rejections
    assert attrs["n_tiles"] + lost + sum(attrs["n_rejected"].values()) == attrs["n_candidates"]
    assert f"unreadable {lost}" in result.stderr  # in the slide's row of the summary
    assert "could not be read" in result.stderr  # and in the totals
    info = _pathdino("info", str(url))
    assert info.returncode == 0 and "unreadable" in info.stdout and "could not be read" in info.stdout
    as_json = json.loads(_pathdino("info", str(url), "--json").stdout)
    assert as_json["slides"]["level0"]["n_decode_failures"] == lost == as_json["n_decode_failures"]
    # a stricter threshold re-checks the complete slide, fails it, and stops serving its tiles
    strict = _pathdino(
        "tile",
        str(damaged["level0"]),
        "--out",
        str(url),
        "--tile-px",
        "64",
        "-j",
        "1",
        "--max-decode-failure-fraction",
        "0",
    )
    assert strict.returncode == 1, strict.stderr
    store = TileStore(url)
    assert store.slide_ids == [] and store.failures["level0"]["error_type"] == "DecodeFailuresError"
    assert "could not be read" in store.failures["level0"]["reason"]
    assert "--max-decode-failure-fraction" in store.failures["level0"]["reason"]


def test_a_bad_tile_in_the_thumbnail_level_falls_back_instead_of_failing_the_slide(tmp_path, damaged):
    url = tmp_path / "tiles.zarr"
    result = _pathdino(
        "tile", str(damaged["clean"]), str(damaged["thumb"]), "--out", str(url), "--tile-px", "64", "-j", "1"
    )
    assert result.returncode == 0, result.stderr
    store = TileStore(url)
    assert store.slide_ids == ["clean", "thumb"] and store.failures == {}
    fallbacks = store.slide("thumb").attrs["thumbnail_fallbacks"]
    assert fallbacks and "read from level 0 instead" in fallbacks[0]
    assert "thumbnail level 1" in result.stderr  # said during the run, too
    # level 0 is intact: the same tissue is found and tiled
    assert abs(store.n_tiles("thumb") - store.n_tiles("clean")) <= 0.05 * store.n_tiles("clean")


def test_a_slide_smaller_than_one_tile_says_so(tmp_path):
    tiny = write_pyramid(
        tmp_path / "tiny.tif", tissue_image(1200, 1000)[400:416, 600:616], downsamples=(1,), mpp=0.5, tile=16
    )
    outcomes = run_tiling(collect_slides([str(tiny)]), str(tmp_path / "a.zarr"), TilingConfig(workers=1))
    assert [o.status for o in outcomes] == ["empty"]
    assert outcomes[0].reason.startswith("slide smaller than one tile: 16 x 16 px")
    assert "224 px" in outcomes[0].reason and "no tissue" not in outcomes[0].reason
    # the same for a tile bigger than the slide (--tile-px 100000 from the issue, scaled down)
    big_tile = run_tiling(
        collect_slides([str(SAMPLE)]), str(tmp_path / "b.zarr"), TilingConfig(workers=1, tile_px=4000)
    )
    assert big_tile[0].status == "empty" and "smaller than one tile" in big_tile[0].reason
    assert TileStore(tmp_path / "b.zarr").slide("CMU-1-Small-Region").attrs["empty_reason"] == big_tile[0].reason


def test_a_16px_dicom_and_the_16px_edge_case_svs_are_smaller_than_one_tile(tmp_path):
    from tests.synthetic_dicom import write_dicom_wsi

    write_dicom_wsi(tmp_path / "in" / "tiny" / "l0.dcm", tissue_image(1200, 1000)[400:416, 600:616], tile_px=16)
    inputs = [str(tmp_path / "in")]
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "edge-cases" / "small.svs"
    if shared.is_file():  # the real 16 x 16 Aperio crop, where ../shared is present
        inputs.append(str(shared))
    outcomes = run_tiling(collect_slides(inputs), str(tmp_path / "t.zarr"), TilingConfig(workers=1))
    assert len(outcomes) == len(inputs)
    for o in outcomes:
        assert o.status == "empty" and o.reason.startswith("slide smaller than one tile: 16 x 16 px"), o


def test_empty_and_truncated_files_say_what_is_wrong(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "empty.svs").write_bytes(b"")
    data = SAMPLE.read_bytes()
    (folder / "cut_header.svs").write_bytes(data[:30_000])  # its directories are at the end of the file
    (folder / "cut_tail.svs").write_bytes(data[:1_300_000])  # level 0 intact, the later directories cut off
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(folder), "--out", str(url), "-j", "1")
    assert result.returncode == 1
    failures = TileStore(url).failures
    assert "the file is empty (0 bytes)" in failures["empty"]["reason"]
    for sid in ("cut_header", "cut_tail"):
        assert failures[sid]["error_type"] == "FileCheckError"
        assert "the file is truncated" in failures[sid]["reason"] and "copy it again" in failures[sid]["reason"]
    reasons = " ".join(f["reason"] for f in failures.values())
    assert "header=b''" not in reasons and "IndexError" not in reasons
    assert "tifffile" not in result.stderr  # no raw library warnings


def test_library_warnings_go_to_the_slide_record_not_stderr(tmp_path):
    slide = write_pyramid(tmp_path / "odd.tif", tissue_image(1200, 1000), downsamples=(1,), mpp=0.5)
    with tifffile.TiffFile(slide) as tif:
        entry = tif.pages[0].tags[270].offset  # ImageDescription's directory entry
    data = bytearray(slide.read_bytes())
    struct.pack_into("<I", data, entry + 8, len(data) + 1000)  # its value now points past the end: tifffile warns
    slide.write_bytes(bytes(data))
    url = tmp_path / "tiles.zarr"
    # two workers: the slide is planned in this process and its blocks are read in the workers
    result = _pathdino("tile", str(slide), "--out", str(url), "--slide-mpp", "0.5", "-j", "2")
    assert result.returncode == 0, result.stderr
    assert "TiffTag" not in result.stderr and "tifffile" not in result.stderr
    assert any("invalid value offset" in w for w in TileStore(url).slide("odd").attrs["reader_warnings"])


def test_values_that_would_fail_every_slide_are_refused_up_front(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pathdino.cli.main import app

    out = str(tmp_path / "t.zarr")
    for flags, named in (
        (["--target-mpp", "inf"], "target_mpp"),
        (["--target-mpp", "nan"], "target_mpp"),
        (["--slide-mpp", "0"], "--slide-mpp"),
        (["--slide-mpp", "inf"], "--slide-mpp"),
    ):
        result = CliRunner().invoke(app, ["tile", str(SAMPLE), "--out", out, *flags])
        assert result.exit_code == 2 and named in result.stderr, (flags, result.stderr)
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    result = CliRunner().invoke(app, ["tile", str(SAMPLE), "--out", out])
    assert result.exit_code == 2 and "SLURM_ARRAY_TASK_ID='abc'" in result.stderr
    assert not Path(out).exists()  # refused before anything was written
