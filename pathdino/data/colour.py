"""Colour augmentations on groups of crops: float tensors [N, 3, H, W] in [0, 1], one parameter per crop.

Each operation matches torchvision's tensor functional of the same name (tests compare them), but runs on a whole
group at once with per-crop parameters, on CPU or GPU. Which crops an operation touches is decided by numpy
switches on the host, so selecting them never waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pathdino.data.params import CropParams, to_device

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # dinov2 solarises PIL images at 128
# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Intensity floor before the log. skimage uses 1e-6, which makes a black pixel's optical density 13.8 and lets
# rounding of near-black pixels swing the jittered colour by tens of grey levels; 1/255 (the darkest 8-bit value)
# keeps optical densities within what an 8-bit scan can measure.
_OD_FLOOR = 1 / 255


def apply_to(
    x: torch.Tensor,
    switch: np.ndarray,
    fn: Callable[[torch.Tensor, slice | torch.Tensor], torch.Tensor],
    hull: bool = False,
) -> None:
    """Run ``fn(sub, index)`` on the crops where ``switch`` is True and write the result back into ``x``.

    A contiguous run of crops is a view (no copy), which is the common case for small per-sample groups. With
    ``hull=True`` the run from the first to the last selected crop is passed even if it has gaps: for operations
    whose parameters make them the identity on unselected crops, and cheaper than gathering the subset.
    """
    idx = np.flatnonzero(switch)
    if len(idx) == 0:
        return
    if hull or idx[-1] - idx[0] + 1 == len(idx):
        index: slice | torch.Tensor = slice(int(idx[0]), int(idx[-1]) + 1)
        view = x[index]
        out = fn(view, index)
        if out is not view:
            view.copy_(out)
        return
    index = to_device(idx, x.device)
    x[index] = fn(x[index], index)


def _per_crop(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] luma of [N, 3, H, W]."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


# Comparisons producing bool tensors run ~7x slower than float arithmetic on CPU in torch 2.x, so masks below are
# built as floats: _step(d) = 1 where d >= 0 else 0, for differences d of values in [0, 1] (|d| >= 1e-30 or 0).
_BIG = 1e30


def _step(d: torch.Tensor) -> torch.Tensor:
    return d.mul_(_BIG).add_(1).clamp_(0, 1)


def blend_step(
    x: torch.Tensor, f: torch.Tensor, to_gray: torch.Tensor | None, to_mean: torch.Tensor | None
) -> torch.Tensor:
    """Brightness, contrast or saturation, each crop its own, in one pass: clamp(f * x + (1 - f) * target).

    The target is 0 (brightness), the crop's mean luma (contrast: ``to_mean`` = 1) or each pixel's luma
    (saturation: ``to_gray`` = 1); None means no crop needs that target. Crops with f = 1 are unchanged.
    """
    target = None
    if to_gray is not None or to_mean is not None:
        gray = grayscale(x)
        if to_mean is not None:
            target = _per_crop(to_mean) * gray.mean(dim=(1, 2, 3), keepdim=True)
        if to_gray is not None:
            gray.mul_(_per_crop(to_gray))
            target = gray if target is None else gray.add_(target)
    f = _per_crop(f)
    x.mul_(f)
    if target is not None:
        x.add_(target.mul_(1 - f))
    return x.clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of the circle) in HSV, as torchvision, with float arithmetic only.

    With H6 = 6 * hue in [0, 6), V = max and C = max - min, HSV->RGB gives channel c = V - C * clamp(2 - d_c, 0, 1),
    where d_c is the circular distance from H6 to 3 (red), 5 (green) or 1 (blue).
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = _step(r - maxc)  # 1 where red is the max; ties go to red, then green, as in torchvision
    is_g = _step(g - maxc).mul_(1 - is_r)
    r_g = r - g
    # H6 * C = (g - b) if red is max, 2C + (b - r) if green, 4C + (r - g) if blue.
    num = r_g + is_r * ((g - b).sub_(r_g)) + is_g * ((b - r).sub_(r_g))
    sector = (4 - 4 * is_r).sub_(is_g, alpha=2)
    h6 = num.div_(chroma.clamp_min(1e-12)).add_(sector).add_(6 * shift.view(-1, 1, 1))
    h6.sub_(torch.floor(h6 * (1 / 6)).mul_(6))  # into [0, 6)
    out = torch.empty_like(x)
    for c, centre in enumerate((3.0, 5.0, 1.0)):
        d = (h6 - centre).abs_()
        d = torch.minimum(d, 6 - d)
        ramp = d.neg_().add_(2).clamp_(0, 1)
        torch.addcmul(maxc, chroma, ramp, value=-1, out=out[:, c])
    return out


def colour_jitter(x: torch.Tensor, p: CropParams, factors: torch.Tensor, strengths: tuple[float, ...]) -> None:
    """torchvision's ColorJitter per crop: the four operations in each crop's own order; zero strength skips one.

    Brightness, contrast and saturation are all blends, so at each step of the order one `blend_step` serves every
    crop whose operation at that step is one of them; hue runs on its crops only.
    """
    active = np.array([s > 0 for s in strengths])
    dev = x.device
    for slot in range(4):
        op = np.where(p.jitter, p.order[:, slot], -1)
        op = np.where(op >= 0, np.where(active[op.clip(0)], op, -1), -1)
        blend = (op >= 0) & (op <= 2)
        if blend.any():
            col = to_device(op.clip(0, 2), dev).view(-1, 1)
            on = to_device(blend, dev, np.float32)
            f = factors.gather(1, col).squeeze(1).sub_(1).mul_(on).add_(1)  # 1 where the crop does not blend
            to_gray = to_device(op == 2, dev, np.float32) if (op == 2).any() else None
            to_mean = to_device(op == 1, dev, np.float32) if (op == 1).any() else None
            apply_to(
                x,
                blend,
                lambda v, i, f=f, g=to_gray, m=to_mean: blend_step(
                    v, f[i], None if g is None else g[i], None if m is None else m[i]
                ),
                hull=True,
            )
        apply_to(x, op == 3, lambda v, i: adjust_hue(v, factors[i, 3]))


# YIQ: luma and two chroma axes; rotating the chroma plane turns hue while keeping luma (the linear counterpart of
# an HSV hue shift). The sign makes a positive shift turn red towards yellow, as HSV does.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def jitter_affine(
    p: CropParams, factors: torch.Tensor | np.ndarray, mean_rgb: torch.Tensor | np.ndarray, strengths: tuple[float, ...]
) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]:
    """Colour jitter (in each crop's order) and grayscale as one affine map per crop: x -> M x + t.

    Brightness, contrast and saturation are torchvision's blends without the clamp between them; contrast blends
    towards the crop's mean luma at that point of the chain (exact, from ``mean_rgb``); hue rotates the YIQ chroma
    plane by 2 pi * shift. Works on numpy arrays (CPU workers: no per-op overhead) or on tensors of the crops'
    device (no host round trip); the two give the same matrices.
    """
    xp = np if isinstance(factors, np.ndarray) else torch

    def const(a: np.ndarray):
        return a.astype(factors.dtype) if xp is np else to_device(a, factors.device, np.float32)

    n = len(p)
    eye = const(np.broadcast_to(np.eye(3), (n, 3, 3)).copy())
    ones_w = const(np.broadcast_to(np.outer(np.ones(3), GRAY_WEIGHTS), (n, 3, 3)).copy())  # rows: luma weights
    w = const(np.array(GRAY_WEIGHTS))
    theta = factors[:, 3] * (2 * np.pi)
    cos, sin = xp.cos(theta), xp.sin(theta)
    zero, one = cos * 0, cos * 0 + 1
    rot = xp.stack([one, zero, zero, zero, cos, sin, zero, -sin, cos], 1).reshape(n, 3, 3)
    hue = const(_YIQ_TO_RGB) @ rot @ const(_RGB_TO_YIQ)
    m_acc, t_acc = eye, const(np.zeros((n, 3)))
    mean = mean_rgb.reshape(n, 3, 1)
    active = np.array([s > 0 for s in strengths])
    rows = np.arange(n)
    for slot in range(4):
        op = np.where(p.jitter, p.order[:, slot], -1)
        op = np.where(op >= 0, np.where(active[op.clip(0)], op, -1), -1)
        if (op < 0).all():
            continue
        sel = [const((op == k).astype(np.float64)).reshape(n, 1, 1) for k in range(4)]
        blend = sel[0] + sel[1] + sel[2]
        f = (
            factors[rows, op.clip(0, 2)]
            if xp is np
            else factors[to_device(rows, factors.device), to_device(op.clip(0, 2), factors.device)]
        )
        f = f.reshape(n, 1, 1) * blend + (1 - blend)  # 1 for crops that do not blend at this step
        a = (f * eye + sel[2] * (1 - f) * ones_w) * (1 - sel[3]) + sel[3] * hue  # saturation pulls to luma
        luma = ((m_acc @ mean).reshape(n, 3) + t_acc) @ w  # mean luma of the crop so far
        offset = (sel[1] * (1 - f)).reshape(n, 1) * luma.reshape(n, 1)  # contrast pulls towards it
        m_acc = a @ m_acc
        t_acc = (a @ t_acc.reshape(n, 3, 1)).reshape(n, 3) + offset
    if p.gray.any():
        g = const(p.gray.astype(np.float64)).reshape(n, 1, 1)
        m_acc = m_acc * (1 - g) + g * (ones_w @ m_acc)
        t_acc = t_acc * (1 - g.reshape(n, 1)) + g.reshape(n, 1) * (t_acc @ w).reshape(n, 1)
    return m_acc, t_acc


def fused_jitter(x: torch.Tensor, p: CropParams, factors: torch.Tensor, strengths: tuple[float, ...]) -> None:
    """Colour jitter and grayscale of the crops that have either, as one clamped affine map each."""

    def run(v: torch.Tensor, i: slice | torch.Tensor) -> torch.Tensor:
        sub = _subset(p, i)
        mean_rgb = v.mean(dim=(2, 3))
        if v.device.type == "cpu":  # tiny matrices: numpy's per-call cost is a fraction of torch's
            mats, offsets = jitter_affine(sub, sub.factors.astype(np.float32), mean_rgb.numpy(), strengths)
            mats, offsets = torch.from_numpy(mats), torch.from_numpy(offsets)
        else:
            mats, offsets = jitter_affine(sub, factors[i], mean_rgb, strengths)
        out = torch.baddbmm(offsets.unsqueeze(2), mats, v.flatten(2))
        return out.clamp_(0, 1).view_as(v)

    apply_to(x, p.jitter | p.gray, run, hull=True)  # crops with neither get the identity map


def _subset(p: CropParams, i: slice | torch.Tensor) -> CropParams:
    idx = i if isinstance(i, slice) else i.cpu().numpy()
    return CropParams(**{f: getattr(p, f)[idx] for f in p.__dataclass_fields__})


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_px: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding) with a per-crop sigma, as two separable passes."""
    radius = kernel_px // 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    w = w / w.sum(dim=1, keepdim=True)
    taps = [_per_crop(w[:, i].contiguous()) for i in range(kernel_px)]
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = padded[..., 0:width] * taps[0]
    for i in range(1, kernel_px):
        out.addcmul_(padded[..., i : i + width], taps[i])
    padded = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = padded[..., 0:height, :] * taps[0]
    for i in range(1, kernel_px):
        out.addcmul_(padded[..., i : i + height, :], taps[i])
    return out


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stain jitter by colour deconvolution: each stain's optical density s -> alpha * s + beta.

    Optical density OD = -ln(rgb) is linear in the stains (OD = S @ RGB_FROM_HED), so the whole jitter is one
    3x3 matrix and offset per crop in OD space: OD' = OD @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED) + beta @
    RGB_FROM_HED. alpha=1, beta=0 returns the input (up to rounding; values below 1/255 become 1/255).
    """
    hed = to_device(HED_FROM_RGB, x.device, np.float32)
    rgb = to_device(RGB_FROM_HED, x.device, np.float32)
    mats = hed.unsqueeze(0) * alpha.unsqueeze(1) @ rgb  # [N, 3, 3], row-vector convention
    offset = beta @ rgb  # [N, 3]
    od = x.clamp_min(_OD_FLOOR).log_().neg_().flatten(2)  # [N, 3, HW]
    out = torch.baddbmm(offset.unsqueeze(2), mats.transpose(1, 2), od)
    return out.neg_().exp_().clamp_(0, 1).view_as(x)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """x >= 128/255 becomes 1 - x."""
    return x.add_(_step(x - SOLARIZE_THRESHOLD).mul_(1 - 2 * x))


def colour_augment(
    x: torch.Tensor,
    p: CropParams,
    floats: dict[str, torch.Tensor],
    strengths: tuple[float, ...],
    blur_kernel_px: int,
    jitter_impl: str = "fused",
) -> None:
    """The colour part of the recipe, in place: HED jitter, colour jitter, grayscale, blur, solarisation."""
    apply_to(x, p.hed, lambda v, i: hed_jitter(v, floats["hed_alpha"][i], floats["hed_beta"][i]))
    if jitter_impl == "fused":
        fused_jitter(x, p, floats["factors"], strengths)
    else:
        colour_jitter(x, p, floats["factors"], strengths)
        apply_to(x, p.gray, lambda v, i: grayscale(v).expand_as(v))
    apply_to(x, p.blur, lambda v, i: gaussian_blur(v, floats["sigma"][i], blur_kernel_px))
    apply_to(x, p.solarize, lambda v, i: solarize(v))


def geometry(x: torch.Tensor, p: CropParams) -> None:
    """Flips and quarter turns, in place (square crops)."""
    apply_to(x, p.hflip, lambda v, i: v.flip(-1))
    apply_to(x, p.vflip, lambda v, i: v.flip(-2))
    for k in (1, 2, 3):
        apply_to(x, p.rot == k, lambda v, i, k=k: torch.rot90(v, k, dims=(-2, -1)))
