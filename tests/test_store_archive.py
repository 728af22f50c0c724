"""Tile store format 2 at archive scale: 1,000 slides, consolidated metadata kept current, format 1 still read.

The 1,000 slides are written directly with the store writer (one tiny tile each), so the test exercises the index,
not the tiler. What it checks: pathdino's reader sees every commit at once (journal applied), plain zarr sees the
store as of the last fold and everything it lists is readable, the end of a run folds everything, resumes and
failures and `--shard` runs keep both views right, and a format-1 store still opens (info, train catalog, writer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

from tiling import store_index
from tiling.store import TileStore, encode_tile, sidecar_url
from tiling.store_write import TileStoreWriter

N_SLIDES = 1000
V1_STORE = Path(__file__).parent / "data" / "store_v1.zarr"


def _commit(writer: TileStoreWriter, sid: str, n_tiles: int = 1, value: int = 0) -> None:
    tile = encode_tile(np.full((16, 16, 3), value % 256, np.uint8))
    sw = writer.begin_slide(sid, 16)
    sw.add([tile] * n_tiles, np.full((n_tiles, 2), value), np.ones(n_tiles))
    sw.commit({"source_path": f"/archive/{sid}.svs", "source_fingerprint": f"fp-{value}", "created": "t"})


class CountingStore(zarr.storage.LocalStore):
    """A local zarr store that counts the objects read (what an object store would bill as GET requests)."""

    reads: list[str] = []

    async def get(self, key, prototype, byte_range=None):  # noqa: D401 - zarr's signature
        CountingStore.reads.append(key)
        return await super().get(key, prototype, byte_range)


def _plain_zarr_slides(url: Path) -> tuple[list[str], list[str]]:
    """(the slide groups plain zarr lists, the objects it read to list them)."""
    CountingStore.reads = []
    root = zarr.open_group(store=CountingStore(url, read_only=True), mode="r")
    return sorted(root["slides"].group_keys()), list(CountingStore.reads)


def _journal(url: Path) -> list[int]:
    return store_index.journal_seqs(store_index.Files(sidecar_url(url), remote=False))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    url = tmp_path_factory.mktemp("archive") / "tiles.zarr"
    writer = TileStoreWriter(url)
    values = {}
    for i in range(N_SLIDES):
        sid = f"slide-{i:04d}"
        values[sid] = i
        _commit(writer, sid, value=i)
        if i == 700:  # mid-run: pathdino sees every commit; plain zarr a folded prefix, all of it readable
            store = TileStore(url)
            assert store.slide_ids == sorted(values)
            listed, _ = _plain_zarr_slides(url)
            assert set(listed) <= set(values) and len(listed) >= 0.8 * len(values)
            root = zarr.open_group(str(url), mode="r")
            assert all(root[f"slides/{sid}/coords"][0, 0] == values[sid] for sid in listed[-20:])
    writer.fold_index()  # what run_tiling does at the end of every run
    return url, values


def test_plain_zarr_lists_all_1000_slides_in_one_read(archive):
    url, values = archive
    listed, reads = _plain_zarr_slides(url)
    assert listed == sorted(values)
    # the whole index is the root document: one object read (zarr also probes for the Zarr v2 keys, which a store
    # of format 3 does not have, in the same round trip)
    assert [r for r in reads if r not in (".zgroup", ".zattrs", ".zmetadata")] == ["zarr.json"]
    root = zarr.open_group(str(url), mode="r")
    assert root.attrs["pathdino"]["format_version"] == 2
    assert root["slides/slide-0999/tiles"].shape == (1,) and root["slides/slide-0421/coords"][0].tolist() == [421, 421]
    assert root["slides/slide-0003"].attrs["pathdino"]["n_tiles"] == 1
    assert _journal(url) == []


def test_reader_opens_slides_without_a_request_per_slide(archive, monkeypatch):
    url, values = archive
    store = TileStore(url)
    assert store.slide_ids == sorted(values) and sum(store.n_tiles(s) for s in store.slide_ids) == N_SLIDES
    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        reads.append(key)
        return await original(self, key, prototype, byte_range)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    slides = [store.slide(sid) for sid in store.slide_ids]
    assert reads == [] and slides[5].n_tiles == 1 and store.slide_attrs("slide-0005")["source_fingerprint"] == "fp-5"
    assert slides[7].coords.tolist() == [[7, 7]] and reads == ["slides/slide-0007/coords/c/0/0"]


def test_resume_failure_and_removal_keep_both_views_right(archive, tmp_path):
    src, values = archive
    url = tmp_path / "tiles.zarr"
    shutil.copytree(src, url)
    shutil.copytree(sidecar_url(src), sidecar_url(url))
    writer = TileStoreWriter(url)
    assert writer.completed_provenance("slide-0010")["source_fingerprint"] == "fp-10"  # resume check: from the index
    _commit(writer, "slide-0010", n_tiles=3, value=77)  # re-tiled (its file changed): replaced in both views at once
    writer.record_failure("slide-0020", {"reason": "the file is now unreadable"})
    writer.remove_slide("slide-0030")
    _commit(writer, "new-slide", value=5)
    store = TileStore(url)
    assert store.n_tiles("slide-0010") == 3 and store.slide("slide-0010").coords.tolist() == [[77, 77]] * 3
    assert "slide-0020" not in store.slide_ids and store.failures["slide-0020"]["replaced_committed"] is True
    assert "slide-0030" not in store.slide_ids and "new-slide" in store.slide_ids
    listed, _ = _plain_zarr_slides(url)
    # a slide plain zarr listed is never served after its files went: removals fold at once
    assert "slide-0020" not in listed and "slide-0030" not in listed
    root = zarr.open_group(str(url), mode="r")
    assert root["slides/slide-0010/tiles"].shape == (3,) and root["slides/slide-0010/coords"][2].tolist() == [77, 77]
    writer.fold_index()
    listed, _ = _plain_zarr_slides(url)
    assert listed == sorted(set(values) - {"slide-0020", "slide-0030"} | {"new-slide"})
    assert zarr.open_group(str(url), mode="r").attrs["pathdino"]["failures"]["slide-0020"]["reason"]


def test_a_writer_killed_before_folding_loses_nothing(tmp_path):
    url = tmp_path / "tiles.zarr"
    writer = TileStoreWriter(url)
    for i in range(40):
        _commit(writer, f"s{i:02d}", value=i)
    pending = _journal(url)
    assert pending, "with 40 slides the last commits wait in the journal"  # (1/8 of the store, or a minute)
    del writer  # killed: no fold at the end
    assert TileStore(url).slide_ids == [f"s{i:02d}" for i in range(40)]  # pathdino applies the journal
    listed, _ = _plain_zarr_slides(url)
    assert len(listed) < 40 and all(TileStore(url).n_tiles(s) == 1 for s in listed)
    TileStoreWriter(url).fold_index()  # the next run's end
    assert _plain_zarr_slides(url)[0] == [f"s{i:02d}" for i in range(40)] and _journal(url) == []


def test_journal_records_are_one_small_file_per_commit(tmp_path):
    """A commit writes one record (a few KB), never the index: its cost does not grow with the store."""
    url = tmp_path / "tiles.zarr"
    writer = TileStoreWriter(url)
    for i in range(100):
        _commit(writer, f"s{i:03d}")
    writer.fold_index()
    root_bytes = (url / "zarr.json").stat().st_size
    mtime = (url / "zarr.json").stat().st_mtime_ns
    sizes = []
    for i in range(100, 105):  # 100 folded slides: the next 12 commits go to the journal only
        _commit(writer, f"s{i:03d}")
        sizes.append(
            max((Path(sidecar_url(url)) / "journal" / store_index.record_name(q)).stat().st_size for q in _journal(url))
        )
    assert (url / "zarr.json").stat().st_mtime_ns == mtime and max(sizes) < 4000 < root_bytes / 20
    assert len(_journal(url)) == 5


def test_shard_runs_and_resume_through_the_tiler(tmp_path):
    from tests.synthetic import tissue_image, write_pyramid
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides, select_shard
    from tiling.runner import run_tiling

    folder = tmp_path / "slides"
    folder.mkdir()
    tissue = tissue_image(1700, 1600)[1000:1600, 800:1500]  # the sample's tissue-rich middle
    for i in range(4):
        write_pyramid(folder / f"t{i}.tif", tissue, downsamples=(1,), mpp=0.5, compression=None)
    (folder / "broken.tif").write_bytes(b"not a tiff")
    url = tmp_path / "tiles.zarr"
    writer = TileStoreWriter(url)
    for i in range(30):
        _commit(writer, f"old-{i:02d}", value=i)
    cfg = TilingConfig(workers=1, tile_px=32, qc_images=False)
    slides = collect_slides([str(folder)])
    for index in range(2):  # two machines' shares, one after the other
        run_tiling(select_shard(slides, index, 2), str(url), cfg)
    expected = sorted([f"old-{i:02d}" for i in range(30)] + [f"t{i}" for i in range(4)])
    assert TileStore(url).slide_ids == expected and list(TileStore(url).failures) == ["broken"]
    assert _plain_zarr_slides(url)[0] == expected and _journal(url) == []
    assert zarr.open_group(str(url), mode="r").attrs["pathdino"]["failures"]["broken"]["error_type"]
    mtime = (url / "zarr.json").stat().st_mtime_ns
    again = run_tiling([s for s in slides if s.slide_id != "broken"], str(url), cfg)  # resume: nothing to do
    assert all(o.already_complete for o in again) and (url / "zarr.json").stat().st_mtime_ns == mtime
    assert all(TileStore(url).n_tiles(f"t{i}") > 0 for i in range(4))


def test_format_1_store_still_opens_and_is_migrated_by_the_next_writer(tmp_path):
    from typer.testing import CliRunner

    from pathdino.cli.main import app

    url = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, url)
    store = TileStore(url)
    assert store.format_version == 1 and store.slide_ids == ["cmu1"] and list(store.failures) == ["broken"]
    slide = store.slide("cmu1")
    assert slide.read_tiles(0, 3).shape == (3, 32, 32, 3) and store.slide_attrs("cmu1")["n_tiles"] == 44
    result = CliRunner().invoke(app, ["info", str(url), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format_version"] == 1 and info["n_tiles"] == 44 and info["n_failures"] == 1

    from pathdino.data import AugmentConfig, DataConfig, validate_stores

    catalog = validate_stores(DataConfig(stores=(str(url),)), AugmentConfig(global_crop_px=32, local_crop_px=16))
    assert catalog.slide_ids == ("cmu1",)

    writer = TileStoreWriter(url)  # a new run into the old store: migrated to format 2 once
    _commit(writer, "added", value=3)
    writer.fold_index()
    store = TileStore(url)
    assert store.format_version == 2 and store.slide_ids == ["added", "cmu1"] and list(store.failures) == ["broken"]
    assert store.slide("cmu1").read_encoded(0, 44) == slide.read_encoded(0, 44)
    assert _plain_zarr_slides(url)[0] == ["added", "cmu1"]


def test_info_lists_1000_slides_from_the_index(archive):
    from typer.testing import CliRunner

    from pathdino.cli.main import app

    url, values = archive
    result = CliRunner().invoke(app, ["info", str(url)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = " ".join(" ".join(lines[:3]).split())  # the header wraps at 80 columns, where depends on the path
    assert "1000 slide(s) with 1,000 tiles" in header
    assert sum(line.startswith("slide-") for line in lines) == N_SLIDES  # every slide, one plain line each
    assert any(line.startswith("slide-0999 ") and line.endswith("/archive/slide-0999.svs") for line in lines)
    as_json = json.loads(CliRunner().invoke(app, ["info", str(url), "--json"]).output)
    assert as_json["n_slides"] == N_SLIDES and as_json["slides"]["slide-0500"]["fingerprint"] == "fp-500"


def test_a_reader_racing_a_fold_reads_again(tmp_path):
    """A reader that read the root document before a fold must not miss the records that fold deleted."""
    url = tmp_path / "tiles.zarr"
    writer = TileStoreWriter(url)
    for i in range(16):
        _commit(writer, f"s{i:02d}")
    writer.fold_index()
    stale = store_index.parse_root(json.loads((url / "zarr.json").read_bytes()))  # read just before ...
    for i in range(16, 19):  # ... these: the third one folds (2 = 16/8 records were waiting) ...
        _commit(writer, f"s{i:02d}")
    _commit(writer, "s19")  # ... and this one waits in the journal
    assert _journal(url)
    assert not store_index.apply_journal(stale, store_index.Files(sidecar_url(url), remote=False))
    assert TileStore(url).slide_ids == [f"s{i:02d}" for i in range(20)]


def test_summary_of_a_rerun_over_an_archive_counts_skipped_slides_instead_of_listing_them(capsys):
    from pathdino.cli.tile import print_summary
    from tiling.outcome import SlideOutcome

    outcomes = [
        SlideOutcome(f"old-{i:04d}", f"/a/old-{i}.svs", "skipped", n_tiles=4, already_complete=True)
        for i in range(N_SLIDES)
    ]
    outcomes += [
        SlideOutcome("new-one", "/a/new.svs", "done", n_tiles=7),
        SlideOutcome("bad-one", "/a/bad.svs", "failed", reason="SlideOpenError: cannot open"),
    ]
    print_summary(outcomes, 12.0)
    err = capsys.readouterr().err
    assert "old-0001" not in err and "new-one" in err and "bad-one" in err and "SlideOpenError" in err
    assert "1 done" in err and "1000 skipped (already complete)" in err and "1 failed" in err
