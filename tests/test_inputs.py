"""INPUTS → slides: files, folders, globs, manifests, overrides, shards."""

from __future__ import annotations

import pytest

from pydicom.uid import generate_uid

from tests.synthetic_dicom import CT, write_dicom
from tiling.inputs import InputError, collect_slides, parse_shard, read_manifest, scan_inputs, select_shard


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_recursive_by_extension_and_mrxs_data_folder_skipped(tmp_path):
    _touch(tmp_path / "a.svs")
    _touch(tmp_path / "sub" / "b.ndpi")
    _touch(tmp_path / "sub" / "c.ome.tif")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "m.mrxs")
    _touch(tmp_path / "m" / "Data0000.dat")
    _touch(tmp_path / "m" / "inner.tif")  # inside a MIRAX data folder: not a slide
    ids = [s.slide_id for s in collect_slides([str(tmp_path)])]
    assert ids == ["a", "b", "c", "m"]


def test_glob_and_files_and_duplicates(tmp_path):
    _touch(tmp_path / "x1.svs")
    _touch(tmp_path / "x2.svs")
    _touch(tmp_path / "other" / "x1.svs")
    assert [s.slide_id for s in collect_slides([str(tmp_path / "x*.svs")])] == ["x1", "x2"]
    # a collision no longer blocks the run: both files get a suffixed id (tests/test_tiling_safety_inputs.py)
    both = collect_slides([str(tmp_path / "x1.svs"), str(tmp_path / "other" / "x1.svs")])
    assert len({s.slide_id for s in both}) == 2 and all(s.slide_id.startswith("x1-") for s in both)
    with pytest.raises(InputError, match="no such file"):
        collect_slides([str(tmp_path / "nope*.svs")])


def test_manifest_ids_mpp_relative_paths_and_unsafe_ids(tmp_path):
    _touch(tmp_path / "slides" / "a.svs")
    _touch(tmp_path / "slides" / "b.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,slide_id,mpp\nslides/a.svs,case-1,0.25\nslides/b.svs,../../evil,\n")
    slides = {s.slide_id: s for s in collect_slides([str(manifest)], slide_mpp=0.5)}
    assert slides["case-1"].mpp_override == 0.25  # the manifest wins over --slide-mpp
    assert slides["case-1"].path == (tmp_path / "slides" / "a.svs").resolve()
    evil = [s for s in slides.values() if s.source_id == "../../evil"][0]
    assert "/" not in evil.slide_id and not evil.slide_id.startswith(".")
    assert evil.mpp_override == 0.5  # --slide-mpp fills the gap


def test_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(InputError, match="needs a 'path' column"):
        read_manifest(bad)
    bad.write_text("path,mpp\nx.svs,abc\n")
    with pytest.raises(InputError, match="line 2: mpp 'abc'"):
        read_manifest(bad)


def test_shards_partition_deterministically(tmp_path):
    for i in range(7):
        _touch(tmp_path / f"s{i}.svs")
    slides = collect_slides([str(tmp_path)])
    parts = [select_shard(slides, i, 3) for i in range(3)]
    ids = sorted(s.slide_id for p in parts for s in p)
    assert ids == sorted(s.slide_id for s in slides)  # every slide once
    assert parse_shard("1/3") == (1, 3)
    assert parse_shard(
        None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    ) == (2, 4)
    assert parse_shard(None, {}) == (0, 1)
    with pytest.raises(InputError):
        parse_shard("3/3")


def test_dicom_series_folder_is_one_slide_named_after_the_folder(tmp_path):
    uid = generate_uid()
    write_dicom(tmp_path / "case7" / "level-1.dcm", uid, width_px=32)
    write_dicom(tmp_path / "case7" / "level-0.dcm", uid, width_px=64)
    write_dicom(tmp_path / "case7" / "label.dcm", uid, image_type="LABEL")
    _touch(tmp_path / "a.svs")
    scan = scan_inputs([str(tmp_path)])
    slides = {s.slide_id: s for s in scan.slides}
    assert sorted(slides) == ["a", "case7"]
    assert slides["case7"].path.name == "level-0.dcm"  # the largest level is the one opened
    assert [(f.path.name, f.reason) for f in scan.skipped] == [("label.dcm", "a DICOM label image")]
    assert [s.slide_id for s in collect_slides([str(tmp_path / "case7")])] == ["case7"]


def test_mixed_folder_yields_every_slide_and_says_what_it_skipped(tmp_path):
    """SVS + TIFF + two unrelated single-file DICOMs + one multi-file series in ONE folder: five slides."""
    _touch(tmp_path / "he.svs")
    _touch(tmp_path / "ihc.tiff")
    write_dicom(tmp_path / "single-a.dcm", generate_uid())
    write_dicom(tmp_path / "single-b", generate_uid())  # DICOM without a suffix: found by its preamble
    series = generate_uid()
    for i, width in enumerate((256, 128, 64)):
        write_dicom(tmp_path / f"series-level{i}.dcm", series, width_px=width)
    write_dicom(tmp_path / "series-overview.dcm", series, image_type="OVERVIEW")
    write_dicom(tmp_path / "ct.dcm", generate_uid(), sop_class=CT, modality="CT")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "broken.dcm")
    scan = scan_inputs([str(tmp_path)])
    got = {s.slide_id: s.path.name for s in scan.slides}
    series_id = next(k for k in got if k.startswith(tmp_path.name + "-"))
    assert got == {
        "he": "he.svs",
        "ihc": "ihc.tiff",
        "single-a": "single-a.dcm",
        "single-b": "single-b",
        series_id: "series-level0.dcm",
    }
    assert scan.format_counts() == {"dicom": 3, "svs": 1, "tiff": 1}
    assert {f.path.name: f.reason for f in scan.skipped} == {
        "broken.dcm": "not a readable DICOM file (InvalidDicomError)",
        "ct.dcm": "a DICOM file that is not a whole-slide image (CT)",
        "notes.txt": "unknown extension",
        "series-overview.dcm": "a DICOM overview (macro) image",
    }
    # a glob over the same folder finds the same slides
    assert [s.slide_id for s in collect_slides([str(tmp_path / "*")])] == sorted(got)


def test_one_series_spread_over_folders_is_one_slide(tmp_path):
    series = generate_uid()
    write_dicom(tmp_path / "x" / "l0.dcm", series, width_px=128)
    write_dicom(tmp_path / "y" / "l1.dcm", series, width_px=64)
    slides = collect_slides([str(tmp_path)])
    assert [s.path for s in slides] == [tmp_path / "x" / "l0.dcm"]


def test_inputs_with_only_non_slide_dicom_are_an_error_that_says_why(tmp_path):
    write_dicom(tmp_path / "label.dcm", generate_uid(), image_type="LABEL")
    with pytest.raises(InputError, match="no slides found .* 1 a DICOM label image"):
        collect_slides([str(tmp_path)])
