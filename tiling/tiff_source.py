"""The TIFF fast path: one tiled TIFF page's source tiles fetched as raw bytes, decoded once each and cached.

`TiffLevelSource.read` assembles level pixels (or pixels of the level at 1/r, a virtual level) from the source
tiles under a region; `self_check` compares its pixels with the slide backend's before the tiler trusts it.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tiling.errors import RegionReadError
from tiling.readers import SlideReader
from tiling.tile_decode import TileDecoder, area_mean

# The fast path is checked once per slide against the backend on one source tile. OpenSlide resamples levels with
# non-integer downsamples at sub-pixel offsets (up to 0.5/downsample px): that moves single pixels by a few grey
# levels (~4 on average in tissue) but hardly moves a channel's mean, whereas colour-space mix-ups move the means by
# tens of levels and garbage moves everything. Reduced decodes are compared with the backend's pixels area-reduced:
# DCT scaling and wavelet low-pass filters differ from an area mean by ~1 grey level on average (docs/tiling.md).
SELF_CHECK_MAX_CHANNEL_MEAN_DIFF = 4.0
SELF_CHECK_MAX_MEAN_ABS_DIFF = 16.0

# How a reduced (factor > 1) read reduces each source tile.
AREA_MEAN = "area-mean"
WHILE_DECODING = "while-decoding"


class TiffLevelSource:
    """Decodes the source tiles of one tiled TIFF page and assembles level-pixel regions from them."""

    def __init__(self, path: Path, level: int, level_size: tuple[int, int], n_levels: int, cache_bytes: int) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        try:
            self.page = find_page(self._tif, level, level_size, n_levels)
            check_page(self.page)
            self.decoder = TileDecoder(self.page)
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
        self._cache: OrderedDict[tuple[int, int, str], np.ndarray] = OrderedDict()  # (tile, factor, how)
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self.decoder.adopt_simplejpeg([(self._raw(i), i) for i in self._sample_indices(3)])

    def _sample_indices(self, n: int) -> list[int]:
        """Up to n stored tiles, the level's middle one first (more likely tissue than a corner)."""
        middle = (self.tiles_down // 2) * self.tiles_across + self.tiles_across // 2
        order = itertools.chain([middle], (i for i in range(len(self._counts)) if i != middle))
        stored = (i for i in order if i < len(self._counts) and self._counts[i])
        return list(itertools.islice(stored, n))

    def _raw(self, index: int) -> bytes:
        self._fh.seek(self._offsets[index])
        return self._fh.read(self._counts[index])

    def _tile(self, index: int, factor: int, how: str) -> np.ndarray | None:
        """Decoded source tile at 1/factor (reduced `how`); None where the file stores no data.

        Only the form asked for is cached: a block read at 2x never needs the full-size tile again.
        """
        key = (index, factor, how)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if not self._counts[index]:
            return None
        data = self._raw(index)
        try:
            if factor > 1 and how == WHILE_DECODING:
                tile = self.decoder.decode_reduced(data, factor)
            else:
                tile = area_mean(self.decoder.decode(data, index), factor)
        except Exception as exc:  # imagecodecs and Pillow raise one exception type per codec
            ty, tx = divmod(index, self.tiles_across)
            raise RegionReadError(
                f"{self.path}: source tile {index} (level {self.level}, tile column {tx}, "
                f"row {ty}) cannot be decoded: {exc}"
            ) from exc
        return self._remember(key, tile)

    def _remember(self, key: tuple[int, int, str], tile: np.ndarray) -> np.ndarray:
        self._cache[key] = tile
        self._cache_bytes += tile.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return tile

    def can_reduce(self, x: int, y: int, width: int, height: int, factor: int) -> bool:
        """Whether level region [x, x+width) x [y, y+height) can be read area-reduced by `factor` tile by tile:
        source tiles and the region align to the factor, and the region lies inside the level."""
        return (
            self.tile_w % factor == 0
            and self.tile_h % factor == 0
            and x % factor == 0
            and y % factor == 0
            and width % factor == 0
            and height % factor == 0
            and x >= 0
            and y >= 0
            and x + width <= self.width
            and y + height <= self.height
        )

    def read(self, x: int, y: int, width: int, height: int, factor: int = 1, how: str = AREA_MEAN) -> np.ndarray:
        """RGB uint8 (height, width, 3) of level pixels [x, x+width) x [y, y+height); white outside the level.

        With `factor` > 1 (source tile sides divisible by it), coordinates and sizes are in level px / factor (a
        virtual level, ceil(level size / factor) px) and each source tile is reduced once (cached): by an area mean
        of its full decode, or `WHILE_DECODING` (only where the decoder can) by the codec itself.
        """
        out = np.empty((height, width, 3), np.uint8)
        self.read_into(out, x, y, factor, how)
        return out

    def read_into(self, out: np.ndarray, x: int, y: int, factor: int = 1, how: str = AREA_MEAN) -> None:
        """`read` into `out` (height, width, 3) uint8, which may be a view (a tile of a preallocated stack): the
        pixels are copied once, from the cached source tiles straight to their destination."""
        if self.tile_w % factor or self.tile_h % factor:
            raise ValueError(f"source tiles of {self.tile_w}x{self.tile_h} px cannot be reduced by {factor}")
        height, width = out.shape[:2]
        level_w, level_h = -(-self.width // factor), -(-self.height // factor)
        tile_w, tile_h = self.tile_w // factor, self.tile_h // factor
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + width, level_w), min(y + height, level_h)
        if (cx0, cy0, cx1, cy1) != (x, y, x + width, y + height):
            out[...] = 255
        if cx1 <= cx0 or cy1 <= cy0:
            return
        for ty in range(cy0 // tile_h, (cy1 - 1) // tile_h + 1):
            ty0 = ty * tile_h
            sy0, sy1 = max(cy0, ty0), min(cy1, ty0 + tile_h)
            for tx in range(cx0 // tile_w, (cx1 - 1) // tile_w + 1):
                tx0 = tx * tile_w
                sx0, sx1 = max(cx0, tx0), min(cx1, tx0 + tile_w)
                tile = self._tile(ty * self.tiles_across + tx, factor, how)
                dst = out[sy0 - y : sy1 - y, sx0 - x : sx1 - x]
                if tile is None:
                    dst[...] = 255
                else:
                    dst[...] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]

    def self_check(self, reader: SlideReader, factor: int = 1, how: str = AREA_MEAN, attempts: int = 5) -> str:
        """Compare one source tile, decoded (at 1/factor, reduced `how`), with the backend's pixels (area-reduced
        by factor); returns "" if they agree, else why not.

        Starts at the middle of the level (more likely tissue than a corner); a tile that either side cannot read
        (a corrupt tile must not switch the fast path off for the whole slide) is skipped for the next one.
        """
        failures: list[str] = []
        for index in self._sample_indices(attempts):
            ty, tx = divmod(index, self.tiles_across)
            x, y = tx * self.tile_w, ty * self.tile_h
            # Whole factor x factor groups inside the level only: the backend pads with white beyond it.
            w = (min(self.tile_w, self.width - x) // factor) * factor
            h = (min(self.tile_h, self.height - y) // factor) * factor
            if w < factor or h < factor:
                continue
            try:
                ours = self.read(x // factor, y // factor, w // factor, h // factor, factor, how).astype(np.int16)
                theirs = area_mean(reader.read_region(self.level, x, y, w, h), factor).astype(np.int16)
            except Exception as exc:
                failures.append(str(exc))
                continue
            channel_diff = float(np.abs(ours.mean(axis=(0, 1)) - theirs.mean(axis=(0, 1))).max())
            abs_diff = float(np.abs(ours - theirs).mean())
            if channel_diff > SELF_CHECK_MAX_CHANNEL_MEAN_DIFF or abs_diff > SELF_CHECK_MAX_MEAN_ABS_DIFF:
                what = "decoded source tile" if factor == 1 else f"source tile decoded at 1/{factor}"
                return (
                    f"{what} {index} differs from {reader.backend} (channel means up to "
                    f"{channel_diff:.1f}, pixels {abs_diff:.1f} grey levels apart on average): colour space or "
                    f"format not handled by the fast path"
                )
            return ""
        if not failures:
            return ""  # no stored tiles at all: everything is white either way
        return f"could not compare any source tile with {reader.backend}: {failures[-1]}"

    def close(self) -> None:
        self._cache.clear()
        self._fh.close()
        self._tif.close()


def find_page(tif, level: int, level_size: tuple[int, int], n_levels: int):
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


def check_page(page) -> None:
    """Raise ValueError unless the fast path can decode this page (8-bit RGB tiles in a supported codec)."""
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
    supported = {
        COMPRESSION.NONE,
        COMPRESSION.JPEG,
        COMPRESSION.LZW,
        COMPRESSION.ADOBE_DEFLATE,
        COMPRESSION.DEFLATE,
        COMPRESSION.ZSTD,
        COMPRESSION.WEBP,
        COMPRESSION.PACKBITS,
        COMPRESSION.APERIO_JP2000_RGB,
        COMPRESSION.APERIO_JP2000_YCBC,
        COMPRESSION.JPEG2000,
    }  # colour handling of each is verified by BlockReader's self-check
    if page.compression not in supported:
        raise ValueError(f"compression {page.compression.name} is not supported")
