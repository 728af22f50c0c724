"""iBOT block masks over the patch grid of global crops, drawn as DINOv2 draws them (BEiT-style blocks)."""

from __future__ import annotations

import math
import random

import numpy as np

from pathdino.data.config import MaskConfig

_ATTEMPTS_PER_BLOCK = 10


class BlockMasker:
    """Draws block masks on a ``grid`` x ``grid`` patch grid.

    A mask grows by rectangular blocks (area uniform in [min_block_patches, what is left], aspect log-uniform in
    ``block_aspect``, never spanning the whole grid) until it reaches its target count; a block is kept only if
    it adds at least one patch without overshooting. Ten failed placements end the mask early, as upstream.
    """

    def __init__(self, cfg: MaskConfig, grid: int):
        self.cfg, self.grid = cfg, grid
        self.n_patches = grid * grid
        self.max_block = cfg.max_block_fraction * self.n_patches
        self.log_aspect = (math.log(cfg.block_aspect[0]), math.log(cfg.block_aspect[1]))

    def _add_block(self, mask: np.ndarray, max_new: float, rng: random.Random) -> int:
        for _ in range(_ATTEMPTS_PER_BLOCK):
            area = rng.uniform(self.cfg.min_block_patches, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if w < self.grid and h < self.grid:
                top, left = rng.randint(0, self.grid - h), rng.randint(0, self.grid - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block[...] = True
                    return new
        return 0

    def mask(self, n_target: int, rng: random.Random) -> np.ndarray:
        """One [grid, grid] bool mask with at most ``n_target`` patches masked."""
        mask = np.zeros((self.grid, self.grid), dtype=bool)
        count = 0
        while count < n_target:
            added = self._add_block(mask, min(n_target - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        return mask

    def batch(self, n_crops: int, rng: random.Random) -> np.ndarray:
        """[n_crops, grid * grid] masks for the global crops of one batch (ratios stratified, order shuffled)."""
        n_masked = int(n_crops * self.cfg.mask_probability)
        bounds = np.linspace(self.cfg.mask_ratio[0], self.cfg.mask_ratio[1], n_masked + 1)
        out = np.zeros((n_crops, self.n_patches), dtype=bool)
        for i in range(n_masked):
            ratio = rng.uniform(bounds[i], bounds[i + 1])
            out[i] = self.mask(int(self.n_patches * ratio), rng).reshape(-1)
        order = list(range(n_crops))
        rng.shuffle(order)
        return out[order]
