"""AdamW parameter groups with DINOv2's multipliers, and applying the schedules to them each step.

Per parameter (names relative to the student ``SSLModel``: ``backbone.backbone.*`` is the timm ViT,
``backbone.mask_token``, ``dino_head.*``, ``ibot_head.*``):

* weight-decay multiplier 0 for biases, norm weights, LayerScale gammas, and the tokens (CLS, registers, position
  embedding, iBOT mask token); 1 otherwise;
* layer-wise lr decay ``decay ** (depth + 1 - layer)``, where layer 0 is the patch embedding and the tokens, layer
  i + 1 is block i and the final norm is layer depth + 1 (multiplier 1); heads are not decayed;
* patch embedding lr x ``patch_embed_lr_mult`` (0.2) on top of its layer-wise multiplier;
* ``is_last_layer`` marks the heads' prototype layers, frozen for the first ``freeze_last_layer_steps`` steps.

Parameters with identical multipliers share a group; each group carries ``lr_mult``, ``wd_mult`` and
``is_last_layer`` keys that ``apply_schedule`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from pathdino.train.schedules import ScheduleValues

_TOKEN_NAMES = ("cls_token", "reg_token", "pos_embed", "mask_token", "register_tokens")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases, norms, LayerScale and tokens (DINOv2 leaves these undecayed)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf in _TOKEN_NAMES or leaf == "gamma":
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
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW`` (see the module docstring); frozen parameters are left out."""
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lr_mult = 1.0
        layer = layer_id(name, depth)
        if layer is not None:
            lr_mult = layerwise_decay ** (depth + 1 - layer)
            if ".patch_embed." in name:
                lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, param) else 1.0
        last = is_last_layer(name)
        key = (lr_mult, wd_mult, last)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "is_last_layer": last}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Set each group's lr and weight decay for this step (last layer at lr 0 while frozen)."""
    for group in optimizer.param_groups:
        frozen = group["is_last_layer"] and values.last_layer_frozen
        group["lr"] = 0.0 if frozen else values.lr * group["lr_mult"]
        group["weight_decay"] = values.weight_decay * group["wd_mult"]


def drop_frozen_grads(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """While the last layer is frozen, drop its gradients so AdamW neither moves it nor updates its moments
    (lr 0 alone would still feed the moment estimates; DINOv2 cancels these gradients too)."""
    if not values.last_layer_frozen:
        return
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            for p in group["params"]:
                p.grad = None
