"""Position-embedding surgery for a change of crop size: resample the patch grid, keep the prefix slots."""

from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed


def resample_position_embeddings(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> list[str]:
    """Resample, in ``state``, every ``*pos_embed`` whose grid differs from ``shapes[key]``; returns those keys.

    A position embedding is [1, P + H*W, D] with P prefix slots (0 with registers, 1 CLS slot without); the grid part
    is resampled bicubically with timm's ``resample_abs_pos_embed``, the prefix slots are kept.
    """
    changed = []
    for key, value in state.items():
        if not key.endswith("pos_embed") or key not in shapes or tuple(value.shape) == tuple(shapes[key]):
            continue
        old_len, new_len = value.shape[1], shapes[key][1]
        prefix = next((p for p in range(9) if _is_square(old_len - p) and _is_square(new_len - p)), None)
        if prefix is None or value.shape[0] != 1 or value.shape[2] != shapes[key][2]:
            continue  # not a square-grid embedding of the same width: left for the caller's shape check
        old_side, new_side = math.isqrt(old_len - prefix), math.isqrt(new_len - prefix)
        state[key] = resample_abs_pos_embed(
            value.float(),
            new_size=[new_side, new_side],
            old_size=[old_side, old_side],
            num_prefix_tokens=prefix,
            verbose=False,
        ).to(value.dtype)
        changed.append(key)
    return changed


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
