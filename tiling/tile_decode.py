"""Decoding one TIFF page's source tiles: as stored, or reduced by 2, 4 or 8 while decoding (virtual levels).

- As stored: tifffile's codec for the page (imagecodecs: libjpeg-turbo, OpenJPEG, zlib, ...); JPEG through
  simplejpeg (TurboJPEG API, libjpeg-turbo) where it is installed and agrees with tifffile on the slide's pixels.
- JPEG at 1/r: libjpeg-turbo's scaled inverse DCT, through simplejpeg (or, without it, Pillow's `draft`;
  imagecodecs' `jpeg8_decode(shape=...)` does not scale). The entropy decoding is the same, the IDCT, colour
  conversion and upsampling shrink by r^2: a 1/2 decode costs ~0.7-0.8 of a full one through simplejpeg, about
  one full decode through Pillow (its per-call overhead), vs a full decode plus the 2x2 area mean it replaces.
- simplejpeg reads only complete JPEG streams and picks their colour space from the markers, whereas TIFF JPEG
  tiles may be abbreviated (tables shared in the TIFF tag) and Aperio stores RGB samples without a marker saying
  so (tifffile and OpenSlide follow the photometric tag). Each tile gets the shared tables spliced in and, for
  photometric RGB without JFIF, an Adobe APP14 marker with transform 0 ("RGB, no colour transform"), the marker
  libjpeg itself reads for that. `TileDecoder.adopt_simplejpeg` then decodes sample tiles both ways and keeps
  simplejpeg only where it gives tifffile's pixels (measured: bit-identical on Aperio RGB and YCbCr tiles).
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

try:  # a dependency, but the decoders below work without it (tifffile/imagecodecs and Pillow)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching _simplejpeg in the tests
    _simplejpeg = None

_JPEG = 7  # TIFF compression "new-style" JPEG (OJPEG, 6, is left to tifffile at full size)
_APERIO_J2K_YCBCR = 33003
_J2K = (33003, 33004, 33005, 34712)
_PHOTOMETRIC_RGB = 2
_SOI = b"\xff\xd8"
# APP14 "Adobe", version 100, flags 0, 0, transform 0: libjpeg then decodes 3-component samples as RGB.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
# simplejpeg must give tifffile's pixels on a sample tile to be used (libjpeg-turbo both: identical in practice).
_SIMPLEJPEG_MAX_DIFF = 1


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
        # SOI (+ Adobe RGB marker) (+ the shared tables) to put before a tile's stream (without its SOI) for
        # simplejpeg; None while simplejpeg is not in use for this page (see adopt_simplejpeg)
        self._jpeg_prefix: bytes | None = None
        self.simplejpeg_note = ""  # why JPEG tiles are not decoded by simplejpeg (set by adopt_simplejpeg)
        if self.compression == _JPEG:
            self.reduced_kind = "jpeg-dct"
        elif self.compression in _J2K:
            self.reduced_kind = "j2k-resolution"
        else:
            self.reduced_kind = ""

    def can_reduce_while_decoding(self, reduction: int) -> bool:
        """Whether tiles decode straight to 1/reduction with whole-pixel tile sides."""
        return (
            bool(self.reduced_kind)
            and reduction in (2, 4, 8)
            and self.tile_w % reduction == 0
            and self.tile_h % reduction == 0
        )

    def describe(self, reduction: int, while_decoding: bool) -> str:
        """The `decoder` recorded in provenance for tiles read at this reduction."""
        stored = f"tifffile/imagecodecs {self.compression_name}"
        if self._jpeg_prefix is not None:
            stored = f"simplejpeg {_simplejpeg.__version__} (libjpeg-turbo) {self.compression_name}"
        elif self.simplejpeg_note:
            stored += f" (simplejpeg not used: {self.simplejpeg_note})"
        if self._ycbcr_j2k:
            stored += " + YCbCr->RGB"
        if reduction == 1:
            return stored
        if while_decoding and self.reduced_kind == "jpeg-dct":
            via = f"simplejpeg {_simplejpeg.__version__}" if self._jpeg_prefix is not None else "Pillow"
            return f"libjpeg-turbo DCT scaling 1/{reduction} ({via})"
        if while_decoding and self.reduced_kind == "j2k-resolution":
            text = "OpenJPEG resolution level 1/2 (Pillow)" + (" + YCbCr->RGB" if self._ycbcr_j2k else "")
            return text + (f", then {reduction // 2}x{reduction // 2} area mean" if reduction > 2 else "")
        return f"{stored}, then {reduction}x{reduction} area mean"

    def decode(self, data: bytes, index: int) -> np.ndarray:
        """The tile as stored: RGB uint8 (tile_h, tile_w, 3)."""
        if self._jpeg_prefix is not None and data[:2] == _SOI:
            tile = _simplejpeg.decode_jpeg(self._jpeg_prefix + data[2:], colorspace="RGB")
            if tile.shape == (self.tile_h, self.tile_w, 3):
                return tile
        return self._decode_tifffile(data, index)

    def _decode_tifffile(self, data: bytes, index: int) -> np.ndarray:
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

    def adopt_simplejpeg(self, samples: list[tuple[bytes, int]]) -> str:
        """Decode JPEG tiles through simplejpeg from now on if it gives tifffile's pixels on the first of `samples`
        ((raw tile bytes, tile index)) that both decode; returns "" when adopted, else why not (also when the page
        is not JPEG or simplejpeg is not installed)."""
        self._jpeg_prefix = None
        if self.compression != _JPEG:
            return f"{self.compression_name} tiles"
        self.simplejpeg_note = self._try_simplejpeg(samples)
        return self.simplejpeg_note

    def _try_simplejpeg(self, samples: list[tuple[bytes, int]]) -> str:
        if _simplejpeg is None:
            return "not installed"
        prefix = _SOI
        if int(self.page.photometric) == _PHOTOMETRIC_RGB and not self.page.is_jfif:
            prefix += _ADOBE_RGB  # what tifffile does for such streams (Aperio): decode the samples as RGB
        tables = self._jpegtables
        if tables is not None and len(tables) > 4:
            prefix += bytes(tables[2:-2])  # the shared tables without their SOI and EOI
        for data, index in samples:
            if data[:2] != _SOI:
                continue
            try:
                reference = self._decode_tifffile(data, index)
                ours = _simplejpeg.decode_jpeg(prefix + data[2:], colorspace="RGB")
            except Exception:  # noqa: BLE001 - a corrupt sample tile: try the next one
                continue
            if ours.shape != reference.shape:
                return f"it decodes {ours.shape}, tifffile {reference.shape}"
            diff = int(np.abs(ours.astype(np.int16) - reference).max())
            if diff > _SIMPLEJPEG_MAX_DIFF:
                return f"its pixels differ from tifffile's by up to {diff} grey levels"
            self._jpeg_prefix = prefix
            return ""
        return "no sample tile decoded"

    def _jpeg_reduced(self, data: bytes, reduction: int) -> np.ndarray:
        if self._jpeg_prefix is not None and data[:2] == _SOI:
            side_h, side_w = self.tile_h // reduction, self.tile_w // reduction
            tile = _simplejpeg.decode_jpeg(
                self._jpeg_prefix + data[2:],
                colorspace="RGB",
                min_height=side_h,
                min_width=side_w,
                min_factor=reduction,
            )
            if tile.shape == (side_h, side_w, 3):
                return tile
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
