"""Decoding one TIFF page's source tiles: as stored, or reduced by 2, 4 or 8 while decoding (virtual levels).

- As stored: tifffile's codec for the page (imagecodecs: libjpeg-turbo, OpenJPEG, zlib, ...).
- JPEG at 1/r: libjpeg-turbo's scaled inverse DCT (through Pillow's `draft`, the only scaled-decode entry point
  among our dependencies: imagecodecs' `jpeg8_decode(shape=...)` does not scale). The entropy decoding is the same,
  the IDCT, colour conversion and upsampling shrink by r^2: with Pillow's per-call overhead a 1/2 decode costs
  about one full imagecodecs decode, ~0.6 of a full decode plus the 2x2 area mean it replaces.
- JPEG 2000 at 1/r: OpenJPEG decodes only the wavelet's next lower resolution level (Pillow's `reduce`: ~1/2 of a
  full decode), then r/2 x r/2 area mean for r = 4, 8. Lower resolution levels of the codestream would be cheaper
  still, but their samples sit (f-1)/2 stored px before the centre of the f x f area they stand for (the wavelet
  low-pass is centred on even samples): 1.5 px at 1/4, 3.5 px at 1/8. Stopping at 1/2 keeps that offset at
  0.5 stored px (a quarter of a virtual pixel) whatever r.
- Anything else at 1/r: decoded as stored, then the r x r area mean.

Aperio's JPEG 2000 with YCbCr (compression 33003) stores YCbCr samples with no colour transform in the codestream:
they are converted to RGB here (OpenSlide does the same; tifffile and tiffslide return the YCbCr samples as is).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_JPEG = 7  # TIFF compression "new-style" JPEG (OJPEG, 6, is left to tifffile at full size)
_APERIO_J2K_YCBCR = 33003
_J2K = (33003, 33004, 33005, 34712)
_PHOTOMETRIC_RGB = 2


def area_mean(region: np.ndarray, factor: int) -> np.ndarray:
    """k x k area mean via PIL's `reduce` (fixed-point: exact for factors 2 and 4, within one grey level for 3);
    measured faster than numpy equivalents on both single source tiles and whole blocks."""
    if factor == 1:
        return np.ascontiguousarray(region)
    return np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(factor))


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) YCbCr uint8 (h, w, 3) to RGB, in C (Pillow)."""
    height, width = ycbcr.shape[:2]
    image = Image.frombuffer("YCbCr", (width, height), np.ascontiguousarray(ycbcr), "raw", "YCbCr", 0, 1)
    return np.asarray(image.convert("RGB"))


class TileDecoder:
    """Decodes the tiles of one TIFF page (tifffile `TiffPage`), as stored or at 1/r.

    `reduced_kind` is "jpeg-dct", "j2k-resolution" or "" (the codec cannot reduce while decoding: area mean).
    """

    def __init__(self, page) -> None:
        self.page = page
        self.compression = int(page.compression)
        self.compression_name = page.compression.name
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self._jpegtables = getattr(page, "jpegtables", None)
        self._ycbcr_j2k = self.compression == _APERIO_J2K_YCBCR
        # Pillow guesses a JPEG's colour space from its markers; tifffile follows the TIFF's photometric tag: so
        # do we, for streams stored as RGB without an Adobe marker.
        self._jpeg_colorspace = "RGB" if int(page.photometric) == _PHOTOMETRIC_RGB else ""
        if self.compression == _JPEG:
            self.reduced_kind = "jpeg-dct"
        elif self.compression in _J2K:
            self.reduced_kind = "j2k-resolution"
        else:
            self.reduced_kind = ""

    def can_reduce_while_decoding(self, reduction: int) -> bool:
        """Whether tiles decode straight to 1/reduction with whole-pixel tile sides."""
        return (bool(self.reduced_kind) and reduction in (2, 4, 8)
                and self.tile_w % reduction == 0 and self.tile_h % reduction == 0)

    def describe(self, reduction: int, while_decoding: bool) -> str:
        """The `decoder` recorded in provenance for tiles read at this reduction."""
        stored = f"tifffile/imagecodecs {self.compression_name}"
        if self._ycbcr_j2k:
            stored += " + YCbCr->RGB"
        if reduction == 1:
            return stored
        if while_decoding and self.reduced_kind == "jpeg-dct":
            return f"libjpeg-turbo DCT scaling 1/{reduction} (Pillow)"
        if while_decoding and self.reduced_kind == "j2k-resolution":
            text = "OpenJPEG resolution level 1/2 (Pillow)" + (" + YCbCr->RGB" if self._ycbcr_j2k else "")
            return text + (f", then {reduction // 2}x{reduction // 2} area mean" if reduction > 2 else "")
        return f"{stored}, then {reduction}x{reduction} area mean"

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """The tile as stored: RGB uint8 (tile_h, tile_w, 3)."""
        segment = self.page.decode(data, index, jpegtables=self._jpegtables)[0]
        if segment is None:
            raise ValueError("decoder returned no pixels")
        tile = np.asarray(segment).reshape(segment.shape[-3:])
        _check_rgb(tile)
        return ycbcr_to_rgb(tile) if self._ycbcr_j2k else tile

    def decode_reduced(self, data: bytes, reduction: int) -> np.ndarray:
        """The tile at 1/reduction, reduced while decoding: RGB uint8 (tile_h/r, tile_w/r, 3).

        Only where `can_reduce_while_decoding(reduction)`.
        """
        if self.reduced_kind == "jpeg-dct":
            tile = self._jpeg_reduced(data, reduction)
        elif self.reduced_kind == "j2k-resolution":
            image = Image.open(io.BytesIO(data))
            image.reduce = 1  # Pillow's JPEG 2000 plugin: discard the finest resolution level
            tile = np.asarray(image)
            if self._ycbcr_j2k:
                tile = ycbcr_to_rgb(tile)
            tile = area_mean(tile, reduction // 2)
        else:
            raise ValueError(f"{self.compression_name} tiles cannot be reduced while decoding")
        expected = (self.tile_h // reduction, self.tile_w // reduction, 3)
        if tile.shape != expected:
            raise ValueError(f"reduced decode gave {tile.shape}, expected {expected}")
        _check_rgb(tile)
        return tile

    def _jpeg_reduced(self, data: bytes, reduction: int) -> np.ndarray:
        tables = self._jpegtables
        if tables is not None and len(tables) > 4 and data[:2] == b"\xff\xd8":
            # An abbreviated TIFF stream: splice in the shared tables (drop their EOI and the tile's SOI).
            data = bytes(tables[:-2]) + bytes(data[2:])
        image = Image.open(io.BytesIO(data))
        if image.mode != "RGB":
            raise ValueError(f"JPEG tile decodes to mode {image.mode}, expected RGB")
        image.draft("RGB", (image.width // reduction, image.height // reduction))
        if self._jpeg_colorspace and len(image.tile) == 1:
            codec, extents, offset, args = image.tile[0]
            image.tile = [(codec, extents, offset, (args[0], self._jpeg_colorspace))]  # Pillow's jpegmode
        return np.asarray(image)


def _check_rgb(tile: np.ndarray) -> None:
    if tile.ndim != 3 or tile.shape[-1] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"decoded to {tile.shape} {tile.dtype}, expected RGB uint8")
