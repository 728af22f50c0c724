"""INPUTS → slides: files, folders, globs, manifests, overrides, shards."""

from __future__ import annotations

import pytest

from tiling.inputs import InputError, collect_slides, parse_shard, read_manifest, select_shard


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
    with pytest.raises(InputError, match="used by both"):
        collect_slides([str(tmp_path / "x1.svs"), str(tmp_path / "other" / "x1.svs")])
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
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                              "SLURM_ARRAY_TASK_MIN": "3"}) == (2, 4)
    assert parse_shard(None, {}) == (0, 1)
    with pytest.raises(InputError):
        parse_shard("3/3")


def test_dicom_series_folder_is_one_slide_named_after_the_folder(tmp_path):
    _touch(tmp_path / "case7" / "level-1.dcm")
    _touch(tmp_path / "case7" / "level-0.dcm")
    _touch(tmp_path / "a.svs")
    slides = {s.slide_id: s for s in collect_slides([str(tmp_path)])}
    assert sorted(slides) == ["a", "case7"]
    assert slides["case7"].path.name == "level-0.dcm"
    assert [s.slide_id for s in collect_slides([str(tmp_path / "case7")])] == ["case7"]
