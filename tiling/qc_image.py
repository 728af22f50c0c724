"""A QC picture per slide (JPEG): thumbnail, tissue-mask outline, kept tiles (blue) and QC-rejected tiles (red)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tiling.fsio import atomic_path

__all__ = ["draw_qc_image", "qc_image_jpeg", "MAX_SIDE_PX", "MIN_SIDE_PX"]

MAX_SIDE_PX = 2048
"""Longest side of the saved image: big slides are shrunk to this so the picture stays small (~0.3-1.5 MB)."""
MIN_SIDE_PX = 1024
"""Small thumbnails (e.g. 8 µm/px of a 1-mm biopsy) are enlarged to this so tiles are visible."""

_MASK_RGB = (0, 200, 0)
_KEPT_RGB = (30, 60, 255)
_REJECTED_RGB = (230, 0, 0)
_JPEG_QUALITY = 90


def draw_qc_image(
    thumbnail_rgb: np.ndarray,
    mask: np.ndarray,
    tile_boxes_thumb_px: np.ndarray,
    path: str | os.PathLike,
    rejected_boxes: np.ndarray | None = None,
) -> None:
    """Save a JPEG at ``path`` showing the thumbnail, the mask outline (green), kept tiles (blue) and rejected
    tiles (red). Boxes are (n, 4) ``x0, y0, x1, y1`` in thumbnail pixels (floats allowed). The mask may have
    any size; it is stretched over the thumbnail. Written to a temporary file next to ``path`` and renamed,
    so a crash never leaves a truncated image.
    """
    data = qc_image_jpeg(thumbnail_rgb, mask, tile_boxes_thumb_px, rejected_boxes=rejected_boxes)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def qc_image_jpeg(
    thumbnail_rgb: np.ndarray,
    mask: np.ndarray,
    tile_boxes_thumb_px: np.ndarray,
    *,
    rejected_boxes: np.ndarray | None = None,
) -> bytes:
    """The QC picture of `draw_qc_image` as JPEG bytes (the tiler draws it in a worker process, so that a small
    slide's picture overlaps other slides' tiles instead of holding up the process that schedules them)."""
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"draw_qc_image: thumbnail must be RGB uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"draw_qc_image: mask must be 2-D, got shape {m.shape}")
    kept = _as_boxes(tile_boxes_thumb_px, "tile_boxes_thumb_px")
    rejected = _as_boxes(rejected_boxes, "rejected_boxes")

    h, w = rgb.shape[:2]
    longest = max(h, w)
    scale = min(MAX_SIDE_PX, max(longest, MIN_SIDE_PX)) / longest
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    if (out_w, out_h) != (w, h):
        # Shrinking: the area mean (BOX), as the thumbnail itself was made; ~3x cheaper than LANCZOS on big slides.
        image = image.resize((out_w, out_h), Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)
    canvas = np.array(image)

    mask_img = Image.fromarray(m.astype(np.uint8) * 255).resize((out_w, out_h), Image.Resampling.NEAREST)
    outline = _outline(np.asarray(mask_img) > 0, thickness=max(1, round(out_w / 800)))
    canvas[outline] = _MASK_RGB

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for boxes, colour in ((kept, _KEPT_RGB), (rejected, _REJECTED_RGB)):
        for x0, y0, x1, y1 in boxes * scale:
            # Pillow needs x1 >= x0; a tile under one output pixel is drawn as a dot.
            draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=1)

    out = io.BytesIO()
    # JPEG, not PNG: QC pictures are viewed, not archived. On a 2,048² picture of a tissue-filled 40k slide a fast
    # PNG took 0.21 s (6.4 MB), 2% of tiling the slide; JPEG q90 takes ~0.02 s (1.4 MB). 4:4:4 keeps the one-pixel
    # coloured outlines crisp (4:2:0 would smear their colour over neighbours).
    image.save(out, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def _as_boxes(boxes: np.ndarray | None, name: str) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 4), np.float64)
    b = np.asarray(boxes, np.float64)
    if b.size == 0:
        return np.zeros((0, 4), np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"draw_qc_image: {name} must be (n, 4) x0, y0, x1, y1; got shape {b.shape}")
    return b


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` px of its edge (4-neighbour erosion, repeated)."""
    inner = mask.copy()
    for _ in range(thickness):
        eroded = inner.copy()
        eroded[1:] &= inner[:-1]
        eroded[:-1] &= inner[1:]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        inner = eroded
    return mask & ~inner
