"""Multi-crop augmentation of pathdino.data: crop geometry, colour operations against torchvision, HED jitter,
batched resizing, and agreement of the CPU and device paths."""

from __future__ import annotations

import importlib.resources
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from pathdino.data.augment import CpuAugmenter, augment_on_device, uint8_to_normalised
from pathdino.data.colour import (
    RGB_FROM_HED,
    adjust_hue,
    blend_step,
    colour_jitter,
    gaussian_blur,
    grayscale,
    hed_jitter,
    jitter_affine,
    solarize,
)
from pathdino.data.config import AugmentConfig, DataConfigError
from pathdino.data.params import CropParams, random_resized_crop, sample_params
from pathdino.data.resize import crop_resize_batched, resize_weights


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A 256x256 RGB region of real H&E tissue from the bundled slide."""
    import openslide

    path = importlib.resources.files("pathdino") / "sample_data" / "CMU-1-Small-Region.svs"
    with openslide.OpenSlide(str(path)) as slide:
        return np.array(slide.read_region((900, 1200), 0, (256, 256)).convert("RGB"))


def crops_of(tissue: np.ndarray, n: int = 6, px: int = 48) -> torch.Tensor:
    t = torch.from_numpy(tissue).permute(2, 0, 1).float() / 255
    return torch.stack([t[:, 20 * i : 20 * i + px, 25 * i : 25 * i + px] for i in range(n)]).contiguous()


# -- crop geometry ---------------------------------------------------------------------------------------------


def test_crop_boxes_respect_scale_and_aspect_ranges():
    aug = AugmentConfig()
    rng = np.random.default_rng(0)
    for scale in (aug.global_crop_scale, aug.local_crop_scale):
        top, left, h, w = random_resized_crop(rng.random((4000, 22)), 224, 224, scale, aug.crop_aspect)
        area = h * w / 224**2
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
        # Rounding the box to whole pixels moves the area by at most ~1 px per side.
        slack = 2.5 * (h + w) / 224**2
        assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
        assert area.min() < scale[0] + 0.05 and area.max() > scale[1] - 0.05  # the whole range is used
        aspect = w / h
        assert (aspect > 0.75 * 0.93).all() and (aspect < 4 / 3 * 1.07).all()
        assert len(np.unique(top)) > 50 and len(np.unique(left)) > 50


def test_crop_falls_back_to_a_centre_crop_like_torchvision():
    top, left, h, w = random_resized_crop(np.full((3, 22), 0.5), 50, 100, (1.0, 1.0), (1.0, 1.0))
    assert (h == 50).all() and (w == 50).all() and (left == 25).all() and (top == 0).all()


def test_parameters_depend_on_seed_epoch_and_position_only():
    aug = AugmentConfig()
    a = sample_params(aug, 1, 2, 3, 224, 224)
    b = sample_params(aug, 1, 2, 3, 224, 224)
    assert all(np.array_equal(getattr(a[0], f), getattr(b[0], f)) for f in CropParams.__dataclass_fields__)
    for other in (
        sample_params(aug, 1, 2, 4, 224, 224),
        sample_params(aug, 1, 3, 3, 224, 224),
        sample_params(aug, 2, 2, 3, 224, 224),
    ):
        assert not np.array_equal(a[1].top, other[1].top)


@pytest.mark.parametrize(
    "preset,blur,solarize_p",
    [
        ("dinov2", (1.0, 0.1, 0.5), (0.0, 0.2)),
        ("dinov2_upstream", (0.0, 0.9, 0.5), (0.0, 0.2)),
        ("pathology", (1.0, 0.1, 0.5), (0.0, 0.0)),
    ],
)
def test_blur_and_solarize_probabilities_are_the_configured_ones(preset, blur, solarize_p):
    aug = AugmentConfig.preset(preset)
    params = [sample_params(aug, 0, 0, pos, 224, 224) for pos in range(1500)]
    g_blur = np.mean([p[0].blur for p in params], axis=0)
    l_blur = np.mean([p[1].blur for p in params])
    g_sol = np.mean([p[0].solarize for p in params], axis=0)
    assert np.allclose(g_blur, blur[:2], atol=0.04) and abs(l_blur - blur[2]) < 0.04
    assert np.allclose(g_sol, solarize_p, atol=0.04)
    jitter = np.mean([p[1].jitter for p in params])
    assert abs(jitter - 0.8) < 0.04


def test_presets_and_validation():
    path = AugmentConfig.preset("pathology")
    assert path.vflip_p == 0.5 and path.rot90 and path.hed_p == 0.5 and path.solarize_p_global == (0.0, 0.0)
    assert (path.brightness, path.contrast, path.saturation, path.hue) == (0.2, 0.2, 0.1, 0.05)
    with pytest.raises(DataConfigError, match="unknown augmentation preset"):
        AugmentConfig.preset("nope")
    with pytest.raises(DataConfigError, match="blur_p_global"):
        AugmentConfig(blur_p_global=(1.0,))
    with pytest.raises(DataConfigError, match="color_jitter_impl"):
        AugmentConfig(color_jitter_impl="pil")
    with pytest.raises(DataConfigError, match="hflip_p"):
        AugmentConfig(hflip_p=1.5)


# -- colour operations against torchvision ----------------------------------------------------------------------


def test_exact_jitter_operations_match_torchvision(tissue):
    x = crops_of(tissue)
    n = len(x)
    f = torch.linspace(0.6, 1.4, n)
    ones = torch.ones(n)
    cases = [
        (lambda v: blend_step(v, f, None, None), TF.adjust_brightness),
        (lambda v: blend_step(v, f, None, ones), TF.adjust_contrast),
        (lambda v: blend_step(v, f, ones, None), TF.adjust_saturation),
    ]
    for ours, theirs in cases:
        expected = torch.stack([theirs(x[i], float(f[i])) for i in range(n)])
        assert torch.allclose(ours(x.clone()), expected, atol=1e-5)
    shifts = torch.linspace(-0.5, 0.45, n)
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(n)])
    assert torch.allclose(adjust_hue(x.clone(), shifts), expected, atol=1e-5)
    assert torch.allclose(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)
    assert torch.allclose(solarize(x.clone()), TF.solarize(x, 128 / 255), atol=1e-7)
    sigma = torch.linspace(0.1, 2.0, n)
    expected = torch.stack([TF.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2) for i in range(n)])
    assert torch.allclose(gaussian_blur(x, sigma, 9), expected, atol=1e-5)


def test_exact_colour_jitter_follows_each_crops_order(tissue):
    aug = AugmentConfig(color_jitter_impl="torchvision")
    x = crops_of(tissue, n=8)
    p = sample_params(aug, 0, 0, 11, 48, 48)[1]
    p.jitter[:] = True
    factors = torch.from_numpy(p.factors.astype(np.float32))
    ours = x.clone()
    colour_jitter(ours, p, factors, (0.4, 0.4, 0.2, 0.1))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(len(x)):
        expected = x[i]
        for op in p.order[i]:
            expected = ops[op](expected, float(factors[i, op]))
        assert torch.allclose(ours[i], expected, atol=1e-5)


def test_fused_jitter_is_exact_without_clamping_and_keeps_range(tissue):
    x = crops_of(tissue, n=4) * 0.2 + 0.4  # mid-range colours: no operation reaches 0 or 1
    p = sample_params(AugmentConfig(), 0, 0, 3, 48, 48)[1]
    p = CropParams(**{k: getattr(p, k)[:4] for k in CropParams.__dataclass_fields__})
    p.jitter[:] = True
    p.gray[:] = False
    p.factors[:, 3] = 0.0  # the hue differs by design (YIQ rotation vs HSV); everything else is torchvision's
    mats, offsets = jitter_affine(p, p.factors.astype(np.float32), x.mean(dim=(2, 3)).numpy(), (0.4, 0.4, 0.2, 0.1))
    fused = (torch.from_numpy(mats) @ x.flatten(2) + torch.from_numpy(offsets).unsqueeze(2)).view_as(x)
    exact = x.clone()
    colour_jitter(exact, p, torch.from_numpy(p.factors.astype(np.float32)), (0.4, 0.4, 0.2, 0.1))
    assert torch.allclose(fused, exact, atol=1e-4)
    # Neutral parameters are the identity; grayscale gives equal channels; hue turns red towards yellow.
    p.factors[:] = [1, 1, 1, 0]
    p.gray[0] = True
    mats, offsets = jitter_affine(p, p.factors.astype(np.float32), np.zeros((4, 3), np.float32), (0.4,) * 4)
    assert np.allclose(mats[1:], np.eye(3), atol=1e-6) and np.allclose(offsets, 0)
    assert np.allclose(mats[0], np.outer(np.ones(3), mats[0][0]))
    p.gray[0] = False
    p.factors[:, 3] = 0.05
    mats, _ = jitter_affine(p, p.factors.astype(np.float32), np.zeros((4, 3), np.float32), (0.4,) * 4)
    red = mats[0] @ np.array([0.8, 0.2, 0.2])
    assert red[1] > 0.2 and red[0] < 0.8
    torch_mats, _ = jitter_affine(p, torch.from_numpy(p.factors.astype(np.float32)), torch.zeros(4, 3), (0.4,) * 4)
    assert np.allclose(torch_mats.numpy(), mats, atol=1e-5)  # host and device builds agree


def test_hed_jitter_keeps_shape_dtype_and_range_and_separates_stains_like_skimage(tissue):
    from skimage.color import rgb2hed

    x = crops_of(tissue)
    n = len(x)
    same = hed_jitter(x.clone(), torch.ones(n, 3), torch.zeros(n, 3))
    assert same.shape == x.shape and same.dtype == x.dtype
    assert torch.allclose(same, x.clamp_min(1 / 255), atol=1e-4)  # neutral jitter: the identity (above black)
    alpha = torch.tensor(
        [[1.3, 1.0, 1.0], [0.7, 1.0, 1.0], [1.0, 1.3, 1.0], [1.0, 1.0, 1.0], [1.05, 0.95, 1.0], [0.9, 1.1, 1.2]]
    )
    beta = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 0], [0.2, 0, 0], [-0.05, 0.05, 0], [0.05, -0.05, 0.05]])
    out = hed_jitter(x.clone(), alpha, beta)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    # More haematoxylin darkens the tile, less brightens it.
    assert out[0].mean() < x[0].mean() < out[1].mean() + 1e-6 and out[3].mean() < x[3].mean()

    # The stain separation is skimage's rgb2hed up to its ln(1e6) scaling (which also clips negative stains).
    rgb = x[0].permute(1, 2, 0).double().numpy()
    od = -np.log(np.maximum(rgb, 1 / 255))
    ours = od @ np.linalg.inv(RGB_FROM_HED) / np.log(1e6)
    theirs = rgb2hed(rgb)
    positive = (ours > 1e-3) & (rgb > 1 / 255).all(axis=2, keepdims=True)
    assert np.allclose(ours[positive], theirs[positive], atol=1e-6)


# -- resizing and the two paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box,out_px", [((10, 20, 60, 60), 98), ((0, 0, 200, 180), 96), ((5, 7, 31, 40), 64), ((0, 0, 256, 256), 224)]
)
def test_batched_resize_matches_torch_antialiased_bicubic(tissue, box, out_px):
    tile = torch.from_numpy(tissue).permute(2, 0, 1).float().unsqueeze(0) / 255
    top, left, h, w = box
    expected = F.interpolate(
        tile[:, :, top : top + h, left : left + w],
        size=(out_px, out_px),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    p = sample_params(AugmentConfig(), 0, 0, 0, 256, 256)[0]
    p = CropParams(**{k: getattr(p, k)[:1] for k in CropParams.__dataclass_fields__})
    p.top[:], p.left[:], p.height[:], p.width[:] = top, left, h, w
    ours = crop_resize_batched(tile, p, out_px)
    assert torch.allclose(ours, expected, atol=2e-4)
    wy = resize_weights(torch.tensor([top]), torch.tensor([h]), out_px, 256)
    assert torch.allclose(wy.sum(-1), torch.ones(1, out_px)) and (wy[0, :, :top] == 0).all()


@pytest.mark.parametrize("preset", ["dinov2", "pathology"])
@pytest.mark.parametrize("impl", ["fused", "torchvision"])
def test_cpu_and_device_paths_give_the_same_crops(tissue, preset, impl):
    aug = AugmentConfig.preset(preset, global_crop_px=64, local_crop_px=32, n_local_crops=3, color_jitter_impl=impl)
    tiles = [np.ascontiguousarray(tissue[i * 30 : i * 30 + 128, i * 40 : i * 40 + 128]) for i in range(4)]
    groups = [sample_params(aug, 9, 1, pos, 128, 128) for pos in range(len(tiles))]
    b = len(tiles)
    g_u8 = torch.empty(2 * b, 3, 64, 64, dtype=torch.uint8)
    l_u8 = torch.empty(3 * b, 3, 32, 32, dtype=torch.uint8)
    cpu = CpuAugmenter(aug)
    for i, t in enumerate(tiles):
        cpu(t, groups[i], (g_u8.view(2, b, 3, 64, 64)[:, i], l_u8.view(3, b, 3, 32, 32)[:, i]))
    stacked = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    dev_g, dev_l = augment_on_device(
        stacked, (CropParams.crop_major([g[0] for g in groups]), CropParams.crop_major([g[1] for g in groups])), aug
    )
    std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255
    for ours, theirs in ((uint8_to_normalised(g_u8, aug), dev_g), (uint8_to_normalised(l_u8, aug), dev_l)):
        diff = ((ours - theirs) * std).abs()  # in grey levels
        assert diff.mean() < 1.0 and diff.max() < 10
    assert dev_g.shape == (2 * b, 3, 64, 64) and dev_l.shape == (3 * b, 3, 32, 32)
    assert math.isfinite(float(dev_g.sum()))
