"""The tile-store format: round trips, the index as the commit marker, safe ids, plain-zarr readability."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tiling.store import (
    FORMAT_VERSION,
    StoreError,
    TileStore,
    decode_tile,
    encode_tile,
    safe_slide_id,
    sidecar_url,
)
from tiling.slide_write import shard_file_bytes
from tiling.store_write import TileStoreWriter


def _tiles(n: int, px: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth, mostly-luminance images (like H&E) so JPEG's error is small, as on real tissue
    grey = rng.integers(60, 200, (n, 4, 4, 1))
    base = np.clip(grey + rng.integers(-15, 15, (n, 4, 4, 3)), 0, 255).astype(np.uint8)
    return [np.kron(b, np.ones((px // 4, px // 4, 1), np.uint8)) for b in base]


def _write(url, slide_id="s1", n=300, px=32, encoding="jpeg", shard=256, chunk=16, max_tiles=0):
    w = TileStoreWriter(url)
    sw = w.begin_slide(
        slide_id, px, encoding=encoding, tiles_per_shard=shard, tiles_per_chunk=chunk, max_tiles=max_tiles
    )
    tiles = _tiles(n, px)
    xy = np.arange(2 * n).reshape(n, 2)
    # arrive in uneven batches, as blocks do
    for start in range(0, n, 70):
        stop = min(start + 70, n)
        sw.add([encode_tile(t, encoding) for t in tiles[start:stop]], xy[start:stop], np.linspace(0, 1, n)[start:stop])
    sw.commit({"source_path": "/x/s1.svs", "source_fingerprint": "fp"})
    return w, tiles, xy


def test_round_trip_jpeg_and_png(tmp_path):
    url = tmp_path / "store.zarr"
    _, tiles, xy = _write(url, n=300)
    store = TileStore(url)
    assert store.slide_ids == ["s1"] and store.n_tiles("s1") == 300
    slide = store.slide("s1")
    assert slide.shard_ranges() == [(0, 256), (256, 300)]
    np.testing.assert_array_equal(slide.coords, xy)
    assert slide.tissue_fraction.shape == (300,)
    got = slide.read_tiles(250, 300)
    err = np.abs(got.astype(int) - np.stack(tiles[250:300]).astype(int)).mean()
    assert got.shape == (50, 32, 32, 3) and got.dtype == np.uint8 and err < 4

    _write(tmp_path / "png.zarr", encoding="png", n=20)
    png = TileStore(tmp_path / "png.zarr").slide("s1")
    np.testing.assert_array_equal(png.read_tiles(0, 20), np.stack(_tiles(20)))  # lossless


@pytest.mark.parametrize("max_tiles", [0, 100, 300, 1000])
def test_size_hint_changes_nothing_stored(tmp_path, max_tiles):
    # The writer sizes its array once for max_tiles (the candidates) and cuts it to the tiles written at commit; a
    # hint below the real count only means resizing as it goes. The shards are the same bytes either way.
    _write(tmp_path / "ref.zarr", n=300, shard=64)
    _write(tmp_path / "hint.zarr", n=300, shard=64, max_tiles=max_tiles)
    ref, hint = TileStore(tmp_path / "ref.zarr").slide("s1"), TileStore(tmp_path / "hint.zarr").slide("s1")
    assert hint.n_tiles == 300 and hint.shard_ranges() == ref.shard_ranges()
    assert hint.read_encoded(0, 300) == ref.read_encoded(0, 300)
    shards = sorted(p.name for p in (tmp_path / "ref.zarr" / "slides" / "s1" / "tiles" / "c").iterdir())
    for name in shards:
        a = (tmp_path / "ref.zarr" / "slides" / "s1" / "tiles" / "c" / name).read_bytes()
        assert (tmp_path / "hint.zarr" / "slides" / "s1" / "tiles" / "c" / name).read_bytes() == a
    assert sorted(p.name for p in (tmp_path / "hint.zarr" / "slides" / "s1" / "tiles" / "c").iterdir()) == shards


@pytest.mark.parametrize("n_items", [256, 37, 32, 16, 5, 1])
def test_direct_shard_files_are_the_bytes_zarr_writes(tmp_path, n_items):
    # Local stores write whole shards themselves (shard_file_bytes); zarr must read them, and write the same bytes.
    from zarr.core.dtype import VariableLengthBytes

    rng = np.random.default_rng(n_items)
    items = [rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes() for _ in range(n_items)]
    group = zarr.open_group(store=zarr.storage.LocalStore(tmp_path / "ref"), mode="w")
    ref = group.create_array(
        "tiles",
        shape=(512,),
        chunks=(16,),
        shards=(256,),
        dtype=VariableLengthBytes(),
        compressors=None,
        fill_value=b"",
    )
    values = np.empty(n_items, dtype=object)
    values[:] = items
    ref[256 : 256 + n_items] = values
    expected = (tmp_path / "ref" / "tiles" / "c" / "1").read_bytes()
    assert shard_file_bytes(items, tiles_per_chunk=16, tiles_per_shard=256) == expected

    (tmp_path / "ref" / "tiles" / "c" / "1").write_bytes(
        shard_file_bytes(items[::-1], tiles_per_chunk=16, tiles_per_shard=256)
    )
    assert list(zarr.open_array(tmp_path / "ref" / "tiles", mode="r")[256 : 256 + n_items]) == items[::-1]
    with pytest.raises(ValueError, match="do not fit"):
        shard_file_bytes(items * 2 + [b"x"] * 256, tiles_per_chunk=16, tiles_per_shard=256)


def test_writer_uses_direct_shards_and_zarr_reads_them(tmp_path):
    w, tiles, _ = _write(tmp_path / "store.zarr", n=300)
    encoded = TileStore(tmp_path / "store.zarr").slide("s1").read_encoded(0, 300)
    assert encoded == [encode_tile(t) for t in tiles]


def test_slide_invisible_until_commit_and_abort_leaves_nothing(tmp_path):
    url = tmp_path / "store.zarr"
    w = TileStoreWriter(url)
    sw = w.begin_slide("half", 32)
    sw.add([encode_tile(t) for t in _tiles(300)], np.zeros((300, 2)), np.ones(300))  # one full shard written
    assert TileStore(url).slide_ids == []
    assert not (url / "slides" / "half").exists()  # staged elsewhere until commit
    with pytest.raises(StoreError, match="not a complete slide"):
        TileStore(url).slide("half")
    sw.abort()
    assert not any((tmp_path / "store.zarr.pathdino" / "staging").iterdir())


def test_recommit_replaces_and_failures_are_cleared(tmp_path):
    url = tmp_path / "store.zarr"
    w, _, _ = _write(url, n=40)
    w.record_failure("s1", {"reason": "boom"})
    assert "s1" in TileStore(url).failures
    _write(url, n=10)
    store = TileStore(url)
    assert store.n_tiles("s1") == 10 and store.failures == {}


def test_plain_zarr_opens_store_in_fresh_process(tmp_path):
    url = tmp_path / "store.zarr"
    _write(url, n=20)
    code = (
        "import zarr, imagecodecs, json, sys\n"
        f"root = zarr.open_group({str(url)!r}, mode='r')\n"
        "index = list(root['slides'].group_keys())  # format 2: the slides' metadata is inline in zarr.json\n"
        "tiles = root['slides/s1/tiles'][0:20]\n"
        "img = imagecodecs.jpeg8_decode(tiles[3])\n"
        "print(json.dumps([sorted(index), img.shape, root['slides/s1/coords'][3].tolist()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [["s1"], [32, 32, 3], [6, 7]]


def test_plain_zarr_walks_the_whole_store_without_a_warning(tmp_path):
    """Lock, staging area and QC images live beside the store: zarr sees nothing it does not recognise."""
    url = tmp_path / "store.zarr"
    _write(url, n=20)
    writer = TileStoreWriter(url)
    writer.write_file("qc/s1.jpg", b"jpg")
    writer.begin_slide("in-progress", 32)  # a slide being staged right now
    writer.record_failure("bad", {"reason": "x"})
    assert sorted(p.name for p in url.iterdir()) == ["slides", "zarr.json"]
    assert TileStore(url).qc_image_path("s1") == sidecar_url(url) + "/qc/s1.jpg"
    code = (
        "import warnings, zarr\n"
        "warnings.simplefilter('error')\n"
        f"root = zarr.open_group({str(url)!r}, mode='r')\n"
        "members = dict(root.members(max_depth=None))\n"
        "print(sorted(members))\n"
        "root.tree()\n"
        f"zarr.open({str(url)!r}, mode='r')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "slides/s1/tiles" in out.stdout and out.stderr == ""


def test_qc_image_path_finds_the_png_pictures_of_earlier_versions(tmp_path):
    url = tmp_path / "store.zarr"
    _write(url, n=20)
    store = TileStore(url)
    assert store.qc_image_path("s1") == sidecar_url(url) + "/qc/s1.jpg"  # where this version writes it
    (url / "qc").mkdir()
    (url / "qc" / "s1.png").write_bytes(b"png")  # oldest: inside the store
    assert store.qc_image_path("s1") == f"{url}/qc/s1.png"
    TileStoreWriter(url).write_file("qc/s1.png", b"png")  # then: PNG in the sidecar
    assert store.qc_image_path("s1") == sidecar_url(url) + "/qc/s1.png"
    TileStoreWriter(url).write_file("qc/s1.jpg", b"jpg")  # a re-tiled slide's JPEG wins
    assert store.qc_image_path("s1") == sidecar_url(url) + "/qc/s1.jpg"


def test_unknown_version_and_not_a_store(tmp_path):
    url = tmp_path / "store.zarr"
    _write(url, n=5)
    root = zarr.open_group(str(url), mode="r+")
    meta = dict(root.attrs["pathdino"])
    meta["format_version"] = FORMAT_VERSION + 1
    root.attrs["pathdino"] = meta
    with pytest.raises(StoreError, match="format version"):
        TileStore(url)
    with pytest.raises(StoreError, match="no tile store"):
        TileStore(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a pathdino tile store"):
        TileStore(tmp_path / "other.zarr")


@pytest.mark.parametrize("raw", ["../../etc/passwd", "a/b", "a b", ".hidden", "..", "x" * 300, "é", ""])
def test_safe_slide_id_never_escapes(raw):
    safe = safe_slide_id(raw)
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and safe not in ("", "..")
    assert len(safe) <= 200 and safe == safe_slide_id(safe)


def test_safe_slide_id_keeps_normal_ids_and_separates_collisions():
    assert safe_slide_id("TCGA-AA-3520.01") == "TCGA-AA-3520.01"
    assert safe_slide_id("a/b") != safe_slide_id("a_b") and safe_slide_id("a/b") != safe_slide_id("a b")


def test_decode_rejects_unknown_encoding():
    with pytest.raises(ValueError, match="unknown tile encoding"):
        decode_tile(b"", "webp")


def test_fsspec_url_store_round_trip():
    """Object stores (here fsspec's in-memory filesystem) take the no-rename path: index entry = commit."""
    url = "memory://pathdino-test/store.zarr"
    _, tiles, xy = _write(url, n=40)
    store = TileStore(url)
    assert store.slide_ids == ["s1"]
    np.testing.assert_array_equal(store.slide("s1").coords, xy)
    writer = TileStoreWriter(url)
    assert writer.write_file("qc/s1.jpg", b"jpg") == f"{url}.pathdino/qc/s1.jpg" == store.qc_image_path("s1")
    writer.remove_slide("s1")
    assert TileStore(url).slide_ids == []
