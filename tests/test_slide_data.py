"""The slide-pretraining data path: every slide once per epoch over processes and workers, packs within the token
budget, contiguous deterministic crops, masks, resumable positions, and the config's up-front errors."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pathdino.slide.data import PackDataset, SlidePackLoader, SlideSource
from pathdino.slide.plan import EpochPlan, crop_indices, mask_count, mask_indices, step_masked_tiles
from pathdino.slide.train_config import load_pretrain_config
from tiling.configio import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from slide_fixtures import ENCODER, random_store, tissue_coords, write_store  # noqa: E402

SMALL = Path(__file__).resolve().parents[1] / "configs" / "slide" / "small.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return random_store(tmp_path_factory.mktemp("emb") / "emb", n_slides=11, sizes=(3, 12))


def _loader(
    store: Path,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    max_tokens: int = 40,
    budget: int = 100,
    packs_per_step: int = 4,
    seed: int = 0,
) -> SlidePackLoader:
    source = SlideSource([str(store)])
    plan = EpochPlan(
        [s.n_tiles for s in source.slides], max_tokens_per_slide=max_tokens, tokens_per_pack=budget, seed=seed
    )
    dataset = PackDataset(source, plan, max_tokens_per_slide=max_tokens, mask_ratio=0.75, seed=seed)
    return SlidePackLoader(dataset, packs_per_step=packs_per_step, rank=rank, world=world, num_workers=workers)


def _take(loader: SlidePackLoader, n: int) -> list:
    it = iter(loader)
    packs = [next(it) for _ in range(n)]
    loader.close()
    return packs


def test_every_slide_once_per_epoch_over_processes_and_workers(store):
    """Two processes x two DataLoader workers: the first three epochs hold every slide exactly once each."""
    loaders = [_loader(store, rank=r, world=2, workers=2) for r in range(2)]
    n_slides = len(loaders[0].dataset.source.slides)
    plan = loaders[0].dataset.plan
    packs_needed = sum(plan.packs_in_epoch(e) for e in range(3))
    steps = -(-packs_needed // 4) + 1
    seen: Counter = Counter()
    for loader in loaders:
        for pack in _take(loader, steps * loader.accum):
            assert int(pack.lengths.sum()) <= 100  # the token budget
            assert int(pack.lengths.max()) <= 40  # cropped
            seen.update((pack.epoch, s) for s in pack.slides)
    for epoch in range(3):
        assert sorted(s for e, s in seen if e == epoch) == list(range(n_slides)), epoch
        assert all(seen[(epoch, s)] == 1 for s in range(n_slides))
    # epochs are shuffled differently
    assert plan.pack(0).slides != plan.pack(plan.packs_in_epoch(0)).slides


def test_one_process_sees_what_two_processes_see_step_by_step(store):
    one = _take(_loader(store, world=1), 8)
    r0, r1 = (_take(_loader(store, rank=r, world=2, workers=1), 4) for r in range(2))
    for step in range(2):
        ones = one[4 * step : 4 * step + 4]
        twos = [r0[2 * step], r1[2 * step], r0[2 * step + 1], r1[2 * step + 1]]
        for a, b in zip(ones, twos):
            assert a.index == b.index and a.slides == b.slides
            assert torch.equal(a.features, b.features) and torch.equal(a.masked, b.masked)
            assert torch.equal(a.grid_xy, b.grid_xy)


def test_loader_resumes_at_a_step_with_any_number_of_processes(store):
    full = _take(_loader(store), 12)
    first = _loader(store)
    _take(first, 8)  # two optimizer steps of 4 packs
    state = first.state_dict()
    assert state["next_step"] == 2
    for world in (1, 2):
        resumed = _loader(store, world=world)
        resumed.load_state_dict(state)
        got = _take(resumed, 4 // world)
        want = [p for p in full[8:12] if (p.index % world) == 0]
        assert [p.index for p in got] == [p.index for p in want]
        assert all(torch.equal(a.features, b.features) and torch.equal(a.masked, b.masked) for a, b in zip(got, want))


def test_crop_is_a_contiguous_square_region_and_deterministic():
    rng = np.random.default_rng(3)
    grid = (tissue_coords(rng, rows=40, cols=50, keep=1.0) - np.array([1000, 3000])) // 224
    keep = crop_indices(grid, 200, seed=0, epoch=0, slide=5)
    assert len(keep) == 200 and np.array_equal(keep, crop_indices(grid, 200, seed=0, epoch=0, slide=5))
    assert not np.array_equal(keep, crop_indices(grid, 200, seed=0, epoch=1, slide=5))  # another region per epoch
    kept = grid[keep]
    # a square window: every tile strictly inside the kept bounding box's inner square is kept
    lo, hi = kept.min(0), kept.max(0)
    assert (hi - lo).max() <= 16  # ~sqrt(200) = 14 on a side, edge clipping aside
    inside = np.all((grid > lo) & (grid < hi), axis=1)
    assert set(np.flatnonzero(inside)) <= set(keep)
    assert np.array_equal(crop_indices(grid[:150], 200, seed=0, epoch=0, slide=5), np.arange(150))  # small: whole


def test_crop_keeps_true_geometry_with_holes():
    rng = np.random.default_rng(4)
    grid = (tissue_coords(rng, rows=30, cols=30, keep=0.5) - np.array([1000, 3000])) // 224
    keep = crop_indices(grid, 100, seed=1, epoch=0, slide=0)
    kept = grid[keep]
    radius = np.abs(kept[:, None] - kept[None]).max(-1).max()
    assert radius <= 2 * int(np.ceil(np.sqrt(100 / 0.5)))  # compact despite the holes


def test_masks_count_and_determinism():
    assert mask_count(1, 0.75) == 0 and mask_count(2, 0.99) == 1 and mask_count(100, 0.75) == 75
    m = mask_indices(100, 0.75, seed=0, epoch=2, slide=7)
    assert m.sum() == 75 and np.array_equal(m, mask_indices(100, 0.75, seed=0, epoch=2, slide=7))
    assert not np.array_equal(m, mask_indices(100, 0.75, seed=0, epoch=3, slide=7))


def test_step_masked_tiles_counts_what_the_packs_mask(store):
    loader = _loader(store, packs_per_step=3)
    packs = _take(loader, 6)
    plan = loader.dataset.plan
    for step in range(2):
        assert step_masked_tiles(plan, step, packs_per_step=3, mask_ratio=0.75) == sum(
            p.n_masked for p in packs[3 * step : 3 * step + 3]
        )


def test_tiles_come_in_row_major_grid_order(store):
    pack = _take(_loader(store, max_tokens=10_000, budget=10_000), 1)[0]
    start = 0
    for n in pack.lengths.tolist():
        g = pack.grid_xy[start : start + n]
        key = g[:, 1] * 10_000 + g[:, 0]
        assert torch.all(key[1:] > key[:-1])
        start += n


def test_config_errors_name_the_key(tmp_path, store):
    def load(*overrides):
        return load_pretrain_config(SMALL, [f"data.embeddings=[{store}]", *overrides])

    load()
    big = load_pretrain_config(SMALL.with_name("gigapath.yaml"), [f"data.embeddings=[{store}]"])
    assert (big.model.depth, big.model.embed_dim, big.optim.ema_momentum) == (12, 768, 0.999)
    cases = {
        "data.tokens_per_pack": ["data.tokens_per_pack=10", "data.max_tokens_per_slide=20"],
        "objective.mask_ratio": ["objective.mask_ratio=1.0"],
        "objective.decoder_dim": ["objective.decoder_dim=30", "objective.decoder_heads=4"],
        "train.packs_per_step": ["train.packs_per_step=0"],
        "optim.ema_momentum": ["optim.ema_momentum=1.5"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as err:
            load(*overrides)
        assert key.split(".")[-1] in str(err.value), (key, str(err.value))
    with pytest.raises(ConfigError, match="unknown key"):
        load("objective.mask_ratios=0.5")
    with pytest.raises(ConfigError, match="embeddings"):
        SlideSource([str(tmp_path / "missing")])
    other = write_store(
        tmp_path / "other",
        {"a": (np.zeros((3, 16)), np.zeros((3, 2), np.int64))},
        encoder={**ENCODER, "weights_sha256": "1" * 64, "dir": "another-encoder"},
    )
    with pytest.raises(ConfigError, match="another tile encoder"):
        SlideSource([str(store), str(other)])
    with pytest.raises(ConfigError, match="not divisible"):
        _loader(store, world=2, packs_per_step=3)
