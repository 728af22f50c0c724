"""Virtual pyramid levels: a stored level decoded at 1/2, 1/4, 1/8 (JPEG DCT scaling, JPEG 2000 resolution levels).

Checked in pixels: coordinates (a gradient whose values are its level-0 position), quality against the area mean
of the same pixels read at full resolution by the backend, the self-check that switches reduced decoding off, and
end to end through `run_tiling` (provenance: level, reduction, decoder, µm/px).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import corrupt_source_tile, gradient_image, tissue_image, write_pyramid  # noqa: E402

from tiling.config import TilingConfig  # noqa: E402
from tiling.errors import RegionReadError  # noqa: E402
from tiling.geometry import VIRTUAL_REDUCTIONS, grid_shape, plan_geometry, tile_level0_xy  # noqa: E402
from tiling.inputs import collect_slides  # noqa: E402
from tiling.mpp import resolve_mpp  # noqa: E402
from tiling.readers import open_slide  # noqa: E402
from tiling.regions import TIFF_FAST_PATH, BlockReader  # noqa: E402
from tiling.runner import run_tiling  # noqa: E402
from tiling.store import TileStore  # noqa: E402
from tiling.tissue import TissueConfig  # noqa: E402
from tiling.tile_decode import TileDecoder  # noqa: E402

J2K = ["jpeg2000", "aperio-j2k-rgb", "aperio-j2k-ycbcr"]
SUFFIX = {"jpeg2000": ".tif"}  # OpenSlide cannot read TIFF compression 34712: tiffslide does


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    return tissue_image(1024, 1024)


def _slide(tmp_path: Path, image: np.ndarray, compression, mpp=0.25, downsamples=(1, 16), tile=256) -> Path:
    name = f"{compression or 'raw'}{SUFFIX.get(compression, '.svs')}"
    return write_pyramid(tmp_path / name, image, downsamples=downsamples, mpp=mpp, tile=tile, compression=compression)


def _open(path: Path, target_mpp: float, tile_px: int = 224, overlap_px: int = 0, fast: bool = True):
    reader = open_slide(path)
    mpp = resolve_mpp(reader, None).mpp
    g = plan_geometry(
        reader.level_dimensions,
        reader.level_downsamples,
        slide_mpp=mpp,
        target_mpp=target_mpp,
        tile_px=tile_px,
        overlap_px=overlap_px,
        virtual_reductions=VIRTUAL_REDUCTIONS,
    )
    return reader, g, BlockReader(reader, g, use_tiff_fast_path=fast)


@pytest.mark.parametrize("compression", ["jpeg", *J2K, None])
@pytest.mark.parametrize("target_mpp, reduction", [(0.5, 2), (1.0, 4), (2.0, 8)])
def test_virtual_level_geometry_in_pixels(tmp_path, compression, target_mpp, reduction):
    # R = level-0 x, G = level-0 y (gradient_image), 32-px source tiles.
    image = gradient_image(256, 256)
    path = _slide(tmp_path, image, compression, mpp=0.25, downsamples=(1,), tile=32)
    reader, g, blocks = _open(path, target_mpp, tile_px=16, overlap_px=4)
    assert (g.read_level, g.read_reduction, g.scale, g.within_tolerance) == (0, reduction, reduction, True)
    assert g.effective_mpp == pytest.approx(target_mpp) and g.level0_tile_px == 16 * reduction
    assert blocks.pixel_source == TIFF_FAST_PATH, blocks.fast_path_reason
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    assert n_cols == (256 - 16 * reduction) // (12 * reduction) + 1
    # JPEG 2000's 1/2 resolution level sits half a stored pixel before the area it stands for (see tile_decode).
    phase = -0.5 if compression in J2K else 0.0
    for row, col in [(0, 0), (1, min(2, n_cols - 1)), (n_rows - 1, n_cols - 1)]:
        tile = blocks.read_tile(row, col).astype(float)
        x0, y0 = tile_level0_xy(g, [row], [col])[0]
        assert (x0, y0) == (col * 12 * reduction, row * 12 * reduction)
        for j in (1, g.tile_px - 2):
            expected = (j + 0.5) * reduction - 0.5 + phase
            assert abs(tile[8, j, 0] - (x0 + expected)) <= 1.5
            assert abs(tile[j, 8, 1] - (y0 + expected)) <= 1.5
    reader.close()


# Measured on these real-tissue pixels (CMU-1 mirrored, q90 JPEG / ~57 dB JPEG 2000): JPEG 1/2, 1/4, 1/8 54-56 dB;
# JPEG 2000 29 dB at 1/2 (the half-pixel phase; 44 dB against the area mean shifted by it), 33 / 38 dB at 1/4, 1/8.
@pytest.mark.parametrize("compression, min_psnr", [("jpeg", 45.0), *[(c, 26.0) for c in J2K]])
@pytest.mark.parametrize("target_mpp", [0.5, 1.0])
def test_reduced_decoding_is_close_to_the_area_mean(tmp_path, tissue, compression, min_psnr, target_mpp):
    path = _slide(tmp_path, tissue, compression)
    reader, g, fast = _open(path, target_mpp)
    kind = "DCT scaling" if compression == "jpeg" else "OpenJPEG resolution level 1/2"
    assert kind in fast.decoder and "off" not in fast.decoder, fast.decoder
    slow = BlockReader(reader, g, use_tiff_fast_path=False)  # the backend's full-resolution pixels, area mean
    assert slow.decoder == f"{reader.backend} read_region, then {g.read_reduction}x{g.read_reduction} area mean"
    n_rows, n_cols = grid_shape(g, reader.level_dimensions[0])
    ours, reference = fast.read_block(0, 0, n_rows, n_cols), slow.read_block(0, 0, n_rows, n_cols)
    assert ours.shape == reference.shape == ((n_rows - 1) * 224 + 224, (n_cols - 1) * 224 + 224, 3)
    assert psnr(ours, reference) >= min_psnr
    assert np.abs(ours.mean(axis=(0, 1)) - reference.mean(axis=(0, 1))).max() < 1.5
    if compression != "jpeg" and target_mpp == 0.5:
        # Against the area mean of the same pixels half a stored pixel earlier, JPEG 2000 agrees closely too.
        full = reader.read_region(0, 0, 0, n_cols * 448 + 2, n_rows * 448 + 2)
        shifted = np.asarray(
            Image.fromarray(full).resize(
                (n_cols * 224, n_rows * 224),
                Image.Resampling.BOX,
                box=(0.5, 0.5, n_cols * 448 + 0.5, n_rows * 448 + 0.5),
            )
        )
        assert psnr(ours[1:, 1:], shifted[:-1, :-1]) >= 38.0  # box starts at +0.5: ours[1] ~ shifted[0]
    reader.close()


@pytest.mark.parametrize("compression", ["jpeg", "aperio-j2k-ycbcr"])
def test_reduced_decoding_resamples_the_rest(tmp_path, tissue, compression):
    # 0.7 µm/px: level 0 at 1/2 (0.5 µm/px) is the nearest finer level; the remaining 1.4x is a BOX resample.
    path = _slide(tmp_path, tissue, compression)
    reader, g, fast = _open(path, 0.7, tile_px=96)
    assert (g.read_reduction, g.resample, g.within_tolerance) == (2, pytest.approx(1.4), False)
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    a, b = fast.read_block(1, 1, 3, 4), slow.read_block(1, 1, 3, 4)
    assert a.shape == b.shape == (288, 384, 3)
    assert psnr(a, b) >= (40.0 if compression == "jpeg" else 28.0)
    reader.close()


def test_self_check_switches_reduced_decoding_off_when_it_disagrees(tmp_path, tissue, monkeypatch):
    path = _slide(tmp_path, tissue, "jpeg")
    original = TileDecoder.decode_reduced
    monkeypatch.setattr(TileDecoder, "decode_reduced", lambda self, data, r: 255 - original(self, data, r))
    reader, g, fast = _open(path, 0.5)
    assert fast.pixel_source == TIFF_FAST_PATH  # the stored-level decode still agrees
    assert "2x2 area mean" in fast.decoder and "reduced decoding off" in fast.decoder and "differs" in fast.decoder
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    assert psnr(fast.read_block(0, 0, 2, 2), slow.read_block(0, 0, 2, 2)) >= 45.0
    reader.close()


def test_aperio_ycbcr_jpeg2000_uses_the_fast_path_with_right_colours(tmp_path, tissue):
    # tifffile returns 33003's YCbCr samples as they are; the fast path converts them (as OpenSlide does).
    path = _slide(tmp_path, tissue, "aperio-j2k-ycbcr", mpp=0.5)
    reader, g, fast = _open(path, 0.5)
    assert reader.backend == "openslide" and (g.read_level, g.read_reduction) == (0, 1)
    assert fast.pixel_source == TIFF_FAST_PATH, fast.fast_path_reason
    assert "YCbCr->RGB" in fast.decoder
    slow = BlockReader(reader, g, use_tiff_fast_path=False)
    a, b = fast.read_block(0, 0, 4, 4), slow.read_block(0, 0, 4, 4)
    assert np.abs(a.astype(int) - b).mean() < 2.0
    assert psnr(a, tissue[:896, :896]) >= 35.0
    reader.close()


def test_corrupt_source_tile_under_a_virtual_level_costs_only_its_tiles(tmp_path, tissue):
    path = _slide(tmp_path, tissue, "jpeg", mpp=0.25, downsamples=(1,))
    corrupt_source_tile(path, 0, 5)  # level-0 x in [256, 512), y in [256, 512): output px [128, 256)
    reader, g, blocks = _open(path, 0.5, tile_px=64)
    assert "DCT" in blocks.decoder and grid_shape(g, reader.level_dimensions[0]) == (8, 8)
    with pytest.raises(Exception, match="source tile 5"):
        blocks.read_block(0, 0, 8, 8)
    assert blocks.read_tile(0, 0).shape == (64, 64, 3)
    with pytest.raises(RegionReadError):
        blocks.read_tile(2, 2)
    reader.close()


def test_run_records_level_reduction_decoder_and_mpp(tmp_path):
    # An Aperio 40x-like scan: 0.2527 µm/px, levels 1 and 4, so 0.5 µm/px comes from level 0 at 1/2 as is.
    image = tissue_image(2048, 2048)
    path = write_pyramid(tmp_path / "scan40x.svs", image, downsamples=(1, 4), mpp=0.2527)
    url = tmp_path / "tiles.zarr"
    cfg = TilingConfig(
        workers=1, tile_px=128, tiles_per_shard=32, tiles_per_chunk=16, tissue=TissueConfig(thumbnail_mpp=2.0)
    )
    [outcome] = run_tiling(collect_slides([str(path)]), str(url), cfg)
    assert outcome.status == "done" and outcome.n_tiles > 0, outcome.reason
    slide = TileStore(url).slide("scan40x")
    attrs = slide.attrs
    assert (attrs["read_level"], attrs["read_reduction"], attrs["scale"]) == (0, 2, 2.0)
    assert attrs["within_tolerance"] and attrs["effective_mpp"] == pytest.approx(0.5054)
    assert attrs["level0_tile_px"] == 256 and attrs["pixel_source"] == TIFF_FAST_PATH
    assert attrs["decoder"] == f"libjpeg-turbo DCT scaling 1/2 (simplejpeg {simplejpeg.__version__})"
    assert (slide.coords % 256 == 0).all()
    tiles = slide.read_tiles(0, slide.n_tiles)
    assert tiles.shape[1:] == (128, 128, 3)
    x, y = slide.coords[0]
    expected = image[y : y + 256, x : x + 256].reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert psnr(tiles[0], expected) >= 30.0  # q90 source and q90 store, two JPEG generations

    # Stored levels only: a different params_key (the slide is redone) and the 1.98x resample to exactly 0.5.
    stored_only = dataclasses.replace(cfg, virtual_levels=False)
    assert stored_only.params_key() != cfg.params_key()
    [outcome] = run_tiling(collect_slides([str(path)]), str(url), stored_only)
    assert outcome.status == "done"
    attrs = TileStore(url).slide("scan40x").attrs
    assert (attrs["read_reduction"], attrs["within_tolerance"]) == (1, False)
    assert attrs["scale"] == pytest.approx(0.5 / 0.2527) and attrs["effective_mpp"] == pytest.approx(0.5)
    assert attrs["decoder"] == f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo) JPEG"
