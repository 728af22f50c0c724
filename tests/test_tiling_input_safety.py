"""Awkward input trees and output paths: FIFOs, symlinks, colliding slide ids, and --out values that would
misbehave, each handled before any work with a clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathdino.cli.main import app
from tiling.inputs import scan_inputs, select_shard

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _skips(scan) -> dict[str, str]:
    return {f.path.name: f.reason for f in scan.skipped}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_fifo_in_the_input_tree_is_skipped_never_opened(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "good.svs")
    os.mkfifo(folder / "pipe")  # no suffix: looks_like_dicom would have opened it
    os.mkfifo(folder / "fake.svs")  # a slide's suffix
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "also.dcm")
    scan = scan_inputs([str(folder)])
    assert [s.slide_id for s in scan.slides] == ["good"]
    assert {k: v for k, v in _skips(scan).items()} == {
        "pipe": "not a regular file",
        "fake.svs": "not a regular file",
        "also.dcm": "not a regular file",
    }
    assert all("FIFO" in f.describe() for f in scan.skipped)
    url = tmp_path / "tiles.zarr"
    env = {**os.environ, "COLUMNS": "200"}
    for extra in (["--dry-run"], ["-j", "1"], []):  # the run itself too, and a FIFO named on the command line
        args = [str(folder), *([str(folder / "fake.svs")] if not extra else []), "--out", str(url), *extra]
        result = subprocess.run(
            [sys.executable, "-m", "pathdino.cli", "tile", *args], capture_output=True, text=True, env=env, timeout=120
        )  # the old code blocked here forever
        assert result.returncode == 0, result.stderr
        assert "not a regular file" in result.stderr and "fake.svs" in result.stderr


def test_symlinks_followed_once_deduplicated_and_broken_ones_named(tmp_path):
    archive = tmp_path / "archive"
    _touch(archive / "a.svs")
    _touch(archive / "deep" / "b.ndpi")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "a.svs").symlink_to(archive / "a.svs")  # a file link whose target is also an input: one slide
    (cohort / "case-b.ndpi").symlink_to(archive / "deep" / "b.ndpi")  # only reached through the link
    (cohort / "linked").symlink_to(archive / "deep", target_is_directory=True)  # a symlinked folder: followed
    (cohort / "loop").symlink_to(cohort, target_is_directory=True)  # leads back up: not walked forever
    (cohort / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    (cohort / "self.svs").symlink_to(cohort / "self.svs")
    scan = scan_inputs([str(archive / "a.svs"), str(cohort)])
    by_id = {s.slide_id: s.path for s in scan.slides}
    # a.svs once (the real file kept); b.ndpi once although reachable as cohort/case-b.ndpi and cohort/linked/b.ndpi
    assert sorted(by_id) == ["a", "b"]  # the path that is not itself a link wins: cohort/linked/b.ndpi
    assert by_id["a"] == archive / "a.svs"
    skips = _skips(scan)
    assert skips["gone.svs"] == "a dangling symlink" and skips["self.svs"] == "a symlink loop"
    assert skips["loop"].startswith("a folder already searched")
    assert skips["a.svs"].startswith("the same file as another input")
    assert "unknown extension" not in skips.values()
    # the symlinked folder is searched (alone, it yields its slide)
    assert [s.slide_id for s in scan_inputs([str(cohort / "linked")]).slides] == ["b"]


def test_colliding_ids_get_deterministic_suffixes_and_a_warning(tmp_path):
    _touch(tmp_path / "a" / "slide.svs")
    _touch(tmp_path / "b" / "slide.svs")
    _touch(tmp_path / "c" / "X.svs")
    _touch(tmp_path / "c" / "X.ome.tif")
    _touch(tmp_path / "c" / "other.svs")
    scan = scan_inputs([str(tmp_path)])
    ids = {str(s.path.relative_to(tmp_path)): s.slide_id for s in scan.slides}
    assert ids["c/other.svs"] == "other"  # ids that do not collide are unchanged
    for name in ("a/slide.svs", "b/slide.svs"):
        assert ids[name].startswith("slide-") and len(ids[name]) == len("slide-") + 8
    assert ids["c/X.svs"].startswith("X-") and ids["c/X.ome.tif"].startswith("X-")
    assert len(set(ids.values())) == 5
    assert {s.source_id for s in scan.slides if s.slide_id != "other"} == {"slide", "X"}
    assert len(scan.notes) == 2 and all("->" in n for n in scan.notes)
    # the same ids from another mount point and another input order: every machine of a --shard run agrees
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    again = scan_inputs([str(moved / "c"), str(moved / "b"), str(moved / "a")])
    assert {str(s.path.relative_to(moved)): s.slide_id for s in again.slides} == ids
    first_half = [s.slide_id for s in select_shard(scan.slides, 0, 2)]
    assert [s.slide_id for s in select_shard(again.slides, 0, 2)] == first_half
    # --dry-run lists them with the warning instead of stopping
    result = CliRunner().invoke(app, ["tile", str(tmp_path), "--out", str(moved / "t.zarr"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "shared by 2 files" in result.stderr and ids["a/slide.svs"] in result.stdout


def test_manifest_ids_that_collide_are_an_error_naming_both(tmp_path):
    _touch(tmp_path / "p.svs")
    _touch(tmp_path / "q.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id\np.svs,case\nq.svs,case\n")
    with pytest.raises(Exception, match="given to several files in a manifest"):
        scan_inputs([str(manifest)])


def test_bad_out_paths_are_one_line_errors_before_any_work(tmp_path, monkeypatch):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "s.svs")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    cases = {
        "": "--out is empty",
        str(folder): "is the input folder",
        str(folder / "tiles.zarr"): "is inside the input folder",
        str(tmp_path / "a-file"): "is an existing file",
        str(tmp_path / "busy"): "not a tile store",
        "/sys/pathdino-test.zarr": "cannot write",  # not writable, even for root
    }
    for out, message in cases.items():
        for extra in ([], ["--dry-run"]):
            if out.startswith("/sys") and (extra or not Path("/sys").is_dir()):
                continue  # --dry-run only looks at permissions, which root always has
            result = CliRunner().invoke(app, ["tile", str(folder), "--out", out, *extra])
            assert result.exit_code == 2, (out, extra, result.output)
            assert message in result.stderr and result.stderr.startswith("error: "), (out, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1 or "\n" not in result.stderr.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "busy", "slides"]  # nothing was created
    assert sorted(p.name for p in folder.iterdir()) == ["s.svs"]
    if os.geteuid() != 0:  # permissions bind only non-root users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = CliRunner().invoke(app, ["tile", str(folder), "--out", str(locked / "t.zarr"), "--dry-run"])
        assert result.exit_code == 2 and "cannot write" in result.stderr
