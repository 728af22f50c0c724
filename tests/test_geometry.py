"""Level choice, scale and tile coordinates (pure functions; pixel-level checks are in test_regions.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tiling.errors import MppError, ResolutionError
from tiling.geometry import TileGeometry, grid_shape, plan_geometry, tile_level0_xy

PYRAMID_DIMS = ((4000, 3000), (2000, 1500), (1000, 750))
PYRAMID_DS = (1.0, 2.0, 4.0)


def test_pyramid_level_within_tolerance_is_read_as_is():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224)
    assert (g.read_level, g.scale, g.within_tolerance) == (1, 1.0, True)
    assert g.read_mpp == pytest.approx(0.5) and g.effective_mpp == pytest.approx(0.5)
    assert g.level0_tile_px == pytest.approx(448) and g.level0_step_px == pytest.approx(448)
    assert g.read_level_size == (2000, 1500)


def test_single_level_slide_is_downsampled():
    g = plan_geometry(((4000, 3000),), (1.0,), slide_mpp=0.25, target_mpp=0.5, tile_px=224)
    assert (g.read_level, g.scale, g.within_tolerance) == (0, 2.0, False)
    assert g.read_tile_px == 448.0 and g.level0_tile_px == 448.0
    assert g.effective_mpp == pytest.approx(0.5)


def test_level_within_five_percent_is_taken_and_its_real_mpp_recorded():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.2527, target_mpp=0.5, tile_px=224)
    assert (g.read_level, g.scale, g.within_tolerance) == (1, 1.0, True)
    assert g.effective_mpp == pytest.approx(0.5054)


def test_outside_tolerance_reads_finer_level_and_scales():
    # 0.2527 * 2 = 0.5054 is 1.1% off a 0.5 target: with a 0.5% tolerance it must be resampled from level 0.
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.2527, target_mpp=0.5, tile_px=224, tolerance=0.005)
    assert (g.read_level, g.within_tolerance) == (0, False)
    assert g.scale == pytest.approx(0.5 / 0.2527) and g.effective_mpp == pytest.approx(0.5)


def test_coarsest_finer_level_is_chosen():
    # target 1.5: level 1 (0.5) and level 2 (1.0) are finer; level 2 needs the least reading.
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=1.5, tile_px=224)
    assert (g.read_level, g.scale) == (2, 1.5)
    assert g.level0_tile_px == pytest.approx(224 * 1.5 * 4)


def test_closest_level_within_tolerance_wins():
    g = plan_geometry(((100, 100), (50, 50), (49, 49)), (1.0, 2.0, 2.04), slide_mpp=0.25, target_mpp=0.507,
                      tile_px=16)
    assert g.read_level == 2  # 0.51 is closer to 0.507 than 0.50


def test_integer_scale_is_snapped():
    g = plan_geometry(((1000, 1000),), (1.0,), slide_mpp=0.1, target_mpp=0.3, tile_px=16)
    assert g.scale == 3.0  # 0.3 / 0.1 is 2.9999999999999996 in floats


def test_coarser_slide_never_upsamples():
    with pytest.raises(ResolutionError) as info:
        plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.5, target_mpp=0.25, tile_px=224)
    message = str(info.value)
    assert "0.5" in message and "0.25" in message and "upsample" in message


def test_slightly_coarser_within_tolerance_is_accepted():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.26, target_mpp=0.25, tile_px=224)
    assert (g.read_level, g.scale, g.within_tolerance) == (0, 1.0, True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tile_px=0), "tile_px"),
    (dict(tile_px=224, overlap_px=224), "overlap_px"),
    (dict(tile_px=224, overlap_px=-1), "overlap_px"),
    (dict(tile_px=224, target_mpp=0.0), "target_mpp"),
    (dict(tile_px=224, tolerance=-0.1), "tolerance"),
])
def test_invalid_settings_are_value_errors(kwargs, match):
    args = dict(level_dimensions=PYRAMID_DIMS, level_downsamples=PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_geometry(**args)


def test_invalid_slide_mpp_is_a_slide_error():
    with pytest.raises(MppError):
        plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.0, target_mpp=0.5, tile_px=224)


def test_geometry_is_frozen():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.scale = 3.0  # type: ignore[misc]
    assert isinstance(g, TileGeometry)


def test_grid_counts_only_whole_tiles():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224)
    assert grid_shape(g, (4000, 3000)) == (1500 // 224, 2000 // 224)
    with_overlap = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224,
                                 overlap_px=24)
    # columns: 224 + 200 * (n - 1) <= 2000 -> n = 9; rows: <= 1500 -> n = 7
    assert grid_shape(with_overlap, (4000, 3000)) == (7, 9)
    downsampled = plan_geometry(((4000, 3000),), (1.0,), slide_mpp=0.25, target_mpp=0.5, tile_px=224)
    assert grid_shape(downsampled, (4000, 3000)) == (3000 // 448, 4000 // 448)
    assert grid_shape(g, (100, 100)) == (0, 0)


def test_grid_respects_a_read_level_shorter_than_level0_implies():
    # Real pyramids round level sizes: 2967 / 2 = 1483.5 but the level holds 1483 rows.
    dims, ds = ((2220, 2967), (1110, 1483)), (1.0, 2.000337)
    g = plan_geometry(dims, ds, slide_mpp=0.25, target_mpp=0.5, tile_px=1483)
    assert grid_shape(g, dims[0])[0] == 1
    g = plan_geometry(dims, ds, slide_mpp=0.25, target_mpp=0.5, tile_px=1484)
    assert grid_shape(g, dims[0])[0] == 0


def test_tile_level0_coordinates():
    g = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224, overlap_px=24)
    xy = tile_level0_xy(g, [0, 1, 2], [0, 3, 1])
    assert xy.dtype == np.int64 and xy.shape == (3, 2)
    np.testing.assert_array_equal(xy, [[0, 0], [3 * 400, 400], [400, 800]])  # level-0 step = 200 * 2
    odd = plan_geometry(((4000, 3000),), (1.0,), slide_mpp=0.2527, target_mpp=0.5, tile_px=224)
    np.testing.assert_array_equal(tile_level0_xy(odd, [1], [2]),
                                  [[round(2 * 224 * 0.5 / 0.2527), round(224 * 0.5 / 0.2527)]])
    with pytest.raises(ValueError):
        tile_level0_xy(g, [0, 1], [0])
