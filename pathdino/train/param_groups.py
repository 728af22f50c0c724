"""AdamW parameter groups with DINOv2's multipliers, and applying the schedules to them each step.

Per parameter (names relative to the student ``SSLModel``: ``backbone.backbone.*`` is the timm ViT,
``backbone.mask_token``, ``dino_head.*``, ``ibot_head.*``):

* weight-decay multiplier 0 for biases, norm weights and LayerScale gammas, 1 otherwise. The tokens (CLS,
  registers, position embedding, iBOT mask token) are decayed too, as DINOv2 does (its rule is
  ``name.endswith(".bias") or "norm" in name or "gamma" in name``); ``decay_tokens=False`` exempts them, as timm's
  ``no_weight_decay()`` and DINO v1 do. The last layer's weight-norm gain ``weight_g`` is decayed (DINOv2);
* layer-wise lr decay ``decay ** (depth + 1 - layer)``, where layer 0 is the patch embedding and the tokens, layer
  i + 1 is block i and the final norm is layer depth + 1 (multiplier 1); heads are not decayed;
* patch embedding lr x ``patch_embed_lr_mult`` (0.2) on top of its layer-wise multiplier;
* ``is_last_layer`` marks the heads' prototype layers (``weight`` and ``weight_g``), frozen for the first
  ``freeze_last_layer_steps`` steps. DINOv2 freezes them by setting their lr to 0 (``apply_schedule``): clipping
  still sees their gradients and AdamW still accumulates their moments and step count. ``drop_frozen_grads``
  (``optim.freeze_last_layer=drop_grads``) instead removes the gradients before clipping (no moments, as DINO v1's
  ``cancel_gradients_last_layer``).

* ``is_backbone`` marks the timm ViT's parameters (``backbone.backbone.*``: what ``model.init_checkpoint``
  loads; not the iBOT mask token, which no released checkpoint carries). While ``train.freeze_backbone_steps``
  lasts their gradients are dropped before clipping (no AdamW step or moments, no weight decay), then their lr
  is scaled by the ramp ``backbone_lr_mult``.

Parameters with identical multipliers share a group; each group carries ``lr_mult``, ``wd_mult``,
``is_last_layer`` and ``is_backbone`` keys that ``apply_schedule`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from pathdino.train.schedules import ScheduleValues

_TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "register_tokens")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor, decay_tokens: bool = True) -> bool:
    """True for biases, norms and LayerScale gammas (DINOv2 leaves exactly these undecayed); also for the tokens
    unless ``decay_tokens`` (DINOv2 decays them)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _TOKEN_NAMES:
        return not decay_tokens
    if leaf == "bias" or leaf == "gamma":
        return True
    if ".ls1." in name or ".ls2." in name or "norm" in name:
        return True
    # 1-d parameters that slipped past the names above are gains or offsets, never weight matrices.
    return param.ndim <= 1


def layer_id(name: str, depth: int) -> int | None:
    """Layer index of a backbone parameter for layer-wise lr decay (None for non-backbone parameters)."""
    if not name.startswith("backbone."):
        return None
    leaf = name.rsplit(".", 1)[-1]
    if ".patch_embed." in name or leaf in _TOKEN_NAMES:
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def is_last_layer(name: str) -> bool:
    """The prototype (weight-normalised) layer of a DINO/iBOT head."""
    return ".last_layer." in f".{name}"


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    depth: int,
    *,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    decay_tokens: bool = True,
) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW`` (see the module docstring); frozen parameters are left out."""
    groups: dict[tuple[float, float, bool, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lr_mult = 1.0
        layer = layer_id(name, depth)
        if layer is not None:
            lr_mult = layerwise_decay ** (depth + 1 - layer)
            if ".patch_embed." in name:
                lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, param, decay_tokens) else 1.0
        last = is_last_layer(name)
        backbone = name.startswith("backbone.backbone.")
        key = (lr_mult, wd_mult, last, backbone)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr_mult": lr_mult,
                "wd_mult": wd_mult,
                "is_last_layer": last,
                "is_backbone": backbone,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Set each group's lr and weight decay for this step (last layer at lr 0 while frozen)."""
    for group in optimizer.param_groups:
        frozen = group["is_last_layer"] and values.last_layer_frozen
        mult = values.backbone_lr_mult if group.get("is_backbone") else 1.0
        group["lr"] = 0.0 if frozen else values.lr * group["lr_mult"] * mult
        group["weight_decay"] = values.weight_decay * group["wd_mult"]


def drop_frozen_grads(optimizer: torch.optim.Optimizer, values: ScheduleValues, mode: str = "zero_lr") -> None:
    """With ``mode="drop_grads"``, while the last layer is frozen, drop its gradients before clipping, so they
    count in no clipping norm and AdamW neither moves it nor updates its moments (DINO v1). With ``"zero_lr"``
    (DINOv2) nothing is dropped: the lr of 0 set by ``apply_schedule`` alone keeps the layer still.

    While the backbone is frozen (``values.backbone_frozen``) its gradients are always dropped."""
    if values.backbone_frozen:
        for group in optimizer.param_groups:
            if group.get("is_backbone"):
                for p in group["params"]:
                    p.grad = None
    if mode == "zero_lr" or not values.last_layer_frozen:
        return
    if mode != "drop_grads":
        raise ValueError(f"freeze_last_layer mode {mode!r}: expected 'zero_lr' or 'drop_grads'")
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            for p in group["params"]:
                p.grad = None
