"""Slide readers behind one small typed interface, so backends swap and tests can use fakes.

Two backends: OpenSlide (SVS, NDPI, MRXS, SCN, BIF, VMS/VMU, generic tiled TIFF, DICOM) and tiffslide (OME-TIFF and
other TIFF-based files). Both give RGB uint8 arrays addressed in pixels of the level read, with everything outside
the slide (or transparent in it) white.

`open_slide(..., backend="auto")` picks a reader that sees every pyramid level: an OME-TIFF whose levels live in
SubIFDs is 1 level to OpenSlide and N levels to tiffslide. A backend "can open" a slide only if it also reads one
pixel of the coarsest level, so files whose pixels no backend can decode fail here, with both backends' reasons,
rather than halfway through tiling.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from tiling.errors import FileCheckError, RegionReadError, SlideOpenError

Backend = Literal["auto", "openslide", "tiffslide"]

# Files that may be OME/SubIFD pyramids: open both backends and keep the one that sees more levels.
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".qptiff")


@runtime_checkable
class SlideReader(Protocol):
    """What the tiler needs from a slide reader."""

    path: Path
    backend: str
    """"openslide" or "tiffslide"."""
    backend_version: str
    level_dimensions: tuple[tuple[int, int], ...]
    """(width, height) of each pyramid level, level 0 first."""
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3); x, y are pixels of `level`; outside the slide is white."""
        ...

    def close(self) -> None: ...


def _check_request(reader: SlideReader, level: int, width: int, height: int) -> None:
    if not 0 <= level < len(reader.level_dimensions):
        raise ValueError(f"{reader.path}: level {level} does not exist (slide has {len(reader.level_dimensions)})")
    if width <= 0 or height <= 0:
        raise ValueError(f"{reader.path}: region size must be positive, got {width}x{height}")


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """Composite non-premultiplied RGBA (h, w, 4) uint8 on white; returns a new (h, w, 3) uint8 array."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    # rgb*a/255 + 255*(1 - a/255), rounded; stays within 0..255.
    out = (rgb * alpha + 127) // 255 + (255 - alpha)
    return out.astype(np.uint8)


class OpenSlideReader:
    """OpenSlide backend. OpenSlide takes level-0 coordinates and returns RGBA: both hidden here."""

    backend = "openslide"

    def __init__(self, path: str | Path) -> None:
        import openslide

        self.path = Path(path)
        self._slide = openslide.OpenSlide(str(self.path))
        self.backend_version = f"openslide-python {openslide.__version__}, libopenslide {openslide.__library_version__}"
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties: Mapping[str, str] = dict(self._slide.properties)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        _check_request(self, level, width, height)
        ds = self.level_downsamples[level]
        # OpenSlide divides level-0 coordinates by the downsample; rounding keeps the sub-pixel error smallest
        # (OpenSlide resamples at fractional positions on levels with non-integer downsamples).
        x0, y0 = round(x * ds), round(y * ds)
        try:
            image = self._slide.read_region((x0, y0), level, (width, height))
        except Exception as exc:  # openslide.OpenSlideError
            # OpenSlide handles stay in an error state after a failed read: reopen so that reads of other
            # regions (the per-tile fallback) still work.
            self._reopen()
            raise RegionReadError(
                f"{self.path}: OpenSlide could not read level {level} region x={x} y={y} {width}x{height}: {exc}"
            ) from exc
        alpha_min = image.getextrema()[3][0]
        if alpha_min == 255:  # the usual case: fully opaque, drop alpha in C
            return np.asarray(image.convert("RGB"))
        return rgba_to_rgb_white(np.asarray(image))

    def _reopen(self) -> None:
        import openslide

        try:
            self._slide.close()
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception:  # keep the broken handle; the next read reports its error again
            pass

    def close(self) -> None:
        self._slide.close()


class TiffSlideReader:
    """tiffslide backend (tifffile underneath); sees OME SubIFD pyramids."""

    backend = "tiffslide"

    def __init__(self, path: str | Path) -> None:
        import tifffile
        import tiffslide

        self.path = Path(path)
        self._slide = tiffslide.TiffSlide(str(self.path))
        self.backend_version = f"tiffslide {tiffslide.__version__}, tifffile {tifffile.__version__}"
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        # tiffslide gives floats and enums; the protocol promises strings.
        self.properties: Mapping[str, str] = {k: str(v) for k, v in self._slide.properties.items() if v is not None}

    def _level0_coord(self, value: int, ds: float) -> int:
        # tiffslide maps level-0 -> level coordinates with int(x0 / ds): find the x0 that lands exactly on `value`.
        x0 = math.ceil(value * ds - 1e-6)
        while int(x0 / ds) < value:
            x0 += 1
        while x0 > 0 and int((x0 - 1) / ds) >= value:
            x0 -= 1
        return x0

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        _check_request(self, level, width, height)
        level_w, level_h = self.level_dimensions[level]
        # Clip to the level ourselves: tiffslide pads with black, we want white.
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + width, level_w), min(y + height, level_h)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.full((height, width, 3), 255, np.uint8)
        ds = self.level_downsamples[level]
        loc = (self._level0_coord(cx0, ds), self._level0_coord(cy0, ds))
        try:
            arr = self._slide.read_region(loc, level, (cx1 - cx0, cy1 - cy0), as_array=True, padding=False)
        except Exception as exc:  # tifffile/imagecodecs decode errors have many types
            raise RegionReadError(
                f"{self.path}: tiffslide could not read level {level} region x={x} y={y} {width}x{height}: {exc}"
            ) from exc
        arr = _as_rgb_uint8(arr, self.path)
        if (cx0, cy0, cx1, cy1) == (x, y, x + width, y + height):
            return arr
        out = np.full((height, width, 3), 255, np.uint8)
        out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = arr
        return out

    def close(self) -> None:
        self._slide.close()


def _as_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise RegionReadError(f"{path}: pixels are {arr.dtype}, only 8-bit RGB slides are supported")
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 3:
        return arr
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 4:
        return rgba_to_rgb_white(arr)
    raise RegionReadError(f"{path}: {channels}-channel images are not supported (need RGB)")


_BACKENDS = {"openslide": OpenSlideReader, "tiffslide": TiffSlideReader}


def _try_open(path: Path, backend: str) -> tuple[SlideReader | None, str]:
    """Open and probe one pixel of the coarsest level; returns (reader, "") or (None, why not)."""
    try:
        reader = _BACKENDS[backend](path)
    except Exception as exc:  # each backend raises its own zoo of exception types
        return None, f"{type(exc).__name__}: {exc}"
    if not reader.level_dimensions:
        reader.close()
        return None, "opened, but it has no pyramid levels"
    # One pixel of the coarsest level, else of its centre, else of level 0's centre: a single damaged source tile
    # must not pass for "no pixels can be decoded" (it costs only the tiles it touches, see tiling/thumbnail.py).
    coarsest = len(reader.level_dimensions) - 1
    probes = [(coarsest, 0, 0)] + [
        (level, w // 2, h // 2) for level in (coarsest, 0) for w, h in [reader.level_dimensions[level]]
    ]
    first_error = None
    for level, x, y in probes:
        try:
            reader.read_region(level, x, y, 1, 1)
            return reader, ""
        except Exception as exc:
            first_error = first_error or exc
    reader.close()
    return None, f"opened, but reading pixels failed: {first_error}"


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def special_file_kind(mode: int) -> str:
    """ "a named pipe (FIFO)", "a socket", ... for a st_mode that is neither a regular file nor a folder, else ""."""
    return next((what for test, what in _FILE_KINDS if test(mode)), "")


def _ifd_chain_end(fh, order: str, *, big: bool, first_ifd: int, size: int) -> tuple[int, str]:
    """Walk a TIFF's chain of directories: (an offset past the end of the file, what points there), or (0, "")."""
    count_fmt, entry_bytes, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    offset, seen = first_ifd, set()
    for index in range(100_000):
        if offset == 0 or offset in seen:
            return 0, ""
        if offset + struct.calcsize(count_fmt) > size:
            return (
                offset,
                "its TIFF header points to its first directory at"
                if index == 0
                else f"directory {index - 1} points to directory {index} at",
            )
        seen.add(offset)
        fh.seek(offset)
        n_entries = struct.unpack(order + count_fmt, fh.read(struct.calcsize(count_fmt)))[0]
        next_at = offset + struct.calcsize(count_fmt) + n_entries * entry_bytes
        if next_at + struct.calcsize(next_fmt) > size:
            return next_at + struct.calcsize(next_fmt), f"directory {index} runs to"
        fh.seek(next_at)
        offset = struct.unpack(order + next_fmt, fh.read(struct.calcsize(next_fmt)))[0]
    return 0, ""


def _tiff_data_end(path: Path) -> tuple[int, str]:
    """(the last byte a TIFF's directories or image data need, what needs it), or (0, "") when not a TIFF."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return 0, ""
        magic = struct.unpack(order + "H", head[2:4])[0]
        if magic == 42:
            first_ifd, big = struct.unpack(order + "I", head[4:8])[0], False
        elif magic == 43 and len(head) >= 16:
            first_ifd, big = struct.unpack(order + "Q", head[8:16])[0], True
        else:
            return 0, ""
        # NDPI files over 4 GiB keep only the low 32 bits of their offsets in classic TIFF fields: not walked
        walk = big or (size < 1 << 32 and path.suffix.lower() != ".ndpi")
        end, what = _ifd_chain_end(fh, order, big=big, first_ifd=first_ifd, size=size) if walk else (0, "")
    if end > size:
        return end, what
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            ends = [
                max(o + n for o, n in zip(page.dataoffsets, page.databytecounts))
                for page in tif.pages
                if getattr(page, "dataoffsets", None)
            ]
    except Exception:  # noqa: BLE001 - anything odd is for the backends to report
        return 0, ""
    return (max(ends), "its image data run to") if ends else (0, "")


def check_slide_file(path: Path) -> None:
    """Fail early, with a message that says what is wrong, for files no reader should be asked to open: not a
    regular file (a FIFO would block forever), empty, or a TIFF cut short (an interrupted copy or download)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return
    kind = special_file_kind(mode)
    if kind:
        raise FileCheckError(f"{path}: {kind}, not a regular file; it is not opened")
    size = path.stat().st_size
    if size == 0:
        raise FileCheckError(f"{path}: the file is empty (0 bytes), an interrupted copy or download? Copy it again")
    try:
        end, what = _tiff_data_end(path)
    except OSError as exc:
        raise SlideOpenError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if end > size:
        raise FileCheckError(
            f"{path}: the file is truncated: {what} byte {end:,} but the file has only {size:,} bytes "
            "(an interrupted copy or download?); copy it again"
        )


def open_slide(path: str | Path, backend: Backend = "auto", *, check_file: bool = True) -> SlideReader:
    """Open a slide with the given backend, or with `auto` the one that sees all its pyramid levels.

    `auto`: for .tif/.tiff (possibly OME with SubIFD levels) both backends are opened and the one with more levels
    wins (a tie goes to OpenSlide); for other files OpenSlide is tried first. Either way, if one backend cannot open
    the file the other is used. Raises `SlideOpenError` naming the file and every backend's reason.
    """
    path = Path(path)
    if backend not in ("auto", *_BACKENDS):
        raise ValueError(f"unknown slide backend {backend!r}: use auto, openslide or tiffslide")
    if not path.exists():
        raise SlideOpenError(f"{path}: file does not exist")
    if check_file:  # callers that ran check_slide_file themselves skip it (it parses a TIFF's directories)
        check_slide_file(path)

    if backend != "auto":
        reader, why = _try_open(path, backend)
        if reader is None:
            raise SlideOpenError(
                f"{path}: {backend} cannot open this slide ({why}); try --backend auto or the other backend"
            )
        return reader

    reasons: dict[str, str] = {}
    if path.suffix.lower() in _TIFF_SUFFIXES:
        opened: list[SlideReader] = []
        for name in ("openslide", "tiffslide"):
            reader, why = _try_open(path, name)
            if reader is None:
                reasons[name] = why
            else:
                opened.append(reader)
        if opened:
            # max() keeps the first of equals, and OpenSlide was opened first: ties go to OpenSlide.
            best = max(opened, key=lambda r: len(r.level_dimensions))
            for other in opened:
                if other is not best:
                    other.close()
            return best
    else:
        for name in ("openslide", "tiffslide"):
            reader, why = _try_open(path, name)
            if reader is not None:
                return reader
            reasons[name] = why
    detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise SlideOpenError(f"{path}: no backend can open this slide ({detail})")
