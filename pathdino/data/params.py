"""Random parameters of every crop of a sample, drawn from (seed, epoch, position) alone.

Both augmentation paths (CPU workers, batched on the device) take their crops from here, so they produce the same
crop boxes, flips and colour parameters for the same sample; worker RNG state never enters. Each crop consumes a
fixed block of `SLOTS` uniforms, so adding an option later does not shift the others.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from pathdino.data.config import AugmentConfig
from pathdino.data.plan import TAG_SAMPLE, counter_rng

SLOTS = 48
# torchvision's ColorJitter applies brightness (0), contrast (1), saturation (2), hue (3) in a random order.
JITTER_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int64)
_RRC_ATTEMPTS = 10


@dataclass
class CropParams:
    """Parameters of N crops (numpy arrays, first axis = crop).

    Attributes:
        top, left, height, width: the crop box in tile pixels (int64).
        hflip, vflip: flips; rot: quarter turns counter-clockwise (0-3).
        jitter: colour jitter on; factors: [N, 4] brightness, contrast, saturation factors and hue shift;
            order: [N, 4] the order of those four operations.
        gray, blur, solarize, hed: switches; sigma: blur sigma; hed_alpha, hed_beta: [N, 3] stain scale, shift.
    """

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray
    rot: np.ndarray
    jitter: np.ndarray
    factors: np.ndarray
    order: np.ndarray
    gray: np.ndarray
    blur: np.ndarray
    sigma: np.ndarray
    solarize: np.ndarray
    hed: np.ndarray
    hed_alpha: np.ndarray
    hed_beta: np.ndarray

    def __len__(self) -> int:
        return len(self.top)

    @staticmethod
    def crop_major(per_sample: list[CropParams]) -> CropParams:
        """Join per-sample params [n crops each] into one group ordered crop-major (crop k of sample i at k*B+i)."""
        out = {}
        for f in fields(CropParams):
            stacked = np.stack([getattr(p, f.name) for p in per_sample], axis=1)  # [n, B, ...]
            out[f.name] = stacked.reshape((-1,) + stacked.shape[2:])
        return CropParams(**out)

    def floats(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The continuous parameters as float32 tensors on ``device`` (the switches stay numpy, on the host)."""
        return {
            name: to_device(getattr(self, name), device, np.float32)
            for name in ("factors", "sigma", "hed_alpha", "hed_beta")
        }


def to_device(a: np.ndarray | list | tuple, device: torch.device | str, dtype: type | None = None) -> torch.Tensor:
    """A host array on ``device`` without synchronising it: a blocking host-to-GPU copy waits for every kernel
    queued before it, which would stall the training step; a non-blocking copy from pageable memory is staged
    at once and is safe because the source is never reused."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def _uniform(u: np.ndarray, low: float, high: float) -> np.ndarray:
    return low + (high - low) * u


def random_resized_crop(
    u: np.ndarray, tile_h: int, tile_w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[np.ndarray, ...]:
    """torchvision's RandomResizedCrop.get_params, vectorised over crops; u is [N, 22] uniforms.

    Ten attempts at (area fraction in ``scale``, log-uniform aspect in ``ratio``); the first box that fits wins,
    else the centre crop clipped to ``ratio``. Returns (top, left, height, width).
    """
    area = tile_h * tile_w
    target = area * _uniform(u[:, 0 : 2 * _RRC_ATTEMPTS : 2], *scale)
    aspect = np.exp(_uniform(u[:, 1 : 2 * _RRC_ATTEMPTS : 2], math.log(ratio[0]), math.log(ratio[1])))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint rounds half to even, like Python's round
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= tile_w) & (h > 0) & (h <= tile_h)
    first = fits.argmax(axis=1)
    rows = np.arange(len(u))
    h, w = h[rows, first], w[rows, first]
    ok = fits.any(axis=1)
    if not ok.all():
        in_ratio = tile_w / tile_h
        if in_ratio < min(ratio):
            fw, fh = tile_w, round(tile_w / min(ratio))
        elif in_ratio > max(ratio):
            fh, fw = tile_h, round(tile_h * max(ratio))
        else:
            fw, fh = tile_w, tile_h
        h, w = np.where(ok, h, fh), np.where(ok, w, fw)
    top = np.floor(u[:, 2 * _RRC_ATTEMPTS] * (tile_h - h + 1)).astype(np.int64)
    left = np.floor(u[:, 2 * _RRC_ATTEMPTS + 1] * (tile_w - w + 1)).astype(np.int64)
    top = np.where(ok, top, (tile_h - h) // 2)
    left = np.where(ok, left, (tile_w - w) // 2)
    return top, left, h, w


def crop_params(
    u: np.ndarray,
    tile_h: int,
    tile_w: int,
    scale: tuple[float, float],
    aug: AugmentConfig,
    blur_p: np.ndarray,
    solarize_p: np.ndarray,
) -> CropParams:
    """Parameters of N crops of one group from uniforms u [N, SLOTS]; blur_p/solarize_p are per crop."""
    top, left, h, w = random_resized_crop(u[:, 0:22], tile_h, tile_w, scale, aug.crop_aspect)
    n = len(u)
    b, c, s = aug.brightness, aug.contrast, aug.saturation
    factors = np.stack(
        [
            _uniform(u[:, 26], max(0.0, 1 - b), 1 + b),
            _uniform(u[:, 27], max(0.0, 1 - c), 1 + c),
            _uniform(u[:, 28], max(0.0, 1 - s), 1 + s),
            _uniform(u[:, 29], -aug.hue, aug.hue),
        ],
        axis=1,
    )
    hed_u = u[:, 36:42]
    return CropParams(
        top=top,
        left=left,
        height=h,
        width=w,
        hflip=u[:, 22] < aug.hflip_p,
        vflip=u[:, 23] < aug.vflip_p,
        rot=np.floor(u[:, 24] * 4).astype(np.int64) if aug.rot90 else np.zeros(n, dtype=np.int64),
        jitter=u[:, 25] < aug.color_jitter_p,
        factors=factors,
        order=JITTER_ORDERS[np.floor(u[:, 30] * len(JITTER_ORDERS)).astype(np.int64)],
        gray=u[:, 31] < aug.grayscale_p,
        blur=u[:, 32] < blur_p,
        sigma=_uniform(u[:, 33], *aug.blur_sigma),
        solarize=u[:, 34] < solarize_p,
        hed=u[:, 35] < aug.hed_p,
        hed_alpha=_uniform(hed_u[:, 0:3], 1 - aug.hed_scale, 1 + aug.hed_scale),
        hed_beta=_uniform(hed_u[:, 3:6], -aug.hed_shift, aug.hed_shift),
    )


def sample_params(
    aug: AugmentConfig, seed: int, epoch: int, position: int, tile_h: int, tile_w: int
) -> tuple[CropParams, CropParams]:
    """(global, local) crop parameters of the sample at virtual ``position`` of ``epoch``."""
    u = counter_rng(seed, TAG_SAMPLE, epoch, position).random((aug.n_crops, SLOTS))
    ng = aug.n_global_crops
    g = crop_params(
        u[:ng],
        tile_h,
        tile_w,
        aug.global_crop_scale,
        aug,
        np.asarray(aug.blur_p_global),
        np.asarray(aug.solarize_p_global),
    )
    loc = crop_params(
        u[ng:],
        tile_h,
        tile_w,
        aug.local_crop_scale,
        aug,
        np.full(aug.n_local_crops, aug.blur_p_local),
        np.full(aug.n_local_crops, aug.solarize_p_local),
    )
    return g, loc
