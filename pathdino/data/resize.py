"""Crop + resize: per crop with torch's antialiased bicubic on uint8 (CPU path), or batched as two matmuls (device).

Both give PIL-style antialiased bicubic resampling (Keys a = -0.5, support widened by the downscale factor), the
resampling torchvision's RandomResizedCrop applies to PIL images in dinov2. The batched form builds, per crop, the
[out, tile] weight matrices of torch's `_upsample_bicubic2d_aa` restricted to the crop box, so a crop of any box
is ``Wy @ tile @ Wx.T`` and a whole group of crops is one batched matmul.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pathdino.data.params import CropParams, to_device


def crop_resize_cpu(tile: torch.Tensor, p: CropParams, out_px: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [N, 3, S, S] (float) with the N crops of ``tile`` [1, 3, H, W] uint8, scaled to [0, 1], with
    their flips and quarter turns applied (on uint8, a quarter of the bytes of doing it later on floats).

    ``tile`` is best a channels-last view of the decoded HWC array: torch's uint8 antialiased kernels are
    vectorised for that layout.
    """
    for i in range(len(p)):
        top, left, h, w = int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])
        crop = tile[:, :, top : top + h, left : left + w]
        if h != out_px or w != out_px:
            crop = F.interpolate(crop, size=(out_px, out_px), mode="bicubic", antialias=True, align_corners=False)
        crop = crop[0]
        if p.hflip[i]:
            crop = crop.flip(-1)
        if p.vflip[i]:
            crop = crop.flip(-2)
        if p.rot[i]:
            crop = torch.rot90(crop, int(p.rot[i]), dims=(-2, -1))
        out[i].copy_(crop)
    return out.mul_(1 / 255)


def _bicubic_aa(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_px: int, in_px: int) -> torch.Tensor:
    """[N, out_px, in_px] weights mapping pixels [start, start + length) of an in_px line to out_px pixels."""
    dev = start.device
    start = start.to(torch.float32).view(-1, 1, 1)
    length = length.to(torch.float32).view(-1, 1, 1)
    scale = length / out_px
    support = 2.0 * scale.clamp(min=1.0)
    inv_scale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_px, device=dev, dtype=torch.float32).view(1, -1, 1) + 0.5)
    lo = torch.floor(center - support + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), length)
    j = torch.arange(in_px, device=dev, dtype=torch.float32).view(1, 1, -1) - start  # in crop coordinates
    w = _bicubic_aa((j - center + 0.5) * inv_scale) * ((j >= lo) & (j < hi))
    return w / w.sum(dim=-1, keepdim=True)


def crop_resize_batched(tiles: torch.Tensor, p: CropParams, out_px: int) -> torch.Tensor:
    """Crops [N, 3, S, S] of ``tiles`` [B, 3, H, W] (float), N = n * B ordered crop-major (crop k of tile i at
    k * B + i). Tiles smaller than H x W are padded; their boxes never reach the padding.

    Two batched matmuls without broadcasting (which would copy every tile once per crop): per tile, the n crops'
    row weights [n*S, H] times the tile [H, 3*W]; then per crop, those rows [S*3, W] times its column weights.
    """
    n_tiles, _, height, width = tiles.shape
    n = len(p) // n_tiles
    s = out_px
    dev = tiles.device
    wy = resize_weights(to_device(p.top, dev), to_device(p.height, dev), s, height).to(tiles.dtype)
    wx = resize_weights(to_device(p.left, dev), to_device(p.width, dev), s, width).to(tiles.dtype)
    wy = wy.view(n, n_tiles, s, height).transpose(0, 1).reshape(n_tiles, n * s, height)
    wx = wx.view(n, n_tiles, s, width).transpose(0, 1).reshape(n_tiles * n, s, width)
    rows = torch.bmm(wy, tiles.transpose(1, 2).reshape(n_tiles, height, 3 * width))  # [B, n*S, 3*W]
    out = torch.bmm(rows.view(n_tiles * n, s * 3, width), wx.transpose(1, 2))  # [B*n, S*3, S]: (s, c, t)
    return out.view(n_tiles, n, s, 3, s).permute(1, 0, 3, 2, 4).reshape(n * n_tiles, 3, s, s)


def as_channels_last(tile_hwc: np.ndarray) -> torch.Tensor:
    """A [1, 3, H, W] channels-last uint8 view of a decoded HWC tile (no copy)."""
    return torch.from_numpy(tile_hwc).permute(2, 0, 1).unsqueeze(0)
