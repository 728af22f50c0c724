"""The multi-crop recipe applied to tiles: per sample in CPU workers, or batched on the training device.

Both paths take crop parameters from `params.sample_params` and run the same colour code (`colour.py`) in the same
order (crop + resize, flips/rotations, HED, colour jitter, grayscale, blur, solarisation, normalisation), so they
produce the same crops up to interpolation rounding: the CPU path resamples uint8 and returns uint8 crops (like the
PIL pipeline it replaces), the device path stays in float.
"""

from __future__ import annotations

import numpy as np
import torch

from pathdino.data.colour import colour_augment, geometry
from pathdino.data.config import AugmentConfig
from pathdino.data.params import CropParams, to_device
from pathdino.data.resize import as_channels_last, crop_resize_batched, crop_resize_cpu


def _strengths(aug: AugmentConfig) -> tuple[float, ...]:
    return (aug.brightness, aug.contrast, aug.saturation, aug.hue)


class CpuAugmenter:
    """Augments one decoded tile at a time into uint8 crops (a worker's job on the CPU path).

    Crop groups of one sample (2 global, 8 local crops) fit in a core's L2 cache, so the ~40 tensor operations of
    the recipe run on cache-resident data; buffers are reused between samples.
    """

    def __init__(self, aug: AugmentConfig):
        self.aug = aug
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def _buffer(self, n: int, px: int) -> torch.Tensor:
        key = (n, px)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(n, 3, px, px)
        return self._buffers[key]

    def __call__(
        self, tile_hwc: np.ndarray, groups: tuple[CropParams, CropParams], outs: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Write the crops of ``tile_hwc`` (H, W, 3 uint8) into ``outs`` (uint8 [n, 3, S, S] views)."""
        tile = as_channels_last(tile_hwc)
        sizes = (self.aug.global_crop_px, self.aug.local_crop_px)
        for p, out, px in zip(groups, outs, sizes):
            if len(p) == 0:
                continue
            x = crop_resize_cpu(tile, p, px, self._buffer(len(p), px))  # flips and turns included
            colour_augment(
                x, p, p.floats("cpu"), _strengths(self.aug), self.aug.blur_kernel_px, self.aug.color_jitter_impl
            )
            # Adding 0.5 before the truncating float->uint8 copy rounds to nearest.
            out.copy_(x.clamp_(0, 1).mul_(255).add_(0.5))


def augment_on_device(
    tiles: torch.Tensor, groups: tuple[CropParams, CropParams], aug: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and local crops of ``tiles`` [B, 3, H, W] (float in [0, 1], any device), normalised.

    ``groups`` hold each group's crop parameters crop-major (crop k of tile i at k * B + i); every operation
    runs once per group on the whole batch.
    """
    outs = []
    for p, px in zip(groups, (aug.global_crop_px, aug.local_crop_px)):
        if len(p) == 0:
            outs.append(tiles.new_empty(0, 3, px, px))
            continue
        x = crop_resize_batched(tiles, p, px).clamp_(0, 1)  # bicubic overshoots; the uint8 path clips too
        geometry(x, p)
        colour_augment(x, p, p.floats(tiles.device), _strengths(aug), aug.blur_kernel_px, aug.color_jitter_impl)
        outs.append(normalise(x, aug))
    return outs[0], outs[1]


def normalise(x: torch.Tensor, aug: AugmentConfig, input_max: float = 1.0) -> torch.Tensor:
    """(x / input_max - mean) / std per channel, in place on float ``x``."""
    mean = to_device(np.array(aug.mean) * input_max, x.device, np.float32).view(1, 3, 1, 1)
    std = to_device(np.array(aug.std) * input_max, x.device, np.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def uint8_to_normalised(x: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """Float normalised crops from the CPU path's uint8 crops (on whatever device ``x`` is)."""
    return normalise(x.float(), aug, input_max=255.0)
