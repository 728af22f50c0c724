"""Initialise a backbone from a local checkpoint file in timm or facebookresearch/dinov2 layout.

Safetensors or `torch.load(weights_only=True)` files; wrapper dicts and prefixes are unwrapped, dinov2 names mapped
to timm's, and the position embedding resized to the model's grid.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer

from pathdino.models.backbone import MaskedViT
from tiling.errors import MissingFileError, PathdinoError

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("teacher", "model", "state_dict", "module")
# "backbone.backbone.": a pathdino checkpoint's teacher.safetensors / student.safetensors (SSLModel -> MaskedViT).
_PREFIXES = (
    "teacher.backbone.",
    "student.backbone.",
    "module.backbone.",
    "backbone.backbone.",
    "backbone.",
    "module.",
    "encoder.",
)
_DINOV2_ONLY = ("mask_token",)


class InitCheckpointError(PathdinoError, ValueError):
    """``model.init_checkpoint`` cannot start this backbone: not a state dict, no backbone keys, wrong shapes."""


@dataclass(frozen=True)
class InitReport:
    """What ``load_init_checkpoint`` did: keys the model kept random, keys dropped, and any pos-embed resize."""

    path: str
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    ignored_keys: tuple[str, ...]
    pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None

    def summary(self) -> str:
        parts = [f"init checkpoint {self.path}:"]
        parts.append(f"missing (kept random) {list(self.missing_keys) or 'none'};")
        parts.append(f"unexpected (not loaded) {list(self.unexpected_keys) or 'none'};")
        if self.ignored_keys:
            parts.append(f"ignored {len(self.ignored_keys)} non-backbone keys (e.g. {self.ignored_keys[0]!r});")
        if self.pos_embed_resized:
            parts.append(f"pos_embed resampled {self.pos_embed_resized[0]} -> {self.pos_embed_resized[1]}")
        return " ".join(parts)


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"init checkpoint {path} does not exist (model.init_checkpoint)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise InitCheckpointError(
            f"init checkpoint {path} cannot be read with torch.load(weights_only=True) ({exc}); "
            "re-save its state dict as .safetensors or as a plain tensor dict"
        ) from exc
    if not isinstance(obj, Mapping):
        raise InitCheckpointError(f"init checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def _select_backbone_keys(sd: dict[str, Any], prefix: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    for _ in range(3):  # unwrap {"model": {...}}, {"teacher": {...}} and the like
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = dict(inner)
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}  # torch.compile wrappers
    if prefix is None:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in sd)), "")
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    ignored = sorted(k for k in sd if not (k.startswith(prefix) and isinstance(sd[k], torch.Tensor)))
    return kept, ignored


def _rename_dinov2(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, ignored = {}, []
    for key, value in sd.items():
        if key in _DINOV2_ONLY:
            ignored.append(key)
            continue
        # dinov2 FSDP "block chunks": blocks.<chunk>.<global index>.<rest>
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        if key == "register_tokens":
            key = "reg_token"
        out[key] = value
    return out, ignored


def _split_pos_embed(pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Split a [1, L, D] pos embed into (CLS slot or None, grid part, grid side)."""
    n = pos.shape[1]
    side = math.isqrt(n)
    if side * side == n:
        return None, pos, side
    side = math.isqrt(n - 1)
    if side * side == n - 1:
        return pos[:, :1], pos[:, 1:], side
    raise InitCheckpointError(f"pos_embed with {n} tokens is neither a square grid nor CLS + a square grid")


def _adapt_pos_embed(
    sd: dict[str, torch.Tensor], model: VisionTransformer
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    if "pos_embed" not in sd or model.pos_embed is None:
        return None
    cls_pos, grid_pos, side = _split_pos_embed(sd["pos_embed"])
    target_hw = tuple(model.patch_embed.grid_size)
    resized = None
    if (side, side) != target_hw:
        grid_pos = resample_abs_pos_embed(
            grid_pos, new_size=list(target_hw), old_size=[side, side], num_prefix_tokens=0
        )
        resized = ((side, side), target_hw)
    n_prefix_slots = 0 if model.no_embed_class else model.num_prefix_tokens
    if n_prefix_slots == 0:
        if cls_pos is not None and "cls_token" in sd:
            # The CLS position is a constant added to the CLS token: fold it in (exact).
            sd["cls_token"] = sd["cls_token"] + cls_pos
        sd["pos_embed"] = grid_pos
    else:
        # The CLS token already carries its position when the source had none: a zero slot is exact.
        slots = torch.zeros(1, n_prefix_slots, grid_pos.shape[-1], dtype=grid_pos.dtype)
        if cls_pos is not None:
            slots[:, :1] = cls_pos
        sd["pos_embed"] = torch.cat([slots, grid_pos], dim=1)
    return resized


def _count_blocks(sd: Mapping[str, Any]) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def check_layout(sd: Mapping[str, torch.Tensor], model: VisionTransformer, path: Path) -> None:
    """The checkpoint's patch size, register count, LayerScale, width and depth are the model's, or an error naming
    the config key to change (``sd`` in timm names, after ``_rename_dinov2``). Continuing from a backbone with a
    different layout would silently start those parts from random weights."""
    problems = []
    proj = sd.get("patch_embed.proj.weight")
    patch = int(model.patch_embed.patch_size[0])
    if proj is not None and proj.ndim == 4 and int(proj.shape[-1]) != patch:
        problems.append(
            f"patch size {int(proj.shape[-1])} vs {patch}: set model.backbone.patch_size={int(proj.shape[-1])}"
        )
    ckpt_regs = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    if ckpt_regs != model.num_reg_tokens:
        problems.append(
            f"{ckpt_regs} register tokens vs {model.num_reg_tokens}: set model.backbone.num_register_tokens={ckpt_regs}"
        )
    ckpt_ls = any(".ls1." in k for k in sd)
    model_ls = any(".ls1." in k for k in model.state_dict())
    if ckpt_ls != model_ls:
        fix = "a value (e.g. 1.0e-5; the checkpoint's gammas replace it)" if ckpt_ls else "null"
        problems.append(
            f"LayerScale {'present' if ckpt_ls else 'absent'} vs {'present' if model_ls else 'absent'}:"
            f" set model.backbone.layerscale_init to {fix}"
        )
    cls = sd.get("cls_token")
    depth = _count_blocks(sd)
    if (cls is not None and int(cls.shape[-1]) != model.embed_dim) or (depth and depth != len(model.blocks)):
        problems.append(
            f"width x depth {int(cls.shape[-1]) if cls is not None else '?'} x {depth} vs "
            f"{model.embed_dim} x {len(model.blocks)}: set model.backbone.arch (or its embed_dim, depth,"
            " num_heads with arch: custom)"
        )
    if problems:
        raise InitCheckpointError(
            f"init checkpoint {path} (model.init_checkpoint) does not match the configured "
            "backbone: " + "; ".join(problems)
        )


def load_init_checkpoint(
    backbone: VisionTransformer | MaskedViT,
    path: str | Path,
    *,
    prefix: str | None = None,
    strict: bool = False,
    layout: bool = False,
) -> InitReport:
    """Initialise ``backbone`` in place from a local timm- or dinov2-layout checkpoint (no download).

    Accepts ``.safetensors`` or anything ``torch.load(weights_only=True)`` reads; unwraps ``{"model": ...}`` /
    ``{"teacher": ...}`` and strips ``teacher.backbone.`` (preferred), ``student.backbone.``, ``backbone.`` (a
    ``MaskedViT`` state dict) or ``module.`` (or ``prefix``). DINOv2
    names are mapped (chunked ``blocks.C.N.``, ``mlp.w12/w3``, ``register_tokens``; ``mask_token`` ignored), the CLS
    position is folded into the CLS token for register models, and the position embedding is resampled to the
    model's grid with timm's ``resample_abs_pos_embed``. Missing/unexpected keys are logged and returned; with
    ``strict=True`` they raise. Shape mismatches (wrong arch or patch size) always raise; with ``layout=True``
    (the trainer) so does any difference in patch size, registers, LayerScale, width or depth (``check_layout``).
    """
    model = backbone.backbone if isinstance(backbone, MaskedViT) else backbone
    path = Path(path)
    sd, ignored = _select_backbone_keys(_read_state_dict(path), prefix)
    if not sd:
        raise InitCheckpointError(
            f"init checkpoint {path}: no tensors under prefix {prefix!r}; pass prefix= explicitly"
        )
    sd, dropped = _rename_dinov2(sd)
    if layout:
        check_layout(sd, model, path)
    resized = _adapt_pos_embed(sd, model)
    own = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad:
        raise InitCheckpointError(
            f"init checkpoint {path} does not fit this backbone (check arch, patch_size, ffn): " + "; ".join(bad)
        )
    result = model.load_state_dict(sd, strict=False)
    report = InitReport(
        path=str(path),
        missing_keys=tuple(result.missing_keys),
        unexpected_keys=tuple(result.unexpected_keys),
        ignored_keys=tuple(ignored + dropped),
        pos_embed_resized=resized,
    )
    if strict and (report.missing_keys or report.unexpected_keys):
        raise InitCheckpointError(report.summary())
    (log.warning if report.missing_keys or report.unexpected_keys else log.info)(report.summary())
    return report
