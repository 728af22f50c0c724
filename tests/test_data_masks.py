"""iBOT block masks of pathdino.data: share of masked crops, stratified ratios, block shapes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pathdino.data.config import AugmentConfig, DataConfigError, MaskConfig, check_patch_grid, max_masked_patches
from pathdino.data.masks import BlockMasker


def test_half_the_global_crops_are_masked_with_stratified_ratios():
    grid, n_crops = 16, 128
    masker = BlockMasker(MaskConfig(), grid)
    ratios_all = []
    for seed in range(4):
        masks = masker.batch(n_crops, random.Random(seed))
        assert masks.shape == (n_crops, grid * grid) and masks.dtype == bool
        counts = masks.sum(axis=1)
        masked = counts[counts > 0]
        assert len(masked) == n_crops // 2  # mask_probability 0.5
        ratios = np.sort(masked / grid**2)
        assert ratios.max() <= 0.5  # never more than half the patches
        # Stratified over [0.1, 0.5]: the i-th smallest ratio lies at or below the top of the i-th stratum.
        tops = np.linspace(0.1, 0.5, len(masked) + 1)[1:]
        assert (ratios <= tops + 1e-9).all()
        ratios_all.append(ratios)
        # Masked crops are spread over the batch, not packed at its start.
        assert 0 < (counts[: n_crops // 2] > 0).sum() < n_crops // 2
    mean_ratio = np.mean(np.concatenate(ratios_all))
    assert 0.25 < mean_ratio <= 0.3 + 1e-9  # mid-point 0.3, blocks may undershoot slightly


def test_masks_are_unions_of_blocks_of_at_least_min_patches():
    masker = BlockMasker(MaskConfig(), 14)
    rng = random.Random(0)
    for _ in range(50):
        m = masker.mask(40, rng)
        assert 4 <= m.sum() <= 40
        # Blocks, not scattered patches: nearly every masked patch has a masked 4-neighbour (only the last block
        # of a mask, capped by what is left of the target, can be smaller than min_block_patches).
        padded = np.pad(m, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert neighbours[m].sum() >= m.sum() - 3


def test_masks_are_deterministic_for_a_seed():
    masker = BlockMasker(MaskConfig(), 16)
    a = masker.batch(32, random.Random(5))
    b = masker.batch(32, random.Random(5))
    c = masker.batch(32, random.Random(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_no_masking_when_probability_is_zero():
    masks = BlockMasker(MaskConfig(mask_probability=0.0), 16).batch(20, random.Random(0))
    assert not masks.any()


def test_patch_grid_and_mask_limits():
    assert check_patch_grid(AugmentConfig(), 14) == 16
    assert max_masked_patches(MaskConfig(), 256) == 128
    with pytest.raises(DataConfigError, match="local_crop_px=96 is not a multiple of the model's patch size 14"):
        check_patch_grid(AugmentConfig(local_crop_px=96), 14)
    with pytest.raises(DataConfigError, match="mask_ratio"):
        MaskConfig(mask_ratio=(0.5, 0.1))
