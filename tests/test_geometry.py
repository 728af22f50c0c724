"""Level choice, scale and tile coordinates (pure functions; pixel-level checks are in test_regions.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tiling.errors import MppError, ResolutionError
from tiling.geometry import VIRTUAL_REDUCTIONS, TileGeometry, grid_shape, plan_geometry, tile_level0_xy

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
    g = plan_geometry(((100, 100), (50, 50), (49, 49)), (1.0, 2.0, 2.04), slide_mpp=0.25, target_mpp=0.507, tile_px=16)
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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile_px=0), "tile_px"),
        (dict(tile_px=224, overlap_px=224), "overlap_px"),
        (dict(tile_px=224, overlap_px=-1), "overlap_px"),
        (dict(tile_px=224, target_mpp=0.0), "target_mpp"),
        (dict(tile_px=224, tolerance=-0.1), "tolerance"),
    ],
)
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
    with_overlap = plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224, overlap_px=24)
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
    np.testing.assert_array_equal(
        tile_level0_xy(odd, [1], [2]), [[round(2 * 224 * 0.5 / 0.2527), round(224 * 0.5 / 0.2527)]]
    )
    with pytest.raises(ValueError):
        tile_level0_xy(g, [0, 1], [0])


# --- virtual levels (a stored level decoded at 1/2, 1/4, 1/8) ---------------------------------------------------

APERIO_40X_DIMS = ((40000, 30000), (10000, 7500), (2500, 1875))
APERIO_40X_DS = (1.0, 4.0, 16.0)


def _virtual(dims=APERIO_40X_DIMS, ds=APERIO_40X_DS, slide_mpp=0.2527, target_mpp=0.5, **kwargs):
    return plan_geometry(
        dims,
        ds,
        slide_mpp=slide_mpp,
        target_mpp=target_mpp,
        tile_px=224,
        virtual_reductions=VIRTUAL_REDUCTIONS,
        **kwargs,
    )


def test_virtual_level_within_tolerance_is_read_as_is():
    # The 40x scan: no stored level within 5% of 0.5, level 0 at 1/2 is 0.5054 µm/px.
    g = _virtual()
    assert (g.read_level, g.read_reduction, g.within_tolerance) == (0, 2, True)
    assert g.scale == 2.0 and g.resample == 1.0
    assert g.read_mpp == pytest.approx(0.2527) and g.effective_mpp == pytest.approx(0.5054)
    assert g.read_tile_px == 448 and g.level0_tile_px == 448 and g.level0_step_px == 448
    assert grid_shape(g, APERIO_40X_DIMS[0]) == (30000 // 448, 40000 // 448)
    np.testing.assert_array_equal(tile_level0_xy(g, [0, 2, 5], [1, 0, 7]), [[448, 0], [0, 896], [7 * 448, 5 * 448]])
    # Without virtual levels the same slide is resampled by 1.98 from level 0, to exactly 0.5 µm/px.
    stored_only = plan_geometry(APERIO_40X_DIMS, APERIO_40X_DS, slide_mpp=0.2527, target_mpp=0.5, tile_px=224)
    assert (stored_only.read_level, stored_only.read_reduction) == (0, 1)
    assert stored_only.scale == pytest.approx(0.5 / 0.2527) and stored_only.effective_mpp == pytest.approx(0.5)


def test_stored_level_within_tolerance_beats_a_closer_virtual_one():
    # Level 1 at 0.52 (4% off) is read as is although level 0 at 1/2 would be exactly 0.5: it decodes 4x less.
    g = _virtual(dims=((4000, 4000), (1923, 1923)), ds=(1.0, 2.08), slide_mpp=0.25)
    assert (g.read_level, g.read_reduction, g.scale) == (1, 1, 1.0)


def test_virtual_level_of_the_coarsest_stored_level_is_preferred():
    # target 2.0 on 0.25 µm/px: level 1 (1.0) at 1/2 and level 0 at 1/8 are both 2.0; level 1 decodes 16x less.
    g = _virtual(dims=((8000, 8000), (2000, 2000)), ds=(1.0, 4.0), slide_mpp=0.25, target_mpp=2.0)
    assert (g.read_level, g.read_reduction, g.scale, g.resample) == (1, 2, 2.0, 1.0)
    assert g.level0_tile_px == pytest.approx(224 * 8)


def test_outside_tolerance_resamples_from_the_nearest_finer_level_virtual_or_not():
    # target 0.7 on 0.25 µm/px, levels 1 and 4: level 0 at 1/2 (0.5) is the nearest finer one; 1.4x remains.
    g = _virtual(dims=((8000, 8000), (2000, 2000)), ds=(1.0, 4.0), slide_mpp=0.25, target_mpp=0.7)
    assert (g.read_level, g.read_reduction, g.within_tolerance) == (0, 2, False)
    assert g.scale == pytest.approx(2.8) and g.resample == pytest.approx(1.4)
    assert g.effective_mpp == pytest.approx(0.7) and g.level0_tile_px == pytest.approx(224 * 2.8)
    # A stored level (nearly) as fine as a virtual one is read instead: 3.9997 vs 4 is the same resolution.
    g = _virtual(dims=((8000, 8000), (2000, 2000)), ds=(1.0, 3.9997), slide_mpp=0.25, target_mpp=1.5)
    assert (g.read_level, g.read_reduction) == (1, 1)
    # With a tight tolerance the 40x scan is resampled from level 0 at full resolution (1/2 would be coarser).
    g = _virtual(tolerance=0.005)
    assert (g.read_level, g.read_reduction, g.within_tolerance) == (0, 1, False)


def test_virtual_levels_never_upsample():
    with pytest.raises(ResolutionError):
        _virtual(slide_mpp=0.6, target_mpp=0.5)


def test_invalid_virtual_reductions_are_value_errors():
    with pytest.raises(ValueError, match="virtual_reductions"):
        plan_geometry(PYRAMID_DIMS, PYRAMID_DS, slide_mpp=0.25, target_mpp=0.5, tile_px=224, virtual_reductions=(1,))
