"""Typed configuration of `pathdino.data`: where tiles come from, how they are augmented, how iBOT masks are drawn.

Every default is documented once, in the class docstrings below (and in the table of docs/data.md). All three
classes validate themselves when constructed, so a bad value fails before any store is opened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from tiling.configio import ConfigError, check_choice, check_int, check_prob, check_range, fail, freeze_tuples

SAMPLING_MODES = ("tile", "slide")
AUGMENT_PATHS = ("cpu", "gpu")
DECODE_DEVICES = ("cpu", "gpu")
START_METHODS = ("forkserver", "spawn")
JITTER_IMPLS = ("fused", "torchvision")
EPOCH_REMAINDERS = ("drop", "wrap")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The project's one config error (tiling.configio); the old name stays so `except DataConfigError` keeps working.
DataConfigError = ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where training tiles come from and how they are streamed to the trainer.

    Attributes:
        stores: tile stores to train on, local folders or fsspec URLs (required, at least one).
        slides: slide ids or glob patterns (``fnmatch``, e.g. ``"TCGA-*"``) selected in every store; ``None``
            (default) selects every complete slide. An entry that matches no slide is an error.
        sampling: ``"tile"`` (default): every selected tile is drawn once per epoch. ``"slide"``: every slide
            contributes the same number of draws per epoch whatever its tile count (tiles of small slides repeat,
            large slides are subsampled, differently each epoch).
        store_weights: relative share of the epoch's draws for each store, in the order of ``stores``; ``None``
            (default) keeps natural shares (by tiles, or by slides with ``sampling="slide"``).
        samples_per_epoch: draws per epoch over all processes; ``None`` (default) = the number of selected tiles.
        shuffle_buffer_tiles: tiles each worker shuffles together (its window), default 4096, rounded up to whole
            batches. The window is read as whole shards from many slides; memory per worker is about two
            windows of encoded tiles (~16 KB each at 224 px).
        shards_in_flight: concurrent shard reads per worker, default 4 (raise for object stores).
        num_workers: DataLoader worker processes per training process, default 8; 0 reads and augments in the
            training process. Exact resume needs the same value (see docs/data.md).
        prefetch_batches: batches each worker prepares ahead, default 2 (DataLoader ``prefetch_factor``).
        path: ``"cpu"`` (default): workers decode, crop and colour-augment; ``"gpu"``: workers decode and
            crops and colour operations run batched on the training device.
        decode_device: ``"cpu"`` (default) or ``"gpu"``: with ``path="gpu"``, JPEG tiles are decoded on the
            device (``torchvision.io.decode_jpeg``); PNG tiles are always decoded by the workers.
        start_method: how workers start, ``"forkserver"`` (default) or ``"spawn"``. ``"fork"`` is refused:
            zarr 3's event-loop thread can deadlock a forked worker.
        epoch_remainder: ``"drop"`` (default): the last draws of each epoch's order that do not fill a global
            batch (fewer than world_size x batch size) are not used that epoch; ``"wrap"``: the last global batch
            is completed with draws from the start of the epoch's order, which are then used twice.
        pin_memory: pin batches in page-locked memory when the device is CUDA, default True.
        max_open_slides: slides each worker keeps open (least recently used are closed), default 512.
        skip_empty_slides: default False: a selected slide with no tiles is an error; True skips it.
        allow_mixed_resolutions: default False: slides at different µm/px (more than 5% apart) or with different
            tile sizes are an error naming two of them; True trains on the mix (a deliberate multi-scale recipe).
        resume_changed_stores: default False: resuming after the selected slides or their tile counts changed
            (slides added to a store, a store added) is an error; True continues at the same share of the epoch.
    """

    stores: tuple[str, ...]
    slides: tuple[str, ...] | None = None
    sampling: str = "tile"
    store_weights: tuple[float, ...] | None = None
    samples_per_epoch: int | None = None
    shuffle_buffer_tiles: int = 4096
    shards_in_flight: int = 4
    num_workers: int = 8
    prefetch_batches: int = 2
    path: str = "cpu"
    decode_device: str = "cpu"
    start_method: str = "forkserver"
    epoch_remainder: str = "drop"
    pin_memory: bool = True
    max_open_slides: int = 512
    skip_empty_slides: bool = False
    allow_mixed_resolutions: bool = False
    resume_changed_stores: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stores, str):
            object.__setattr__(self, "stores", (self.stores,))
        if isinstance(self.slides, str):
            object.__setattr__(self, "slides", (self.slides,))
        freeze_tuples(self, ("stores", "slides", "store_weights"))
        object.__setattr__(self, "stores", tuple(str(s) for s in self.stores))
        c = "DataConfig"
        if not self.stores:
            fail(c, "stores", self.stores, "name at least one tile store")
        if self.slides is not None and (not self.slides or not all(isinstance(s, str) and s for s in self.slides)):
            fail(c, "slides", self.slides, "expected None or a non-empty list of slide ids / glob patterns")
        check_choice(c, "sampling", self.sampling, SAMPLING_MODES)
        if self.store_weights is not None:
            w = self.store_weights
            if (
                len(w) != len(self.stores)
                or not all(isinstance(x, (int, float)) and x >= 0 for x in w)
                or not sum(w) > 0
            ):
                fail(
                    c,
                    "store_weights",
                    w,
                    f"expected {len(self.stores)} non-negative weights (one per store), not all zero",
                )
        if self.samples_per_epoch is not None:
            check_int(c, "samples_per_epoch", self.samples_per_epoch, 1)
        check_int(c, "shuffle_buffer_tiles", self.shuffle_buffer_tiles, 1)
        check_int(c, "shards_in_flight", self.shards_in_flight, 1)
        check_int(c, "num_workers", self.num_workers, 0)
        check_int(c, "prefetch_batches", self.prefetch_batches, 1)
        check_choice(c, "path", self.path, AUGMENT_PATHS)
        check_choice(c, "decode_device", self.decode_device, DECODE_DEVICES)
        if self.decode_device == "gpu" and self.path != "gpu":
            fail(c, "decode_device", self.decode_device, "decoding on the GPU needs path='gpu'")
        if self.start_method == "fork":
            fail(c, "start_method", "fork", "zarr 3 can deadlock in forked workers; use 'forkserver' or 'spawn'")
        check_choice(c, "start_method", self.start_method, START_METHODS)
        check_choice(c, "epoch_remainder", self.epoch_remainder, EPOCH_REMAINDERS)
        check_int(c, "max_open_slides", self.max_open_slides, 1)


@dataclass(frozen=True)
class AugmentConfig:
    """The multi-crop recipe: DINOv2's by default, with pathology options. Probabilities are the ones applied.

    Upstream dinov2 passes ``1 - p`` to ``RandomApply`` for Gaussian blur, so its global crop 1 is never blurred
    and global crop 2 is blurred 90% of the time (dinov2 PR #411); here ``blur_p_global=(1.0, 0.1)`` means what it
    says. The ``"dinov2_upstream"`` preset reproduces upstream's effective values ``(0.0, 0.9)``.

    Attributes:
        n_global_crops: global crops per tile, default 2 (the DINO loss pairs them).
        global_crop_px: side of a global crop, default 224. The trainer builds its backbone at this size too
            (``model.backbone.img_size`` is derived from it: one key for the crop size).
        global_crop_scale: area fraction of the tile a global crop covers, default (0.32, 1.0).
        n_local_crops: local crops per tile, default 8 (0 disables them).
        local_crop_px: side of a local crop, default 98 (a multiple of patch 14; use 96 for patch 16).
        local_crop_scale: area fraction of a local crop, default (0.05, 0.32).
        crop_aspect: aspect-ratio range (w/h) of the crop box before resizing, default (3/4, 4/3).
        hflip_p: horizontal flip probability, default 0.5.
        vflip_p: vertical flip probability, default 0.0 (pathology preset: 0.5; tiles have no "up").
        rot90: rotate every crop by a random multiple of 90 degrees, default False (pathology preset: True).
        color_jitter_p: probability of colour jitter, default 0.8; its four operations run in a random order.
        brightness, contrast, saturation: jitter strengths, defaults 0.4, 0.4, 0.2: factors in [1-s, 1+s].
        hue: hue shift range, default 0.1: a shift in [-hue, hue] of the hue circle.
        color_jitter_impl: ``"fused"`` (default): jitter and grayscale as one affine colour map per crop (no
            clamping between the four operations; hue turns the YIQ chroma plane), about 2x faster on CPU;
            ``"torchvision"``: torchvision's ColorJitter exactly (clamp after each operation, HSV hue).
        grayscale_p: probability of converting to grey, default 0.2.
        blur_p_global: Gaussian-blur probability per global crop, default (1.0, 0.1).
        blur_p_local: Gaussian-blur probability per local crop, default 0.5.
        blur_sigma: blur sigma range in pixels of the crop, default (0.1, 2.0).
        blur_kernel_px: blur kernel size, default 9 (odd).
        solarize_p_global: solarisation probability per global crop, default (0.0, 0.2).
        solarize_p_local: solarisation probability per local crop, default 0.0.
        hed_p: probability of HED stain jitter, default 0.0 (pathology preset: 0.5).
        hed_scale: each stain's optical density is multiplied by a factor in [1-s, 1+s], default 0.05.
        hed_shift: then shifted by [-b, b] in natural-log optical-density units, default 0.05 (skimage's
            ``rgb2hed`` divides these units by ln(1e6) = 13.8).
        mean, std: normalisation applied last, default ImageNet's.
    """

    n_global_crops: int = 2
    global_crop_px: int = 224
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    n_local_crops: int = 8
    local_crop_px: int = 98
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    rot90: bool = False
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_impl: str = "fused"
    grayscale_p: float = 0.2
    blur_p_global: tuple[float, ...] = (1.0, 0.1)
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_px: int = 9
    solarize_p_global: tuple[float, ...] = (0.0, 0.2)
    solarize_p_local: float = 0.0
    hed_p: float = 0.0
    hed_scale: float = 0.05
    hed_shift: float = 0.05
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        freeze_tuples(self, tuple(f.name for f in fields(self)))
        c = "AugmentConfig"
        check_int(c, "n_global_crops", self.n_global_crops, 1)
        check_int(c, "global_crop_px", self.global_crop_px, 8)
        check_int(c, "n_local_crops", self.n_local_crops, 0)
        check_int(c, "local_crop_px", self.local_crop_px, 8)
        check_range(c, "global_crop_scale", self.global_crop_scale, 1e-4, 1.0)
        check_range(c, "local_crop_scale", self.local_crop_scale, 1e-4, 1.0)
        check_range(c, "crop_aspect", self.crop_aspect, 1e-2, 1e2)
        for name in (
            "hflip_p",
            "vflip_p",
            "color_jitter_p",
            "grayscale_p",
            "blur_p_local",
            "solarize_p_local",
            "hed_p",
        ):
            check_prob(c, name, getattr(self, name))
        for name in ("blur_p_global", "solarize_p_global"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != self.n_global_crops:
                fail(c, name, value, f"expected one probability per global crop ({self.n_global_crops})")
            for v in value:
                check_prob(c, name, v)
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                fail(c, name, v, "expected a strength >= 0 (factors are drawn in [max(0, 1-s), 1+s])")
        if isinstance(self.hue, bool) or not isinstance(self.hue, (int, float)) or not 0 <= self.hue <= 0.5:
            fail(c, "hue", self.hue, "expected a value in [0, 0.5]")
        check_choice(c, "color_jitter_impl", self.color_jitter_impl, JITTER_IMPLS)
        check_range(c, "blur_sigma", self.blur_sigma, 1e-3, 100.0)
        if (
            isinstance(self.blur_kernel_px, bool)
            or not isinstance(self.blur_kernel_px, int)
            or self.blur_kernel_px < 1
            or self.blur_kernel_px % 2 == 0
        ):
            fail(c, "blur_kernel_px", self.blur_kernel_px, "expected an odd integer >= 1")
        if self.blur_kernel_px // 2 >= min(self.global_crop_px, self.local_crop_px):
            fail(c, "blur_kernel_px", self.blur_kernel_px, "the kernel radius must be smaller than every crop")
        for name in ("hed_scale", "hed_shift"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                fail(c, name, v, "expected a value in [0, 1)")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
                fail(c, name, v, "expected three numbers (R, G, B)")
        if not all(s > 0 for s in self.std):
            fail(c, "std", self.std, "every channel's std must be > 0")

    @property
    def n_crops(self) -> int:
        return self.n_global_crops + self.n_local_crops

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AugmentConfig:
        """A named recipe, optionally with fields overridden.

        - ``"dinov2"``: DINOv2's recipe with the blur probabilities it intends (the default config).
        - ``"dinov2_upstream"``: what upstream dinov2 actually applies (blur never on global crop 1, 0.9 on 2).
        - ``"pathology"``: DINOv2 plus vertical flips and 90-degree rotations, weaker colour jitter
          (0.2, 0.2, 0.1, 0.05), no solarisation and HED stain jitter with p=0.5, as in OpenMidnight.
        """
        presets: dict[str, dict[str, Any]] = {
            "dinov2": {},
            "dinov2_upstream": {"blur_p_global": (0.0, 0.9)},
            "pathology": {
                "vflip_p": 0.5,
                "rot90": True,
                "brightness": 0.2,
                "contrast": 0.2,
                "saturation": 0.1,
                "hue": 0.05,
                "solarize_p_global": (0.0, 0.0),
                "hed_p": 0.5,
            },
        }
        if name not in presets:
            raise ConfigError(f"unknown augmentation preset {name!r}; expected one of {sorted(presets)}")
        return replace(cls(), **{**presets[name], **overrides})


@dataclass(frozen=True)
class MaskConfig:
    """iBOT block masks over the patch grid of each global crop, as DINOv2 draws them.

    In every batch, ``int(mask_probability * n_global_crops * batch)`` global crops are masked; their target
    ratios are stratified over ``mask_ratio`` (crop ``i`` of ``n`` draws in the i-th of n equal sub-intervals)
    and the masked crops are spread at random over the batch. Masks are unions of rectangular blocks.

    Attributes:
        mask_probability: share of global crops that get a mask, default 0.5.
        mask_ratio: range of the masked share of a crop's patches, default (0.1, 0.5).
        min_block_patches: smallest block, in patches, default 4.
        block_aspect: block aspect-ratio range, default (0.3, 1/0.3).
        max_block_fraction: largest block as a share of the crop's patches, default 0.5.
    """

    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = 4
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    max_block_fraction: float = 0.5

    def __post_init__(self) -> None:
        freeze_tuples(self, ("mask_ratio", "block_aspect"))
        c = "MaskConfig"
        check_prob(c, "mask_probability", self.mask_probability)
        check_range(c, "mask_ratio", self.mask_ratio, 0.0, 1.0)
        check_int(c, "min_block_patches", self.min_block_patches, 1)
        check_range(c, "block_aspect", self.block_aspect, 1e-3, 1e3)
        if not isinstance(self.max_block_fraction, (int, float)) or not 0 < self.max_block_fraction <= 1:
            fail(c, "max_block_fraction", self.max_block_fraction, "expected a value in (0, 1]")


def check_patch_grid(aug: AugmentConfig, patch_size: int) -> int:
    """Patches per side of a global crop; crop sizes must be multiples of the model's patch size."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"patch_size={patch_size!r} is invalid: expected a positive integer")
    for name in ("global_crop_px",) + (("local_crop_px",) if aug.n_local_crops else ()):
        px = getattr(aug, name)
        if px % patch_size:
            lower = max(patch_size, px // patch_size * patch_size)
            raise ConfigError(
                f"AugmentConfig.{name}={px} is not a multiple of the model's patch size "
                f"{patch_size}: use {lower} or {lower + patch_size}"
            )
    return aug.global_crop_px // patch_size


def max_masked_patches(masks: MaskConfig, n_patches: int) -> int:
    """The most patches one crop can have masked (the trainer can size buffers with it)."""
    return math.floor(n_patches * masks.mask_ratio[1])
