"""JPEG source tiles through simplejpeg: tifffile's pixels exactly (full and DCT-scaled), on Aperio RGB streams with
shared tables and on JFIF YCbCr 4:4:4 and 4:2:0; refused where its colours would differ; the same tiles without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import tissue_image, write_pyramid  # noqa: E402

from tiling import tile_decode  # noqa: E402
from tiling.geometry import VIRTUAL_REDUCTIONS, grid_shape, plan_geometry  # noqa: E402
from tiling.mpp import resolve_mpp  # noqa: E402
from tiling.readers import open_slide  # noqa: E402
from tiling.regions import TIFF_FAST_PATH, BlockReader  # noqa: E402
from tiling.tiff_source import TiffLevelSource  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CMU_SVS = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"  # Aperio: RGB samples, shared tables


def _ycbcr_420(tmp_path: Path) -> Path:
    """A 4:2:0 JFIF pyramid (tifffile's default for JPEG RGB input: what most SVS-like files hold)."""
    path = tmp_path / "ycbcr420.svs"
    image = tissue_image(768, 512)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            image,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 90},
            description="Aperio Image Library test\r\n768x512 [0,0 768x512] (256x256) JPEG Q=90|MPP = 0.25",
            metadata=None,
        )
    return path


@pytest.fixture(params=["aperio-rgb", "jfif-444", "jfif-420"])
def jpeg_slide(request, tmp_path) -> Path:
    if request.param == "aperio-rgb":
        return CMU_SVS
    if request.param == "jfif-444":
        return write_pyramid(tmp_path / "jfif444.svs", tissue_image(768, 512), downsamples=(1,), mpp=0.25)
    return _ycbcr_420(tmp_path)


def _source(path: Path) -> TiffLevelSource:
    reader = open_slide(path)
    try:
        return TiffLevelSource(path, 0, reader.level_dimensions[0], len(reader.level_dimensions), 1 << 20)
    finally:
        reader.close()


def _raw_tiles(source: TiffLevelSource, n: int = 6) -> list[tuple[bytes, int]]:
    indices = np.linspace(0, len(source.page.dataoffsets) - 1, n).astype(int)
    return [(source._raw(int(i)), int(i)) for i in indices]


def test_simplejpeg_gives_tifffiles_pixels(jpeg_slide, monkeypatch):
    source = _source(jpeg_slide)
    decoder = source.decoder
    assert decoder.describe(1, False) == f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo) JPEG"
    tiles = _raw_tiles(source)
    for data, index in tiles:
        np.testing.assert_array_equal(decoder.decode(data, index), decoder._decode_tifffile(data, index))
    ours = {r: [decoder.decode_reduced(data, r) for data, _ in tiles] for r in VIRTUAL_REDUCTIONS}
    source.close()
    # The same DCT-scaled decode through Pillow (the path without simplejpeg): identical pixels, same geometry.
    monkeypatch.setattr(tile_decode, "_simplejpeg", None)
    pillow = _source(jpeg_slide)
    assert "Pillow" in pillow.decoder.describe(2, True)
    for r in VIRTUAL_REDUCTIONS:
        for (data, _), tile in zip(tiles, ours[r]):
            assert tile.shape == (pillow.tile_h // r, pillow.tile_w // r, 3)
            np.testing.assert_array_equal(tile, pillow.decoder.decode_reduced(data, r))
    pillow.close()


def _blocks(path: Path, target_mpp: float) -> tuple[object, BlockReader]:
    reader = open_slide(path)
    mpp = resolve_mpp(reader, None).mpp
    g = plan_geometry(
        reader.level_dimensions,
        reader.level_downsamples,
        slide_mpp=mpp,
        target_mpp=target_mpp,
        tile_px=96,
        overlap_px=8,
        virtual_reductions=VIRTUAL_REDUCTIONS,
    )
    return reader, BlockReader(reader, g)


@pytest.mark.parametrize("target_mpp", [0.25, 0.5, 1.0])
def test_same_tiles_without_simplejpeg(tmp_path, monkeypatch, target_mpp):
    path = _ycbcr_420(tmp_path)
    reader, fast = _blocks(path, target_mpp)
    assert fast.pixel_source == TIFF_FAST_PATH and "simplejpeg" in fast.decoder, fast.decoder
    n_rows, n_cols = grid_shape(fast.geometry, reader.level_dimensions[0])
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    with_simplejpeg = fast.read_tiles(rows, cols)
    fast.close()
    reader.close()
    monkeypatch.setattr(tile_decode, "_simplejpeg", None)  # as if it were not installed
    reader, fallback = _blocks(path, target_mpp)
    assert fallback.pixel_source == TIFF_FAST_PATH
    if target_mpp == 0.25:
        assert fallback.decoder == "tifffile/imagecodecs JPEG (simplejpeg not used: not installed)"
    else:
        assert fallback.decoder.endswith("(Pillow)"), fallback.decoder
    np.testing.assert_array_equal(fallback.read_tiles(rows, cols), with_simplejpeg)
    fallback.close()
    reader.close()


def test_simplejpeg_refused_when_its_colours_differ(monkeypatch):
    # Without the Adobe marker, libjpeg would take Aperio's RGB samples for YCbCr: the sample decode catches it and
    # tifffile decodes instead, with the reason in the decoder's description; the tiles stay right.
    monkeypatch.setattr(tile_decode, "_ADOBE_RGB", b"")
    source = _source(CMU_SVS)
    assert "differ" in source.decoder.simplejpeg_note
    assert "simplejpeg not used: its pixels differ from tifffile's" in source.decoder.describe(1, False)
    data, index = _raw_tiles(source, 1)[0]
    np.testing.assert_array_equal(source.decoder.decode(data, index), source.decoder._decode_tifffile(data, index))
    source.close()
    reader = open_slide(CMU_SVS)
    theirs = reader.read_region(0, 0, 0, 240, 240).astype(int)
    reader.close()
    source = _source(CMU_SVS)
    assert np.abs(source.read(0, 0, 240, 240).astype(int) - theirs).mean() < 2.0
    source.close()


def test_not_jpeg_is_left_to_tifffile(tmp_path):
    path = write_pyramid(tmp_path / "raw.tif", tissue_image(512, 512), downsamples=(1,), compression=None)
    source = _source(path)
    assert source.decoder.describe(1, False) == "tifffile/imagecodecs NONE"
    source.close()
