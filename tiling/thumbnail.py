"""The slide thumbnail the tissue mask is computed on: read in bounded memory, and robust to damaged source tiles.

Any object with ``level_dimensions``, ``level_downsamples`` and ``read_region(level, x, y, width, height)`` (all in
that level's pixels) works (``ThumbnailReader``); nothing here imports the slide readers.

Damaged pixels: a source tile that fails to decode must cost the tiles it touches, not the whole slide. When a strip
of the thumbnail cannot be read, it is read again in pieces of about ``_PIECE_PX`` px; a piece that still fails is
read from another pyramid level (finer ones first, area-reduced; then coarser ones, enlarged), and a piece that no
level gives is left white (background: no tile is cut there). Each such fallback is reported through
``on_unreadable``, so the slide's provenance says where its thumbnail came from.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np

__all__ = ["ThumbnailReader", "read_thumbnail", "DEFAULT_MAX_STRIP_BYTES"]


class ThumbnailReader(Protocol):
    """The part of a slide reader that thumbnails need (``tiling.readers.SlideReader`` satisfies it)."""

    @property
    def level_dimensions(self) -> Sequence[tuple[int, int]]: ...

    @property
    def level_downsamples(self) -> Sequence[float]: ...

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...


# Reads bigger than this are split: a 40k-wide single-level slide is read 528 rows at a time.
DEFAULT_MAX_STRIP_BYTES = 64 * 1024 * 1024
# A level counts as "not coarser than the target" up to this relative excess (float noise in downsamples).
_LEVEL_TOLERANCE = 0.01
# Pieces a failed strip is read again in (px of the thumbnail's level): about two source tiles across.
_PIECE_PX = 512
# Up to this block side the thumbnail's block mean adds strided views; above it, axis sums are faster.
_STRIDED_SUM_MAX_FACTOR = 8
# A finer level is used for a failed piece only up to this many times the piece's pixels (memory: 512² px x 64 x 3).
_MAX_FINER_AREA_RATIO = 64


def read_thumbnail(
    reader: ThumbnailReader,
    slide_mpp: float,
    thumbnail_mpp: float,
    *,
    max_strip_bytes: int = DEFAULT_MAX_STRIP_BYTES,
    on_unreadable: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Read the whole slide at about ``thumbnail_mpp`` µm/px in bounded memory.

    Takes the coarsest level that is not coarser than ``thumbnail_mpp``, then box-averages it by the integer
    factor nearest to the remaining ratio, reading horizontal strips of at most ``max_strip_bytes`` (and
    column chunks when even one block row is too wide). Edge blocks that are cut off by the slide border are
    averaged over the pixels they have, so thumbnail pixel (i, j) covers level-0 pixels
    ``[j*s, (j+1)*s) x [i*s, (i+1)*s)`` with ``s = thumbnail_mpp_actual / slide_mpp``.

    With ``on_unreadable``, regions that fail to read fall back to other levels or white (module docstring) and
    each fallback is reported as one line; without it, the first read error is raised.

    Returns ``(rgb uint8 (h, w, 3), thumbnail_mpp_actual)``. When even level 0 is coarser than the target,
    level 0 is returned as is (never upsampled) and the actual mpp is ``slide_mpp``.
    """
    if not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise ValueError(f"read_thumbnail: slide_mpp must be a positive number of µm/px, got {slide_mpp!r}")
    if not (math.isfinite(thumbnail_mpp) and thumbnail_mpp > 0):
        raise ValueError(f"read_thumbnail: thumbnail_mpp must be a positive number of µm/px, got {thumbnail_mpp!r}")
    dims = list(reader.level_dimensions)
    downs = [float(d) for d in reader.level_downsamples]
    if not dims or len(dims) != len(downs):
        raise ValueError(
            f"read_thumbnail: reader reports {len(dims)} level dimensions and {len(downs)} downsamples; "
            "the slide reader is broken or the slide has no levels"
        )
    level = 0
    for i, ds in enumerate(downs):
        if slide_mpp * ds <= thumbnail_mpp * (1 + _LEVEL_TOLERANCE) and ds >= downs[level]:
            level = i
    level_mpp = slide_mpp * downs[level]
    factor = max(1, int(round(thumbnail_mpp / level_mpp)))
    width, height = (int(v) for v in dims[level])
    read = _region_reader(reader, level, on_unreadable)
    out = _block_mean_strips(read, level, width, height, factor, max_strip_bytes)
    return out, level_mpp * factor


def _checked(region: np.ndarray, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """`region` as RGB, after checking the reader returned the (x, y, w, h) `box` of `level` it was asked for."""
    x, y, w, h = box
    region = np.asarray(region)
    if region.ndim != 3 or region.shape[:2] != (h, w) or region.shape[2] < 3 or region.dtype != np.uint8:
        raise ValueError(
            f"read_thumbnail: reader returned {region.dtype} {region.shape} for a {w}x{h} read at level "
            f"{level} x={x} y={y}; expected (height, width, 3) uint8 RGB"
        )
    return region[..., :3]


def _region_reader(
    reader: ThumbnailReader, level: int, on_unreadable: Callable[[str], None] | None
) -> Callable[[tuple[int, int, int, int]], np.ndarray]:
    """read((x, y, w, h)) of `level`: strict without `on_unreadable`, else with the module docstring's fallbacks."""

    def read(box: tuple[int, int, int, int]) -> np.ndarray:
        x, y, w, h = box
        try:
            return _checked(reader.read_region(level, x, y, w, h), level, box)
        except ValueError:
            raise  # a reader that breaks the protocol is a bug, not damaged pixels
        except Exception:
            if on_unreadable is None:
                raise
        out = np.full((h, w, 3), 255, np.uint8)
        for py in range(y, y + h, _PIECE_PX):
            for px in range(x, x + w, _PIECE_PX):
                pw, ph = min(_PIECE_PX, x + w - px), min(_PIECE_PX, y + h - py)
                piece, note = _read_piece(reader, level, (px, py, pw, ph))
                out[py - y : py - y + ph, px - x : px - x + pw] = piece
                if note:
                    on_unreadable(note)
        return out

    return read


def _read_piece(reader: ThumbnailReader, level: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, str]:
    """The (x, y, w, h) `box` of `level`, or the same area from another level, or white; and a note unless read as
    asked."""
    x, y, w, h = box
    try:
        return _checked(reader.read_region(level, x, y, w, h), level, box), ""
    except Exception as exc:  # noqa: BLE001 - decode errors come in many types
        first_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    from PIL import Image

    downs = [float(d) for d in reader.level_downsamples]
    dims = list(reader.level_dimensions)
    finer = [
        k
        for k in sorted(range(len(downs)), key=lambda k: -downs[k])
        if downs[k] < downs[level] and (downs[level] / downs[k]) ** 2 <= _MAX_FINER_AREA_RATIO
    ]
    coarser = [k for k in sorted(range(len(downs)), key=lambda k: downs[k]) if downs[k] > downs[level]]
    where = f"level {level} x={x} y={y} {w}x{h}"
    for other in finer + coarser:
        ratio = downs[level] / downs[other]
        ox, oy = int(math.floor(x * ratio)), int(math.floor(y * ratio))
        ow = max(1, min(int(math.ceil((x + w) * ratio)), dims[other][0]) - ox)
        oh = max(1, min(int(math.ceil((y + h) * ratio)), dims[other][1]) - oy)
        try:
            region = _checked(reader.read_region(other, ox, oy, ow, oh), other, (ox, oy, ow, oh))
        except Exception:  # noqa: BLE001 - try the next level
            continue
        piece = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((w, h), Image.BOX))
        return piece, f"thumbnail {where} unreadable ({first_error}); read from level {other} instead"
    return (
        np.full((h, w, 3), 255, np.uint8),
        f"thumbnail {where} unreadable at every level ({first_error}); left as background",
    )


def _block_mean_strips(
    read: Callable[[tuple[int, int, int, int]], np.ndarray],
    level: int,
    width: int,
    height: int,
    factor: int,
    max_strip_bytes: int,
) -> np.ndarray:
    if width <= 0 or height <= 0:
        raise ValueError(f"read_thumbnail: level {level} has empty dimensions {width}x{height}")
    block_row_bytes = 3 * factor * width
    if block_row_bytes <= max_strip_bytes:
        rows = max(1, max_strip_bytes // block_row_bytes) * factor
        cols = width
    else:
        rows = factor
        cols = max(1, max_strip_bytes // (3 * factor * factor)) * factor
    out_h, out_w = -(-height // factor), -(-width // factor)
    out = np.empty((out_h, out_w, 3), np.uint8)
    for y in range(0, height, rows):
        h = min(rows, height - y)
        for x in range(0, width, cols):
            w = min(cols, width - x)
            region = read((x, y, w, h))
            out[y // factor : (y + h + factor - 1) // factor, x // factor : (x + w + factor - 1) // factor] = (
                _block_mean(region, factor)
            )
            del region  # free this strip before the next read, or two strips are alive at once
    return out


def _block_mean(region: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks; partial blocks at the bottom/right average only their pixels."""
    if factor == 1:
        return region.astype(np.uint8, copy=False)
    h, w = region.shape[:2]
    bh, bw = -(-h // factor), -(-w // factor)
    if h % factor or w % factor:
        padded = np.zeros((bh * factor, bw * factor, 3), region.dtype)
        padded[:h, :w] = region
        region = padded
    # uint16 holds 257 x 255.
    row_dtype = np.uint16 if factor <= 257 else np.uint32
    if factor <= _STRIDED_SUM_MAX_FACTOR:
        # Adding `factor` strided views beats numpy's reduction over a short middle axis (an Aperio 40x slide's
        # 2,450-px thumbnail level at factor 2: ~60 ms against ~200 ms), the same sums in the same integer types.
        rows = region[0::factor].astype(row_dtype)
        for i in range(1, factor):
            rows += region[i::factor]
        sums = rows[:, 0::factor].astype(np.uint32)
        for j in range(1, factor):
            sums += rows[:, j::factor]
    else:
        # Two 1-axis sums are ~20x faster than one sum over axes (1, 3).
        rows = region.reshape(bh, factor, bw * factor * 3).sum(axis=1, dtype=row_dtype)
        sums = rows.reshape(bh, bw, factor, 3).sum(axis=2, dtype=np.uint32)
    counts_y = np.minimum(factor, h - np.arange(bh) * factor)
    counts_x = np.minimum(factor, w - np.arange(bw) * factor)
    counts = (counts_y[:, None] * counts_x[None, :])[..., None]
    return ((sums + counts // 2) // counts).astype(np.uint8)
