"""Epoch order, partition over ranks x workers, quotas and resume positions of pathdino.data (no I/O)."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from pathdino.data.catalog import Catalog
from pathdino.data.plan import EpochPlan, Layout, Schedule, round_start, slide_quotas


def make_catalog(sizes: list[int], tiles_per_shard: int = 16, stores: list[int] | None = None) -> Catalog:
    stores = stores or [0] * len(sizes)
    return Catalog(
        store_urls=tuple(f"store{i}" for i in range(max(stores) + 1)),
        store_index=np.array(stores, dtype=np.int64),
        slide_ids=tuple(f"s{i}" for i in range(len(sizes))),
        n_tiles=np.array(sizes, dtype=np.int64),
        tile_px=np.full(len(sizes), 64, dtype=np.int64),
        tiles_per_shard=np.full(len(sizes), tiles_per_shard, dtype=np.int64),
        encodings=("jpeg",) * len(sizes),
        fingerprint="test",
    )


def consumed(schedule_for_rank, world_size: int, epoch: int, n_batches: int) -> list[np.ndarray]:
    """Virtual positions of the first ``n_batches`` batches of every rank."""
    out = []
    for rank in range(world_size):
        sched = schedule_for_rank(rank)
        out += [sched.positions(epoch, j)[1] for j in range(n_batches)]
    return out


@pytest.mark.parametrize(
    "world_size,lanes,batch,window_batches", [(1, 1, 4, 2), (2, 3, 4, 1), (3, 2, 5, 3), (4, 1, 3, 2)]
)
def test_every_tile_once_per_epoch_across_ranks_and_workers(world_size, lanes, batch, window_batches):
    cat = make_catalog([37, 5, 64, 18], tiles_per_shard=8)
    plan = EpochPlan(cat, "tile", None, None, seed=7, epoch=2)
    assert plan.size == cat.total_tiles

    def sched(rank):
        return Schedule(plan.size, Layout(world_size, rank, batch, lanes, window_batches), "drop", seed=7)

    n_batches = sched(0).n_batches(2)
    assert n_batches == plan.size // (world_size * batch)  # the same count on every rank
    positions = np.concatenate(consumed(sched, world_size, 2, n_batches))
    # Every used position once; the unused remainder (< one global batch) is the end of the epoch order.
    assert sorted(positions.tolist()) == list(range(n_batches * world_size * batch))
    assert plan.size - len(positions) < world_size * batch
    slides, tiles = plan.locate(positions)
    assert len(set(zip(slides.tolist(), tiles.tolist()))) == len(positions)
    all_slides, all_tiles = plan.locate(np.arange(plan.size))
    assert sorted(zip(all_slides.tolist(), all_tiles.tolist())) == [
        (s, t) for s, n in enumerate(cat.n_tiles) for t in range(n)
    ]


@pytest.mark.parametrize("lanes,start_batch", [(2, 0), (3, 1), (3, 5)])
def test_each_worker_reads_only_its_own_windows(lanes, start_batch):
    """Worker k gets batches start+k, start+k+lanes, ...: their windows never overlap another worker's."""
    sched = Schedule(500, Layout(2, 1, 4, lanes, 3), "drop", seed=0, epoch=0, batch=start_batch)
    windows = collections.defaultdict(set)
    for n in range(sched.n_batches(0) - start_batch):
        epoch, j = sched.nth(n)
        w = sched.window(epoch, j)
        windows[n % lanes].add((w.start, w.length))
    starts = [{s for s, _ in ws} for ws in windows.values()]
    for a in range(len(starts)):
        for b in range(a + 1, len(starts)):
            assert not starts[a] & starts[b]
    intervals = sorted(w for ws in windows.values() for w in ws)
    for (s0, l0), (s1, _) in itertools.pairwise(intervals):
        assert s0 + l0 <= s1  # windows are disjoint runs of positions


def test_wrap_completes_the_last_global_batch_from_the_start_of_the_order():
    plan_size, world_size, batch = 50, 3, 4
    sched = [Schedule(plan_size, Layout(world_size, r, batch, 2, 1), "wrap", seed=1) for r in range(world_size)]
    n_batches = sched[0].n_batches(0)
    assert n_batches == -(-plan_size // (world_size * batch))
    virtual = np.concatenate(consumed(lambda r: sched[r], world_size, 0, n_batches))
    actual = sched[0].actual(virtual)
    counts = collections.Counter(actual.tolist())
    assert set(counts) == set(range(plan_size))  # every draw at least once
    twice = sorted(p for p, c in counts.items() if c == 2)
    assert twice == list(range(len(virtual) - plan_size)) and max(counts.values()) == 2


def test_order_is_deterministic_per_seed_and_epoch():
    cat = make_catalog([40, 30, 20], tiles_per_shard=8)
    sched = Schedule(cat.total_tiles, Layout(1, 0, 6, 2, 2), "drop", seed=3)

    def first_batches(seed, epoch):
        plan = EpochPlan(cat, "tile", None, None, seed=seed, epoch=epoch)
        sched.seed = seed
        return [plan.locate(sched.positions(epoch, j)[1]) for j in range(4)]

    same = first_batches(3, 1), first_batches(3, 1)
    for (s0, t0), (s1, t1) in zip(*same):
        assert np.array_equal(s0, s1) and np.array_equal(t0, t1)
    other_epoch, other_seed = first_batches(3, 2), first_batches(4, 1)
    as_list = [np.concatenate(t).tolist() for t in (same[0], other_epoch, other_seed)]
    assert as_list[0] != as_list[1] and as_list[0] != as_list[2]


def test_batches_mix_many_slides():
    cat = make_catalog([256] * 16, tiles_per_shard=32)
    plan = EpochPlan(cat, "tile", None, None, seed=0, epoch=0)
    sched = Schedule(plan.size, Layout(1, 0, 32, 1, 16), "drop", seed=0)  # window of 512 tiles = 16 shards
    slides, _ = plan.locate(sched.positions(0, 0)[1])
    assert len(set(slides.tolist())) >= 8


def test_slide_sampling_gives_every_slide_the_same_share():
    cat = make_catalog([5, 50, 500, 61], tiles_per_shard=16)
    for epoch in range(3):
        plan = EpochPlan(cat, "slide", None, None, seed=1, epoch=epoch)
        assert plan.size == cat.total_tiles
        slides, tiles = plan.locate(np.arange(plan.size))
        counts = np.bincount(slides, minlength=4)
        assert counts.max() - counts.min() <= 1
        big = tiles[slides == 2]
        assert len(np.unique(big)) == len(big)  # a large slide is subsampled without replacement
        small = np.bincount(tiles[slides == 0], minlength=5)
        assert small.max() - small.min() <= 1  # a small slide's tiles repeat evenly
    a = EpochPlan(cat, "slide", None, None, seed=1, epoch=0).slide_draws(2)
    b = EpochPlan(cat, "slide", None, None, seed=1, epoch=1).slide_draws(2)
    assert not np.array_equal(a, b)  # a different subsample each epoch


def test_store_weights_and_samples_per_epoch_set_the_shares():
    cat = make_catalog([100, 100, 100, 100], stores=[0, 0, 1, 1])
    quotas = slide_quotas(cat, "tile", (3.0, 1.0), 1000, seed=0, epoch=0)
    assert quotas.sum() == 1000
    assert quotas[:2].sum() == 750 and quotas[2:].sum() == 250
    assert slide_quotas(cat, "tile", None, None, seed=0, epoch=0) is None  # plain tile sampling
    with pytest.raises(ValueError, match="store_weights"):
        slide_quotas(cat, "tile", (0.0, 0.0), None, seed=0, epoch=0)


def test_reads_cover_a_window_with_one_call_per_shard():
    cat = make_catalog([40, 40], tiles_per_shard=16)
    plan = EpochPlan(cat, "tile", None, None, seed=0, epoch=0)
    reads = plan.reads(5, 45)
    assert sum(len(r.positions) for r in reads) == 40
    assert len(reads) <= 4  # 40 positions span at most 4 shards of 16
    for r in reads:
        assert r.tile_stop - r.tile_start <= 16
        slides, tiles = plan.locate(r.positions)
        assert (slides == r.slide).all() and np.array_equal(tiles, r.tiles)


@pytest.mark.parametrize(
    "old,new", [((2, 2, 4, 2), (1, 3, 4, 2)), ((3, 1, 5, 1), (2, 2, 3, 4)), ((1, 2, 4, 3), (4, 1, 4, 1))]
)
def test_resume_with_another_layout_skips_nothing_and_repeats_at_most_one_round(old, new):
    epoch_size = 301
    old_layout = Layout(old[0], 0, old[2], old[1], old[3])
    n_old = Schedule(epoch_size, old_layout, "drop", seed=5).n_batches(0)
    for stop in range(0, n_old, 3):  # the checkpoint is taken after `stop` batches of every rank
        used = (
            set(
                np.concatenate(
                    consumed(
                        lambda r: Schedule(epoch_size, Layout(old[0], r, old[2], old[1], old[3]), "drop", seed=5),
                        old[0],
                        0,
                        stop,
                    )
                ).tolist()
            )
            if stop
            else set()
        )
        restart = round_start(0, stop, epoch_size, old_layout, "drop")
        assert set(range(restart)) <= used  # everything before the restart point was consumed
        assert len(used - set(range(restart))) <= old_layout.round_tiles  # repeats: at most one round
        new_scheds = [
            Schedule(
                epoch_size, Layout(new[0], r, new[2], new[1], new[3]), "drop", seed=5, epoch=0, start_position=restart
            )
            for r in range(new[0])
        ]
        n_new = new_scheds[0].n_batches(0)
        rest = set(np.concatenate(consumed(new_scheds.__getitem__, new[0], 0, n_new)).tolist()) if n_new else set()
        covered = used | rest
        missing = set(range(epoch_size)) - covered
        assert len(missing) < new[0] * new[2]  # only the new layout's end-of-epoch remainder
