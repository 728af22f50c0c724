"""Where tiles come from: pyramid level, read size and level-0 coordinates for a physical target resolution.

Pure functions over a frozen dataclass. Tiles are laid out in OUTPUT pixels (at `target_mpp`, or the level's mpp
when within tolerance): tile (row, col) starts at output px (col*step_px, row*step_px), which is read-level px
times `scale` and level-0 px times `scale * read_downsample`.

Level choice: the level whose mpp is closest to the target among those within `tolerance` (relative) is read as is
(scale 1). Otherwise the coarsest level FINER than the target is read and downsampled by `scale` > 1. Image pixels
are never upsampled: a slide coarser than the target (beyond tolerance) is a ResolutionError.

Virtual levels (`virtual_reductions`, e.g. (2, 4, 8)): level k decoded at 1/r, which JPEG (DCT-domain scaling) and
JPEG 2000 (a lower resolution level of the wavelet) give at a fraction of a full decode's cost, and anything else
gives as an r x r area mean. They follow the same rule: when no real level is within tolerance, a virtual level
within tolerance is read as is (a 40x scan at 0.2527 µm/px: level 0 at 1/2 is 0.5054 µm/px, within 5% of 0.5);
otherwise the coarsest finer level, real or virtual, is read and resampled. Real levels win ties (they cost less to
decode than a finer level reduced). A virtual level keeps every existing field in the pixels of the stored level:
`scale` counts stored-level px per output px (= `read_reduction` when the virtual level is read as is) and
`read_reduction` says how much of it the decoder did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tiling.errors import MppError, ResolutionError, SlideError

# A scale this close to an integer is treated as that integer, so exact 2x/4x reductions stay exact.
_INTEGER_SCALE_EPS = 1e-6
VIRTUAL_REDUCTIONS = (2, 4, 8)
"""Reductions libjpeg-turbo applies in the DCT domain (and JPEG 2000 decoders natively): virtual levels on offer."""
# Finer candidates whose mpp differ by less than this are the same resolution for choosing what to read, so a
# level with downsample 3.9997 is read rather than level 0 at 1/4 (16x the decoding for a 0.01% finer grid).
_SAME_MPP_REL = 0.01


@dataclass(frozen=True)
class TileGeometry:
    """How one slide is tiled at one target resolution (all sizes in pixels, mpp in µm/px)."""

    slide_mpp: float
    """Level-0 µm/px of the slide."""
    target_mpp: float
    """Requested µm/px of the output tiles."""
    tile_px: int
    """Output tile side."""
    overlap_px: int
    """Overlap of neighbouring tiles, output px."""
    tolerance: float
    """Relative mpp distance within which a pyramid level is read as is."""
    read_level: int
    """Pyramid level read."""
    read_downsample: float
    """That level's downsample relative to level 0."""
    read_mpp: float
    """slide_mpp * read_downsample."""
    scale: float
    """Read-level px per output px: 1.0 when a level is within tolerance (read_reduction for a virtual level), else
    target_mpp / read_mpp (> 1)."""
    within_tolerance: bool
    """True when the read level itself (or the virtual level read) is within tolerance of the target (no
    resampling beyond the decoder's reduction)."""
    read_tile_px: float
    """Tile side in read-level px (tile_px * scale)."""
    step_px: int
    """Distance between tile origins, output px (tile_px - overlap_px)."""
    level0_tile_px: float
    """Tile side in level-0 px."""
    level0_step_px: float
    """Distance between tile origins in level-0 px."""
    effective_mpp: float
    """What one output pixel really spans: read_mpp * scale."""
    read_level_size: tuple[int, int]
    """(width, height) of the read level; tiles must fit inside it."""
    read_reduction: int = 1
    """The read level is decoded at 1/read_reduction (a virtual level: 2, 4 or 8; 1 = decoded as stored). It always
    divides `scale`: the decoder does read_reduction of it, resampling the rest (`resample`)."""

    @property
    def resample(self) -> float:
        """Resampling left after the decoder's reduction: 1.0 when a (real or virtual) level is read as is."""
        return self.scale / self.read_reduction


def _validate(slide_mpp: float, target_mpp: float, tile_px: int, overlap_px: int, tolerance: float) -> None:
    if not isinstance(tile_px, (int, np.integer)) or tile_px <= 0:
        raise ValueError(f"tile_px must be a positive integer, got {tile_px!r}")
    if not isinstance(overlap_px, (int, np.integer)) or not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must be an integer in [0, tile_px={tile_px}), got {overlap_px!r}")
    if not (isinstance(target_mpp, (int, float)) and math.isfinite(target_mpp) and target_mpp > 0):
        raise ValueError(f"target_mpp must be a positive number of µm per pixel, got {target_mpp!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a relative distance in [0, 1), got {tolerance!r}")
    if not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise MppError(
            f"slide mpp must be a positive number of µm per pixel, got {slide_mpp!r}; "
            f"pass --slide-mpp or an mpp column in the manifest CSV"
        )


def plan_geometry(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    *,
    slide_mpp: float,
    target_mpp: float,
    tile_px: int,
    overlap_px: int = 0,
    tolerance: float = 0.05,
    virtual_reductions: Sequence[int] = (),
) -> TileGeometry:
    """Choose the read level (real, or virtual: a level decoded at 1/r for r in `virtual_reductions`) and scale for
    tiles of `tile_px` output px at `target_mpp`.

    Raises ValueError for invalid settings, ResolutionError when the slide is coarser than the target.
    """
    _validate(slide_mpp, target_mpp, tile_px, overlap_px, tolerance)
    if not level_dimensions or len(level_dimensions) != len(level_downsamples):
        raise SlideError(
            f"slide reports {len(level_dimensions)} level sizes and {len(level_downsamples)} "
            f"downsamples; cannot plan tiles"
        )
    if any(int(r) != r or r < 2 for r in virtual_reductions):
        raise ValueError(f"virtual_reductions must be integers >= 2, got {tuple(virtual_reductions)!r}")
    level_mpps = [slide_mpp * float(ds) for ds in level_downsamples]
    read_level, reduction, within = _choose_level(
        level_mpps, target_mpp, tolerance, sorted({int(r) for r in virtual_reductions})
    )
    if read_level < 0:
        raise ResolutionError(
            f"slide resolution {slide_mpp:.4g} µm/px is coarser than the target {target_mpp:.4g} µm/px "
            f"(beyond the {tolerance:.0%} tolerance) and pathdino never upsamples pixels; use a target of at "
            f"least {slide_mpp / (1 + tolerance):.4g} µm/px, or leave this slide out. If the slide's mpp "
            f"metadata is wrong, pass --slide-mpp or an mpp column in the manifest CSV."
        )
    if within:
        scale = float(reduction)
    else:
        scale = target_mpp / level_mpps[read_level]
        if abs(scale - round(scale)) < _INTEGER_SCALE_EPS:
            scale = float(round(scale))

    read_downsample = float(level_downsamples[read_level])
    read_mpp = level_mpps[read_level]
    step_px = int(tile_px - overlap_px)
    width, height = level_dimensions[read_level]
    return TileGeometry(
        slide_mpp=float(slide_mpp),
        target_mpp=float(target_mpp),
        tile_px=int(tile_px),
        overlap_px=int(overlap_px),
        tolerance=float(tolerance),
        read_level=read_level,
        read_downsample=read_downsample,
        read_mpp=read_mpp,
        scale=scale,
        within_tolerance=within,
        read_tile_px=tile_px * scale,
        step_px=step_px,
        level0_tile_px=tile_px * scale * read_downsample,
        level0_step_px=step_px * scale * read_downsample,
        effective_mpp=read_mpp * scale,
        read_level_size=(int(width), int(height)),
        read_reduction=int(reduction),
    )


def _choose_level(
    level_mpps: list[float], target_mpp: float, tolerance: float, reductions: list[int]
) -> tuple[int, int, bool]:
    """(level, reduction, within tolerance) to read; level -1 when every level is coarser than the target."""

    def rel_dist(mpp: float) -> float:
        return abs(mpp - target_mpp) / target_mpp

    levels = range(len(level_mpps))
    within = [lv for lv in levels if rel_dist(level_mpps[lv]) <= tolerance]
    if within:
        return min(within, key=lambda lv: (rel_dist(level_mpps[lv]), lv)), 1, True
    virtual = [(lv, r) for lv in levels for r in reductions if rel_dist(level_mpps[lv] * r) <= tolerance]
    if virtual:
        # The coarsest stored level with a virtual level in tolerance decodes the least; then the closest.
        return (*min(virtual, key=lambda c: (-level_mpps[c[0]], rel_dist(level_mpps[c[0]] * c[1]), c[1])), True)
    finer = [(lv, r) for lv in levels for r in [1, *reductions] if level_mpps[lv] * r < target_mpp]
    if not finer:
        return -1, 1, False
    coarsest = max(level_mpps[lv] * r for lv, r in finer)
    same = [c for c in finer if level_mpps[c[0]] * c[1] >= coarsest * (1 - _SAME_MPP_REL)]
    # Among (nearly) equal resolutions: a real level, then the coarsest stored level, then the coarsest result.
    level, reduction = min(same, key=lambda c: (c[1] > 1, -level_mpps[c[0]], -level_mpps[c[0]] * c[1], c[0]))
    return level, reduction, False


def _count(extent_out: float, geometry: TileGeometry) -> int:
    # Small epsilon so an exact fit is not lost to float rounding.
    if extent_out + 1e-6 < geometry.tile_px:
        return 0
    return int(math.floor((extent_out - geometry.tile_px + 1e-6) / geometry.step_px)) + 1


def grid_shape(geometry: TileGeometry, level0_size: tuple[int, int]) -> tuple[int, int]:
    """(n_rows, n_cols) of tiles lying fully inside the slide (both in level 0 and in the read level)."""
    level0_w, level0_h = level0_size
    read_w, read_h = geometry.read_level_size
    # Level sizes are rounded by the scanner, so a level may be a pixel short of level0 / downsample (or long).
    avail_w = min(read_w, level0_w / geometry.read_downsample) / geometry.scale
    avail_h = min(read_h, level0_h / geometry.read_downsample) / geometry.scale
    return _count(avail_h, geometry), _count(avail_w, geometry)


def too_small_reason(geometry: TileGeometry, level0_size: tuple[int, int]) -> str:
    """Why no tile fits the slide (its grid is empty), with both sizes in pixels and µm; "" when one does."""
    if all(grid_shape(geometry, level0_size)):
        return ""
    width_px, height_px = level0_size
    tile_um = geometry.tile_px * geometry.effective_mpp
    return (
        f"slide smaller than one tile: {width_px} x {height_px} px at level 0 "
        f"({width_px * geometry.slide_mpp:,.1f} x {height_px * geometry.slide_mpp:,.1f} µm at "
        f"{geometry.slide_mpp:g} µm/px), a tile is {geometry.tile_px} px at {geometry.effective_mpp:g} µm/px "
        f"({tile_um:,.1f} µm, {geometry.level0_tile_px:,.0f} level-0 px); lower --tile-px or --target-mpp "
        "to tile it"
    )


def tile_level0_xy(geometry: TileGeometry, rows, cols) -> np.ndarray:
    """Level-0 (x, y) of each tile's top-left corner, int64 (n, 2), rounded to the nearest pixel."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1)
    cols = np.asarray(cols, dtype=np.float64).reshape(-1)
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have the same length, got {rows.size} and {cols.size}")
    level0_step = geometry.step_px * geometry.scale * geometry.read_downsample
    xy = np.stack([cols * level0_step, rows * level0_step], axis=1)
    return np.rint(xy).astype(np.int64)
