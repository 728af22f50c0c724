"""Synthetic slide pyramids written with tifffile, for tests that must not depend on real slides.

    write_pyramid(path, image, downsamples=(1, 2, 4), mpp=0.25, tile=256, compression="jpeg",
                  description_style="aperio", resolution_tags=False, layout="ifds") -> Path

- layout "ifds": every level is a top-level IFD (OpenSlide and tiffslide both see all levels);
  "subifds": OME-style, levels in SubIFDs of the first page (OpenSlide sees 1 level, tiffslide all).
- description_style "aperio": an Aperio-like ImageDescription with "|MPP = <mpp>" (read as `aperio.MPP` by both
  readers; OpenSlide treats the file as an Aperio slide); "none": a generic tiled TIFF.
- resolution_tags: write XResolution/YResolution in pixels per centimetre (scaled per level) when mpp is given.
- compression "jpeg" (quality `jpeg_quality`, RGB, no chroma subsampling), None (raw, lossless), or JPEG 2000
  codestreams (OpenJPEG, quality `j2k_level`, the PSNR it aims at; None = lossless): "jpeg2000" (TIFF compression
  34712: tiffslide reads it, OpenSlide does not), "aperio-j2k-rgb" (Aperio 33005) or "aperio-j2k-ycbcr" (Aperio
  33003: the samples are stored as full-range YCbCr, as Aperio's scanners do; OpenSlide converts them back).

Also `gradient_image(width, height)`: pixel values that encode level-0 coordinates (R = x, G = y, both < 256).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-mean downsample by an integer factor (crops the remainder), like scanners build pyramid levels."""
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    cropped = image[: h * factor, : w * factor].astype(np.float32)
    return np.rint(cropped.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))).astype(np.uint8)


def _description(style: str, width: int, height: int, tile: int, mpp: float | None, level: int) -> str | None:
    if style == "none":
        return None
    if style != "aperio":
        raise ValueError(f"description_style must be 'aperio' or 'none', got {style!r}")
    text = f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=90"
    if level == 0:
        text += "|AppMag = 40"
        if mpp is not None:
            text += f"|MPP = {mpp}"
    return text


_J2K_COMPRESSIONS = {"jpeg2000": 34712, "aperio-j2k-rgb": 33005, "aperio-j2k-ycbcr": 33003}


def rgb_to_ycbcr(image: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) BT.601 RGB -> YCbCr, uint8."""
    rgb = image.astype(np.float64)
    matrix = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycbcr = rgb @ matrix.T + np.array([0.0, 128.0, 128.0])
    return np.clip(np.rint(ycbcr), 0, 255).astype(np.uint8)


def write_pyramid(
    path: str | Path,
    image: np.ndarray,
    downsamples=(1, 2, 4),
    mpp: float | None = 0.25,
    tile: int = 256,
    compression: str | None = "jpeg",
    description_style: str = "aperio",
    resolution_tags: bool = False,
    layout: str = "ifds",
    jpeg_quality: int = 90,
    j2k_level: int | None = 80,
) -> Path:
    """Write `image` (h, w, 3) uint8 and its box-downsampled levels as a tiled pyramid TIFF; returns the path."""
    path = Path(path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
    if downsamples[0] != 1 or any(int(d) != d or d < 1 for d in downsamples):
        raise ValueError(f"downsamples must be integers starting at 1, got {downsamples}")
    if layout not in ("ifds", "subifds"):
        raise ValueError(f"layout must be 'ifds' or 'subifds', got {layout!r}")
    levels = [box_downsample(image, int(d)) for d in downsamples]
    if compression not in ("jpeg", None, *_J2K_COMPRESSIONS):
        raise ValueError(f"compression must be 'jpeg', None or one of {sorted(_J2K_COMPRESSIONS)}, got {compression!r}")
    if compression == "aperio-j2k-ycbcr":
        levels = [rgb_to_ycbcr(array) for array in levels]

    def options(level: int, array: np.ndarray) -> dict:
        opts = dict(
            tile=(tile, tile),
            photometric="rgb",
            compression=_J2K_COMPRESSIONS.get(compression, compression),
            metadata=None,
        )
        if compression == "jpeg":
            opts.update(compressionargs={"level": jpeg_quality}, subsampling=(1, 1))
        elif compression in _J2K_COMPRESSIONS:
            opts.update(compressionargs={"level": j2k_level})
        desc = _description(description_style, array.shape[1], array.shape[0], tile, mpp, level)
        if desc is not None:
            opts["description"] = desc
        if resolution_tags and mpp is not None:
            pixels_per_cm = 1e4 / (mpp * downsamples[level])
            opts.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
        return opts

    with tifffile.TiffWriter(path) as tw:
        if layout == "ifds":
            for level, array in enumerate(levels):
                # OpenSlide's generic TIFF needs reduced levels flagged (NewSubfileType 1); Aperio files leave
                # levels at 0 (1 marks the label there).
                reduced = 1 if level and description_style != "aperio" else 0
                tw.write(array, subfiletype=reduced, **options(level, array))
                if level == 0 and description_style == "aperio":
                    # Aperio's second IFD is a stripped thumbnail; readers expect it there, not a level.
                    thumb = box_downsample(image, max(1, max(image.shape[:2]) // 64))
                    tw.write(
                        thumb,
                        photometric="rgb",
                        metadata=None,
                        description=f"Aperio Image Library v12.0.0\r\n{thumb.shape[1]}x{thumb.shape[0]}",
                    )
        else:
            tw.write(levels[0], subifds=len(levels) - 1, **options(0, levels[0]))
            for level, array in enumerate(levels[1:], start=1):
                tw.write(array, subfiletype=1, **options(level, array))
    return path


def gradient_image(width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 with R = x, G = y, B = 128; width and height at most 256."""
    if width > 256 or height > 256:
        raise ValueError("gradient_image encodes coordinates in 8 bits: width and height must be <= 256")
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.full_like(x, 128)], axis=2).astype(np.uint8)


def texture_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour texture (tissue-like frequencies), (height, width, 3) uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    from PIL import Image

    big = Image.fromarray(coarse).resize(((width // 16 + 2) * 16, (height // 16 + 2) * 16), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    out = np.asarray(big)[:height, :width].astype(np.int16) + noise
    return np.clip(out, 0, 255).astype(np.uint8)


def corrupt_source_tile(path: str | Path, page_index: int, tile_index: int) -> None:
    """Overwrite the start of one stored tile (its JPEG SOI marker) so every decoder rejects it."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[page_index]
        offset = page.dataoffsets[tile_index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 16)


def write_stripped(path: str | Path, image: np.ndarray) -> Path:
    """A single-level, untiled (stripped) uncompressed RGB TIFF: only tiffslide opens it."""
    tifffile.imwrite(path, image, photometric="rgb", metadata=None, rowsperstrip=16)
    return Path(path)


def tissue_image(width: int, height: int) -> np.ndarray:
    """Real H&E pixels of any size: the bundled CMU-1-Small-Region sample mirrored (needs OpenSlide)."""
    import openslide

    sample = Path(__file__).resolve().parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
    with openslide.OpenSlide(str(sample)) as slide:
        src = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    ys = np.arange(height) % (2 * src.shape[0])
    xs = np.arange(width) % (2 * src.shape[1])
    ys = np.where(ys < src.shape[0], ys, 2 * src.shape[0] - 1 - ys)
    xs = np.where(xs < src.shape[1], xs, 2 * src.shape[1] - 1 - xs)
    return np.ascontiguousarray(src[ys[:, None], xs[None, :]])
