"""Block reads: geometry in pixels, block == per-tile, TIFF fast path == backend, corrupt tiles, fallbacks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import (
    corrupt_source_tile,
    gradient_image,
    texture_image,
    write_pyramid,  # noqa: E402
    write_stripped,
)

from tiling.errors import RegionReadError  # noqa: E402
from tiling.geometry import grid_shape, plan_geometry, tile_level0_xy  # noqa: E402
from tiling.mpp import resolve_mpp  # noqa: E402
from tiling.readers import open_slide  # noqa: E402
from tiling.regions import TIFF_FAST_PATH, BlockReader, downsample, slice_tiles  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CMU_SVS = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def jpeg_pyramid(tmp_path_factory) -> Path:
    """0.25 µm/px, levels 1 and 4 (so 0.5 µm/px needs a 2x downsample of level 0), 256-px JPEG tiles."""
    path = tmp_path_factory.mktemp("slides") / "jpeg.svs"
    return write_pyramid(path, texture_image(1024, 768), downsamples=(1, 4), mpp=0.25, tile=256)


def _open(path, backend="auto", target_mpp=0.5, tile_px=64, overlap_px=0, tolerance=0.05, fast=True):
    reader = open_slide(path, backend)
    mpp = resolve_mpp(reader, None).mpp
    geometry = plan_geometry(
        reader.level_dimensions,
        reader.level_downsamples,
        slide_mpp=mpp,
        target_mpp=target_mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
        tolerance=tolerance,
    )
    return reader, geometry, BlockReader(reader, geometry, use_tiff_fast_path=fast)


# --- geometry, checked in pixels ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "downsamples, slide_mpp, expect_level, expect_scale",
    [
        ((1,), 0.25, 0, 2.0),  # single level: read level 0, downsample 2x
        ((1, 2), 0.25, 1, 1.0),  # pyramid level at the target: read as is
        ((1,), 0.2527, 0, 0.5 / 0.2527),  # non-integer scale
    ],
)
@pytest.mark.parametrize("fast", [True, False])
def test_tiles_cover_the_right_level0_area(tmp_path, downsamples, slide_mpp, expect_level, expect_scale, fast):
    # R = level-0 x, G = level-0 y: each output pixel's value says where in level 0 it came from.
    path = write_pyramid(
        tmp_path / "grad.tif",
        gradient_image(256, 256),
        downsamples=downsamples,
        mpp=slide_mpp,
        tile=64,
        compression=None,
    )
    reader, g, blocks = _open(path, target_mpp=0.5, tile_px=32, overlap_px=8, fast=fast)
    assert (g.read_level, g.scale) == (expect_level, pytest.approx(expect_scale))
    assert blocks.pixel_source == (TIFF_FAST_PATH if fast else reader.backend)
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    level0_px_per_out_px = g.scale * g.read_downsample
    for row, col in [(0, 0), (1, 2), (n_rows - 1, n_cols - 1)]:
        tile = blocks.read_tile(row, col).astype(float)
        x0, y0 = tile_level0_xy(g, [row], [col])[0]
        assert abs(x0 - col * g.level0_step_px) <= 0.5 and abs(y0 - row * g.level0_step_px) <= 0.5
        for j in (0, g.tile_px - 1):  # first and last output pixel, both axes
            expected_x = col * g.level0_step_px + (j + 0.5) * level0_px_per_out_px - 0.5
            expected_y = row * g.level0_step_px + (j + 0.5) * level0_px_per_out_px - 0.5
            assert abs(tile[0, j, 0] - expected_x) <= 1.0
            assert abs(tile[j, 0, 1] - expected_y) <= 1.0
    # The last tile ends inside the slide.
    assert (n_cols - 1) * g.level0_step_px + g.level0_tile_px <= 256 + 1e-6
    assert n_cols * g.level0_step_px + g.level0_tile_px > 256
    reader.close()


# --- block reads --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 0.6, 1.0, 1.5])
@pytest.mark.parametrize("fast", [True, False])
def test_block_equals_per_tile_reads(jpeg_pyramid, target_mpp, fast):
    reader, g, blocks = _open(jpeg_pyramid, target_mpp=target_mpp, tile_px=48, overlap_px=6, fast=fast)
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    assert n_rows >= 2 and n_cols >= 3
    row0, col0 = n_rows - 2, n_cols - 3
    block = blocks.read_block(row0, col0, 2, 3)
    assert block.shape == (g.step_px + g.tile_px, 2 * g.step_px + g.tile_px, 3) and block.dtype == np.uint8
    rows, cols = np.divmod(np.arange(6), 3)
    tiles = slice_tiles(block, g, rows, cols)
    assert tiles.shape == (6, 48, 48, 3)
    for i, (r, c) in enumerate(zip(rows, cols)):
        single = blocks.read_tile(row0 + r, col0 + c)
        if g.scale == int(g.scale):
            np.testing.assert_array_equal(tiles[i], single)
        else:  # fractional resampling bounds: float rounding may move a value by one grey level
            assert np.abs(tiles[i].astype(int) - single).max() <= 1
    reader.close()


@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 0.6])
@pytest.mark.parametrize("fast", [True, False])
def test_read_tiles_equals_sliced_block(jpeg_pyramid, target_mpp, fast):
    # read_tiles copies each tile straight from the source tiles (fast path at scale 1) or slices runs of cells;
    # either way it must give the pixels of the block, edge tiles (white past the slide) included, into a reused
    # buffer that held other pixels.
    reader, g, blocks = _open(jpeg_pyramid, target_mpp=target_mpp, tile_px=48, overlap_px=6, fast=fast)
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    row0, col0 = n_rows - 3, n_cols - 4
    rows, cols = np.divmod(np.arange(12), 4)
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 1], bool)  # gaps split rows into several runs
    expected = slice_tiles(blocks.read_block(row0, col0, 3, 4), g, rows[keep], cols[keep])
    out = np.full((keep.sum(), 48, 48, 3), 7, np.uint8)
    got = blocks.read_tiles(row0 + rows[keep], col0 + cols[keep], out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(blocks.read_tiles(row0 + rows[keep], col0 + cols[keep]), expected)
    with pytest.raises(ValueError, match="out must be"):
        blocks.read_tiles(rows, cols, out=np.zeros((1, 48, 48, 3), np.uint8))
    reader.close()


@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 0.6, 1.0])
def test_fast_path_matches_openslide(jpeg_pyramid, target_mpp):
    reader, g, fast = _open(jpeg_pyramid, "openslide", target_mpp=target_mpp, tile_px=64)
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    assert fast.pixel_source == TIFF_FAST_PATH and slow.pixel_source == "openslide"
    a, b = fast.read_block(0, 1, 3, 4), slow.read_block(0, 1, 3, 4)
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b).mean() < 2.0
    reader.close()


def _compare_with_openslide(path: Path, target_mpp: float, tile_px: int = 224):
    reader, g, fast = _open(path, "openslide", target_mpp=target_mpp, tile_px=tile_px)
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    assert fast.pixel_source == TIFF_FAST_PATH, fast.fast_path_reason
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    a, b = fast.read_block(1, 1, n_rows - 2, n_cols - 2), slow.read_block(1, 1, n_rows - 2, n_cols - 2)
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b).mean()
    reader.close()
    return g, diff


@pytest.mark.parametrize("target_mpp", [0.499, 1.0])
def test_fast_path_matches_openslide_on_cmu_svs(target_mpp):
    g, diff = _compare_with_openslide(CMU_SVS, target_mpp)
    assert g.read_level == 0
    assert diff < 2.0


@pytest.mark.parametrize("target_mpp", [0.499, 0.75])
def test_fast_path_matches_openslide_on_shared_pyramid(shared_slides, target_mpp):
    # Level 0 only: on levels with non-integer downsamples (2.000337) OpenSlide itself resamples at sub-pixel
    # offsets, while the fast path returns the stored level pixels.
    g, diff = _compare_with_openslide(shared_slides / "CMU-1-Small-Region.pyramid-jpeg.tif", target_mpp)
    assert g.read_level == 0
    assert diff < 2.0


def test_ome_subifd_pyramid_uses_fast_path(shared_slides):
    reader, g, blocks = _open(shared_slides / "CMU-1-Small-Region.pyramid.ome.tif", target_mpp=1.0, tile_px=224)
    assert reader.backend == "tiffslide" and g.read_level == 1
    assert blocks.pixel_source == TIFF_FAST_PATH
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    np.testing.assert_array_equal(blocks.read_block(0, 0, 2, 2), slow.read_block(0, 0, 2, 2))
    reader.close()


@pytest.mark.parametrize(
    "target_mpp, level, scale",
    [(0.25, 0, 1.0), (0.5, 0, 2.0), (0.75, 0, 3.0), (0.6, 0, 2.4), (1.0, 1, 1.0), (1.4, 1, 1.4)],
)
def test_uncompressed_fast_path_is_exact(tmp_path, target_mpp, level, scale):
    # 96-px source tiles: integer factors 2 and 3 take the per-source-tile reduce path, which must give exactly
    # what reducing the backend's whole region gives.
    path = write_pyramid(
        tmp_path / "raw.tif", texture_image(800, 640), downsamples=(1, 4), mpp=0.25, tile=96, compression=None
    )
    reader, g, fast = _open(path, "openslide", target_mpp=target_mpp, tile_px=40, overlap_px=4)
    assert (g.read_level, g.scale) == (level, pytest.approx(scale))
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    np.testing.assert_array_equal(fast.read_block(1, 2, 3, 4), slow.read_block(1, 2, 3, 4))
    np.testing.assert_array_equal(fast.read_tile(2, 1), slow.read_tile(2, 1))
    reader.close()


def test_integer_downsample_is_the_area_mean():
    region = np.random.default_rng(1).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    out = downsample(region, (4, 8, 56, 40), (26, 16), 2.0)
    expected = np.floor(region[8:40, 4:56].reshape(16, 2, 26, 2, 3).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(out, expected)


def test_blocks_past_the_slide_edge_are_white(jpeg_pyramid):
    reader, g, blocks = _open(jpeg_pyramid, target_mpp=0.5, tile_px=64)
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    block = blocks.read_block(n_rows - 1, n_cols - 1, 3, 3)
    # 1024x768 level 0 at 0.5 µm/px is 512x384 output px; everything beyond is white.
    assert (block[384 - (n_rows - 1) * 64 :] == 255).all()
    assert (block[:, 512 - (n_cols - 1) * 64 :] == 255).all()
    reader.close()


# --- failures and fallbacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_corrupt_source_tile_fails_its_block_only(tmp_path, fast):
    path = write_pyramid(
        tmp_path / "bad.tif",
        texture_image(512, 512),
        downsamples=(1,),
        mpp=0.5,
        tile=256,
        description_style="none",
        resolution_tags=True,
    )
    corrupt_source_tile(path, 0, 3)  # covers level-0 x, y in [256, 512)
    reader, g, blocks = _open(path, "openslide", target_mpp=0.5, tile_px=64, fast=fast)
    assert grid_shape(g, reader.level_dimensions[0]) == (8, 8)
    with pytest.raises(RegionReadError, match="bad.tif") as info:
        blocks.read_block(0, 0, 8, 8)
    if fast:
        assert "source tile 3" in str(info.value)
    # The caller falls back to tiles: those away from the corrupt source tile still read.
    assert blocks.read_block(0, 0, 4, 4).shape == (256, 256, 3)
    assert blocks.read_tile(0, 7).shape == (64, 64, 3)
    with pytest.raises(RegionReadError):
        blocks.read_tile(5, 5)
    with pytest.raises(RegionReadError, match="bad.tif"):
        blocks.read_tiles(np.array([0, 5]), np.array([0, 5]))
    assert blocks.read_tiles(np.array([0, 1]), np.array([0, 1])).shape == (2, 64, 64, 3)
    reader.close()


def test_untiled_tiff_falls_back_to_backend(tmp_path):
    path = write_stripped(tmp_path / "strips.tif", texture_image(300, 200))
    reader = open_slide(path)
    g = plan_geometry(reader.level_dimensions, reader.level_downsamples, slide_mpp=0.5, target_mpp=0.5, tile_px=64)
    blocks = BlockReader(reader, g)
    assert blocks.pixel_source == "tiffslide" and "not tiled" in blocks.fast_path_reason
    assert blocks.read_block(0, 0, 2, 3).shape == (128, 192, 3)
    reader.close()


def test_fast_path_disabled_when_it_disagrees_with_backend(jpeg_pyramid):
    class Inverted:
        """A reader whose pixels differ from the file's: the self-check must refuse the fast path."""

        def __init__(self, inner):
            self._inner = inner
            self.path, self.backend, self.backend_version = inner.path, inner.backend, inner.backend_version
            self.level_dimensions, self.level_downsamples = inner.level_dimensions, inner.level_downsamples
            self.properties = inner.properties

        def read_region(self, level, x, y, width, height):
            return 255 - self._inner.read_region(level, x, y, width, height)

        def close(self):
            self._inner.close()

    reader = Inverted(open_slide(jpeg_pyramid))
    g = plan_geometry(reader.level_dimensions, reader.level_downsamples, slide_mpp=0.25, target_mpp=0.25, tile_px=64)
    blocks = BlockReader(reader, g)
    assert blocks.pixel_source == reader.backend and "differs" in blocks.fast_path_reason
    reader.close()


def test_fast_path_only_for_plain_tiff_vendors(jpeg_pyramid):
    reader = open_slide(jpeg_pyramid, "openslide")
    assert reader.properties["openslide.vendor"] == "aperio"
    reader.properties = {**reader.properties, "openslide.vendor": "ventana"}  # BIF: overlapping tiles
    g = plan_geometry(reader.level_dimensions, reader.level_downsamples, slide_mpp=0.25, target_mpp=0.25, tile_px=64)
    blocks = BlockReader(reader, g)
    assert blocks.pixel_source == "openslide" and "ventana" in blocks.fast_path_reason
    reader.close()


def test_small_cache_still_gives_the_same_pixels(jpeg_pyramid):
    reader, g, big_cache = _open(jpeg_pyramid, target_mpp=0.25, tile_px=64)
    tiny_cache = BlockReader(reader, g, cache_bytes=1)
    for row0, col0 in [(0, 0), (0, 4), (4, 0), (0, 0)]:
        np.testing.assert_array_equal(big_cache.read_block(row0, col0, 4, 4), tiny_cache.read_block(row0, col0, 4, 4))
    tiny_cache.close()
    big_cache.close()
    reader.close()


def test_fast_path_can_be_switched_off(jpeg_pyramid):
    reader, g, blocks = _open(jpeg_pyramid, fast=False)
    assert blocks.pixel_source == "openslide" and blocks.fast_path_reason
    reader.close()


def test_slice_tiles_and_downsample_validate():
    g = plan_geometry(((1000, 1000),), (1.0,), slide_mpp=0.5, target_mpp=0.5, tile_px=32, overlap_px=8)
    block = np.arange(80 * 104 * 3, dtype=np.uint32).astype(np.uint8).reshape(80, 104, 3)  # 3 rows x 4 cols
    tiles = slice_tiles(block, g, [2, 0], [3, 1])
    np.testing.assert_array_equal(tiles[0], block[48:80, 72:104])
    np.testing.assert_array_equal(tiles[1], block[0:32, 24:56])
    with pytest.raises(ValueError, match="outside the block"):
        slice_tiles(block, g, [3], [0])
    with pytest.raises(ValueError, match="upsample"):
        downsample(block, (0, 0, 10, 10), (20, 20), 0.5)


def test_fast_level_reader_reads_like_the_backend(tmp_path, jpeg_pyramid):
    from tiling.regions import FastLevelReader

    reader = open_slide(jpeg_pyramid, "openslide")
    fast = FastLevelReader(reader)
    for level in (0, 1):
        w, h = reader.level_dimensions[level]
        # whole level, a region straddling source tiles, and one past the edge (white there, as the backend)
        for x, y, width, height in [(0, 0, w, h), (100, 37, 300, 200), (w - 50, h - 20, 90, 60)]:
            ours, theirs = fast.read_region(level, x, y, width, height), reader.read_region(level, x, y, width, height)
            assert ours.shape == theirs.shape == (height, width, 3)
            assert np.abs(ours.astype(int) - theirs).mean() < 1.0
    assert all(source is not None for source in fast._sources.values())  # both levels decoded directly
    fast.close()
    # A corrupt source tile: that read falls back to the backend, which raises as it always did.
    path = write_pyramid(
        tmp_path / "bad.tif",
        texture_image(512, 512),
        downsamples=(1,),
        mpp=0.5,
        tile=256,
        description_style="none",
        resolution_tags=True,
    )
    corrupt_source_tile(path, 0, 3)
    bad_reader = open_slide(path, "openslide")
    bad = FastLevelReader(bad_reader)
    assert bad.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)
    with pytest.raises(RegionReadError):
        bad.read_region(0, 256, 256, 256, 256)
    bad.close()
    bad_reader.close()
    # Not a TIFF the fast path reads: the backend's pixels, unchanged.
    stripped = open_slide(write_stripped(tmp_path / "strips.tif", texture_image(300, 200)))
    fallback = FastLevelReader(stripped)
    np.testing.assert_array_equal(fallback.read_region(0, 10, 10, 50, 40), stripped.read_region(0, 10, 10, 50, 40))
    assert fallback._sources == {0: None}
    fallback.close()
    stripped.close()
    reader.close()
