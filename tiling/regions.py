"""Reading many tiles at once: blocks of grid cells, decoded once and sliced in memory (the tiler's speed lever).

A 224-px `read_region` straddling 240/256-px JPEG source tiles decodes ~4 source tiles, so reading tile by tile
costs several times more per pixel than decoding each source tile once. `BlockReader.read_block` reads the region
under a block of grid cells in one go, and for tiled TIFFs (SVS, generic TIFF, OME-TIFF) fetches the raw bytes of
only the source tiles under it and decodes each once with tifffile ("tifffile-direct"), keeping a small LRU cache
so neighbouring blocks do not decode shared edge tiles again. Anything else goes through the backend's read_region.

Downsampling (scale > 1): the whole block is resampled at once. Integer scales (e.g. 0.5 µm/px from a 0.25 µm/px
level 0 when the pyramid jumps 1 -> 4) take the k x k area mean (PIL `reduce`), i.e. what scanners do to build
pyramid levels; other scales use PIL's BOX filter with fractional bounds: area averaging without the ringing of
LANCZOS, fast, and it never sharpens noise into tiles. Never upsampled.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from tiling.errors import RegionReadError
from tiling.geometry import TileGeometry
from tiling.readers import SlideReader

TIFF_FAST_PATH = "tifffile-direct"
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
# The fast path is checked once per slide against the backend on one source tile. OpenSlide resamples levels with
# non-integer downsamples at sub-pixel offsets (up to 0.5/downsample px): that moves single pixels by a few grey
# levels (~4 on average in tissue) but hardly moves a channel's mean, whereas colour-space mix-ups move the means by
# tens of levels and garbage moves everything.
_SELF_CHECK_MAX_CHANNEL_MEAN_DIFF = 4.0
_SELF_CHECK_MAX_MEAN_ABS_DIFF = 16.0
_EPS = 1e-6
# OpenSlide formats whose pyramid levels are plain tiled TIFF pages. Others (Ventana BIF overlapping tiles, Leica SCN
# canvases, Philips sparse tiles, ...) need OpenSlide's own stitching. tiffslide reads tiles as stored, like we do.
_FAST_PATH_OPENSLIDE_VENDORS = ("aperio", "generic-tiff")


class _TiffLevelSource:
    """Decodes the source tiles of one tiled TIFF page and assembles level-pixel regions from them."""

    def __init__(self, path: Path, level: int, level_size: tuple[int, int], n_levels: int,
                 cache_bytes: int) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        try:
            self.page = _find_page(self._tif, level, level_size, n_levels)
            _check_page(self.page)
            self._fh = open(path, "rb")
        except Exception:
            self._tif.close()
            raise
        self.path = path
        self.level = level
        self.width, self.height = level_size
        self.tile_w, self.tile_h = int(self.page.tilewidth), int(self.page.tilelength)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self.tiles_down = math.ceil(self.height / self.tile_h)
        self._offsets = self.page.dataoffsets
        self._counts = self.page.databytecounts
        self._jpegtables = getattr(self.page, "jpegtables", None)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (tile index, factor)
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)

    def _tile(self, index: int, factor: int = 1) -> np.ndarray | None:
        """Decoded source tile (tile_h, tile_w, 3), area-reduced by `factor`; None where the file stores no data.

        Only the form asked for is cached: a block read at 2x never needs the full-size tile again.
        """
        key = (index, factor)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if not self._counts[index]:
            return None
        tile = self._decode(index)
        return self._remember(key, _area_mean(tile, factor) if factor > 1 else tile)

    def _decode(self, index: int) -> np.ndarray:
        self._fh.seek(self._offsets[index])
        data = self._fh.read(self._counts[index])
        try:
            segment = self.page.decode(data, index, jpegtables=self._jpegtables)[0]
            if segment is None:
                raise ValueError("decoder returned no pixels")
            tile = np.asarray(segment).reshape(segment.shape[-3:])
            if tile.shape[-1] != 3 or tile.dtype != np.uint8:
                raise ValueError(f"decoded to {tile.shape} {tile.dtype}, expected RGB uint8")
        except Exception as exc:  # imagecodecs raises one exception type per codec
            ty, tx = divmod(index, self.tiles_across)
            raise RegionReadError(f"{self.path}: source tile {index} (level {self.level}, tile column {tx}, "
                                  f"row {ty}) cannot be decoded: {exc}") from exc
        return tile

    def _remember(self, key: tuple[int, int], tile: np.ndarray) -> np.ndarray:
        self._cache[key] = tile
        self._cache_bytes += tile.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return tile

    def can_reduce(self, x: int, y: int, width: int, height: int, factor: int) -> bool:
        """Whether level region [x, x+width) x [y, y+height) can be read area-reduced by `factor` tile by tile:
        source tiles and the region align to the factor, and the region lies inside the level."""
        return (self.tile_w % factor == 0 and self.tile_h % factor == 0 and x % factor == 0 and y % factor == 0
                and width % factor == 0 and height % factor == 0 and x >= 0 and y >= 0
                and x + width <= self.width and y + height <= self.height)

    def read(self, x: int, y: int, width: int, height: int, factor: int = 1) -> np.ndarray:
        """RGB uint8 (height, width, 3) of level pixels [x, x+width) x [y, y+height); white outside the level.

        With `factor` > 1 (only where `can_reduce` holds for the level region), coordinates and sizes are in
        level px / factor and each source tile is area-reduced once (cached), so a 2x-downsampled block costs
        little more than decoding its source tiles.
        """
        level_w, level_h = self.width // factor, self.height // factor
        tile_w, tile_h = self.tile_w // factor, self.tile_h // factor
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + width, level_w), min(y + height, level_h)
        inside = (cx0, cy0, cx1, cy1) == (x, y, x + width, y + height)
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        for ty in range(cy0 // tile_h, (cy1 - 1) // tile_h + 1):
            ty0 = ty * tile_h
            sy0, sy1 = max(cy0, ty0), min(cy1, ty0 + tile_h)
            for tx in range(cx0 // tile_w, (cx1 - 1) // tile_w + 1):
                tx0 = tx * tile_w
                sx0, sx1 = max(cx0, tx0), min(cx1, tx0 + tile_w)
                tile = self._tile(ty * self.tiles_across + tx, factor)
                dst = out[sy0 - y: sy1 - y, sx0 - x: sx1 - x]
                if tile is None:
                    dst[...] = 255
                else:
                    dst[...] = tile[sy0 - ty0: sy1 - ty0, sx0 - tx0: sx1 - tx0]
        return out

    def self_check(self, reader: SlideReader, attempts: int = 5) -> str:
        """Compare one decoded source tile with the backend's pixels; returns "" if they agree, else why not.

        Starts at the middle of the level (more likely tissue than a corner); a tile that either side cannot read
        (a corrupt tile must not switch the fast path off for the whole slide) is skipped for the next one.
        """
        n_tiles = self.tiles_across * self.tiles_down
        middle = (self.tiles_down // 2) * self.tiles_across + self.tiles_across // 2
        candidates = [i for i in [middle, *range(n_tiles)] if self._counts[i]]
        failures: list[str] = []
        for index in list(dict.fromkeys(candidates))[:attempts]:
            ty, tx = divmod(index, self.tiles_across)
            x, y = tx * self.tile_w, ty * self.tile_h
            w, h = min(self.tile_w, self.width - x), min(self.tile_h, self.height - y)
            try:
                ours = self.read(x, y, w, h).astype(np.int16)
                theirs = reader.read_region(self.level, x, y, w, h).astype(np.int16)
            except Exception as exc:
                failures.append(str(exc))
                continue
            channel_diff = float(np.abs(ours.mean(axis=(0, 1)) - theirs.mean(axis=(0, 1))).max())
            abs_diff = float(np.abs(ours - theirs).mean())
            if channel_diff > _SELF_CHECK_MAX_CHANNEL_MEAN_DIFF or abs_diff > _SELF_CHECK_MAX_MEAN_ABS_DIFF:
                return (f"decoded source tile {index} differs from {reader.backend} (channel means up to "
                        f"{channel_diff:.1f}, pixels {abs_diff:.1f} grey levels apart on average): colour space or "
                        f"format not handled by the fast path")
            return ""
        if not failures:
            return ""  # no stored tiles at all: everything is white either way
        return f"could not compare any source tile with {reader.backend}: {failures[-1]}"

    def close(self) -> None:
        self._cache.clear()
        self._fh.close()
        self._tif.close()


def _find_page(tif, level: int, level_size: tuple[int, int], n_levels: int):
    """The TIFF page holding pyramid `level`: series[0]'s level if the pyramid matches, else any page that size."""
    width, height = level_size
    if tif.series:
        levels = tif.series[0].levels
        if len(levels) == n_levels:
            page = levels[level].keyframe
            if (page.imagewidth, page.imagelength) == (width, height):
                return page
    for page in tif.pages:
        if (page.imagewidth, page.imagelength) == (width, height) and page.is_tiled:
            return page
    raise ValueError(f"no TIFF page of {width}x{height} px for level {level}")


def _check_page(page) -> None:
    from tifffile import COMPRESSION, PHOTOMETRIC, PLANARCONFIG

    if not page.is_tiled:
        raise ValueError("page is not tiled")
    if page.imagedepth != 1 or page.tiledepth != 1:
        raise ValueError("3-D tiles are not supported")
    if page.samplesperpixel != 3 or page.bitspersample != 8:
        raise ValueError(f"{page.samplesperpixel} samples of {page.bitspersample} bits, need 8-bit RGB")
    if page.planarconfig != PLANARCONFIG.CONTIG:
        raise ValueError("separate colour planes are not supported")
    jpeg = page.compression in (COMPRESSION.JPEG, COMPRESSION.OJPEG)
    # Non-JPEG YCbCr is stored subsampled; only the JPEG decoder converts it.
    if not (page.photometric == PHOTOMETRIC.RGB or (page.photometric == PHOTOMETRIC.YCBCR and jpeg)):
        raise ValueError(f"photometric {page.photometric.name} with {page.compression.name} is not supported")
    supported = {COMPRESSION.NONE, COMPRESSION.JPEG, COMPRESSION.LZW, COMPRESSION.ADOBE_DEFLATE,
                 COMPRESSION.DEFLATE, COMPRESSION.ZSTD, COMPRESSION.WEBP, COMPRESSION.PACKBITS,
                 COMPRESSION.APERIO_JP2000_RGB, COMPRESSION.APERIO_JP2000_YCBC,
                 COMPRESSION.JPEG2000}  # colour handling of each is verified by BlockReader's self-check
    if page.compression not in supported:
        raise ValueError(f"compression {page.compression.name} is not supported")


class BlockReader:
    """Reads blocks of grid cells (and single tiles) of one slide at one geometry, in output pixels.

    Not thread-safe: give each worker its own. `pixel_source` ("tifffile-direct" or the backend name) and
    `fast_path_reason` (why the fast path is off, "" when on) belong in provenance.
    """

    def __init__(self, reader: SlideReader, geometry: TileGeometry, use_tiff_fast_path: bool = True,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not 0 <= geometry.read_level < len(reader.level_dimensions):
            raise ValueError(f"{reader.path}: geometry reads level {geometry.read_level}, "
                             f"slide has {len(reader.level_dimensions)} levels")
        self.reader = reader
        self.geometry = geometry
        self._source: _TiffLevelSource | None = None
        self.fast_path_reason = "disabled by caller"
        if use_tiff_fast_path:
            self.fast_path_reason = self._open_fast_path(cache_bytes)
        self.pixel_source = TIFF_FAST_PATH if self._source is not None else reader.backend

    def _open_fast_path(self, cache_bytes: int) -> str:
        level = self.geometry.read_level
        vendor = self.reader.properties.get("openslide.vendor")
        if self.reader.backend == "openslide" and vendor not in _FAST_PATH_OPENSLIDE_VENDORS:
            return f"no TIFF fast path for OpenSlide vendor {vendor!r} (only {', '.join(_FAST_PATH_OPENSLIDE_VENDORS)})"
        try:
            source = _TiffLevelSource(Path(self.reader.path), level, self.reader.level_dimensions[level],
                                      len(self.reader.level_dimensions), cache_bytes)
        except Exception as exc:  # not a TIFF, untiled page, unsupported format: the backend reads instead
            return f"no TIFF fast path: {exc}"
        try:
            why = source.self_check(self.reader)
        except Exception as exc:
            why = f"self-check failed: {exc}"
        if why:
            source.close()
            return why
        self._source = source
        return ""

    def _read_level(self, x: int, y: int, width: int, height: int, strict: bool) -> np.ndarray:
        """Read-level pixels: fast path first. Decode errors propagate when `strict`; else the backend retries."""
        if self._source is not None:
            try:
                return self._source.read(x, y, width, height)
            except RegionReadError:
                if strict:
                    raise
            except Exception:  # an unexpected fast-path failure: the backend is the reference reader
                pass
        return self.reader.read_region(self.geometry.read_level, x, y, width, height)

    def _read_cells(self, row0: int, col0: int, n_rows: int, n_cols: int, strict: bool) -> np.ndarray:
        g = self.geometry
        if n_rows < 1 or n_cols < 1:
            raise ValueError(f"block must cover at least one cell, got {n_rows}x{n_cols}")
        out_w = (n_cols - 1) * g.step_px + g.tile_px
        out_h = (n_rows - 1) * g.step_px + g.tile_px
        if g.scale == 1.0:
            return self._read_level(col0 * g.step_px, row0 * g.step_px, out_w, out_h, strict)
        # Float bounds of the block at the read level, and the whole pixels covering them.
        fx0, fy0 = col0 * g.step_px * g.scale, row0 * g.step_px * g.scale
        fx1, fy1 = fx0 + out_w * g.scale, fy0 + out_h * g.scale
        ix0, iy0 = math.floor(fx0 + _EPS), math.floor(fy0 + _EPS)
        ix1, iy1 = math.ceil(fx1 - _EPS), math.ceil(fy1 - _EPS)
        factor = int(g.scale) if g.scale == int(g.scale) else 0
        if factor and self._source is not None and self._source.can_reduce(ix0, iy0, ix1 - ix0, iy1 - iy0, factor):
            # Same pixels as reducing the assembled region (k x k groups never straddle source tiles here).
            try:
                return self._source.read(ix0 // factor, iy0 // factor, out_w, out_h, factor)
            except RegionReadError:
                if strict:
                    raise
            except Exception:  # unexpected: take the general path below
                pass
        region = self._read_level(ix0, iy0, ix1 - ix0, iy1 - iy0, strict)
        return downsample(region, (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0), (out_w, out_h), g.scale)

    def read_block(self, row0: int, col0: int, n_rows: int, n_cols: int) -> np.ndarray:
        """RGB uint8 output pixels covering grid cells rows row0..row0+n_rows-1, cols col0..col0+n_cols-1.

        Shape ((n_rows-1)*step_px + tile_px, (n_cols-1)*step_px + tile_px, 3). Raises RegionReadError when a
        source tile under the block cannot be decoded: read the block's tiles with `read_tile` instead.
        """
        return self._read_cells(row0, col0, n_rows, n_cols, strict=True)

    def read_tile(self, row: int, col: int) -> np.ndarray:
        """One tile (tile_px, tile_px, 3); the fallback when a block fails. Tries the fast path, then the backend;
        raises RegionReadError if neither can read it."""
        return self._read_cells(row, col, 1, 1, strict=False)

    def close(self) -> None:
        """Release the fast path's file handles and cache (the reader stays open: the caller owns it)."""
        if self._source is not None:
            self._source.close()
            self._source = None


def downsample(region: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int],
               scale: float) -> np.ndarray:
    """Resample `box` (float x0, y0, x1, y1 in `region` px) of an RGB uint8 region to `size` (w, h); scale >= 1."""
    if scale < 1.0:
        raise ValueError(f"refusing to upsample (scale {scale} < 1)")
    if scale == int(scale) and all(v == int(v) for v in box):
        factor = int(scale)
        x0, y0, x1, y1 = (int(v) for v in box)
        if (x1 - x0, y1 - y0) == (size[0] * factor, size[1] * factor):
            return _area_mean(region[y0:y1, x0:x1], factor)
    image = Image.fromarray(np.ascontiguousarray(region))
    return np.asarray(image.resize(size, Image.Resampling.BOX, box=box))


def _area_mean(region: np.ndarray, factor: int) -> np.ndarray:
    """k x k area mean via PIL's `reduce` (fixed-point: exact for factors 2 and 4, within one grey level for 3);
    measured faster than numpy equivalents on both single source tiles and whole blocks."""
    if factor == 1:
        return np.ascontiguousarray(region)
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(factor))


def slice_tiles(block: np.ndarray, geometry: TileGeometry, rows_in_block, cols_in_block) -> np.ndarray:
    """Tiles (n, tile_px, tile_px, 3) cut from a block at cells (rows_in_block[i], cols_in_block[i]) (a copy)."""
    rows = np.asarray(rows_in_block, dtype=np.intp).reshape(-1)
    cols = np.asarray(cols_in_block, dtype=np.intp).reshape(-1)
    if rows.shape != cols.shape:
        raise ValueError(f"rows_in_block and cols_in_block differ in length ({rows.size} vs {cols.size})")
    tile, step = geometry.tile_px, geometry.step_px
    height, width = block.shape[:2]
    n_rows, n_cols = (height - tile) // step + 1, (width - tile) // step + 1
    if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= n_rows or cols.max() >= n_cols):
        raise ValueError(f"cells outside the block: it holds {n_rows}x{n_cols} cells")
    block = np.ascontiguousarray(block)
    s0, s1, s2 = block.strides
    # A (n_rows, n_cols, tile, tile, 3) view of every cell; fancy indexing then copies only the wanted ones.
    cells = np.lib.stride_tricks.as_strided(block, shape=(n_rows, n_cols, tile, tile, 3),
                                            strides=(s0 * step, s1 * step, s0, s1, s2), writeable=False)
    return cells[rows, cols]
