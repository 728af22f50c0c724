"""The order of an epoch's draws and how it is split over ranks, workers and batches (numpy only, no I/O).

Terms (docs/data.md explains the guarantees they give):

- *draw*: one use of one tile in an epoch. Tile sampling: every selected tile once. Slide sampling or store
  weights: a quota per slide, drawn from its tiles without replacement (cycling when the quota exceeds them).
- *unit*: the draws of one shard of one slide: what one zarr call reads.
- *epoch order*: the units in a seeded random order, their draws concatenated. A draw's index in it is its
  *position*. Positions depend on (seed, epoch, selection, sampling) only, never on world size or workers, and
  each sample's augmentation is drawn from (seed, epoch, position).
- *window*: a contiguous run of positions that one worker reads (whole shards from many slides) and shuffles.
- *round*: one window for every (rank, worker lane). Rank r, lane l reads window r * lanes + l of each round;
  its batches are every lanes-th batch of the rank, so each DataLoader worker reads only its own windows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pathdino.data.catalog import Catalog
from tiling.configio import ConfigError

TAG_UNITS, TAG_QUOTA, TAG_APPORTION, TAG_WINDOW, TAG_SAMPLE, TAG_MASK = 1, 2, 3, 4, 5, 6


def counter_rng(seed: int, tag: int, a: int = 0, b: int = 0) -> np.random.Generator:
    """An independent random stream for (seed, tag, a, b).

    Philox is counter-based: the stream for any key is created in microseconds without replaying others, which is
    what lets a sample's augmentation depend on its position alone.
    """
    return np.random.Generator(np.random.Philox(counter=[0, tag, a, b], key=seed))


def apportion(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties broken at random)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    left = int(total - base.sum())
    if left:
        frac = exact - base
        order = np.lexsort((rng.random(len(w)), -frac))
        base[order[:left]] += 1
    return base


def slide_quotas(
    catalog: Catalog,
    sampling: str,
    store_weights: tuple[float, ...] | None,
    samples_per_epoch: int | None,
    seed: int,
    epoch: int,
) -> np.ndarray | None:
    """Draws per slide this epoch, or None when every tile is drawn exactly once (plain tile sampling)."""
    if sampling == "tile" and store_weights is None and samples_per_epoch is None:
        return None
    total = samples_per_epoch if samples_per_epoch is not None else catalog.total_tiles
    rng = counter_rng(seed, TAG_APPORTION, epoch)
    n_stores = len(catalog.store_urls)
    per_slide = catalog.n_tiles if sampling == "tile" else np.ones(catalog.n_slides, dtype=np.int64)
    natural = np.bincount(catalog.store_index, weights=per_slide, minlength=n_stores)
    shares = natural if store_weights is None else np.asarray(store_weights, dtype=np.float64) * (natural > 0)
    if not shares.sum() > 0:
        raise ConfigError("DataConfig.store_weights give weight only to stores with no selected slides")
    quotas = np.zeros(catalog.n_slides, dtype=np.int64)
    for store, store_total in enumerate(apportion(total, shares, rng)):
        idx = np.flatnonzero(catalog.store_index == store)
        if len(idx):
            quotas[idx] = apportion(int(store_total), per_slide[idx], rng)
    return quotas


@dataclass(frozen=True)
class Read:
    """One zarr call: tiles [tile_start, tile_stop) of a slide, serving the given positions."""

    slide: int
    tile_start: int
    tile_stop: int
    positions: np.ndarray
    tiles: np.ndarray


class EpochPlan:
    """The epoch order of one epoch: where each position's draw comes from."""

    def __init__(
        self,
        catalog: Catalog,
        sampling: str,
        store_weights: tuple[float, ...] | None,
        samples_per_epoch: int | None,
        seed: int,
        epoch: int,
    ):
        self.catalog, self.seed, self.epoch = catalog, seed, epoch
        self._draw_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.quotas = slide_quotas(catalog, sampling, store_weights, samples_per_epoch, seed, epoch)
        tps = catalog.tiles_per_shard
        n_shards = -(-catalog.n_tiles // tps)
        unit_slide = np.repeat(np.arange(catalog.n_slides), n_shards)
        first_unit = np.concatenate([[0], np.cumsum(n_shards)[:-1]])
        unit_shard = np.arange(len(unit_slide)) - np.repeat(first_unit, n_shards)
        unit_start = unit_shard * tps[unit_slide]
        if self.quotas is None:
            unit_count = np.minimum(tps[unit_slide], catalog.n_tiles[unit_slide] - unit_start)
            self._draw_offset = None
        else:
            unit_count = np.zeros(len(unit_slide), dtype=np.int64)
            for s in np.flatnonzero(self.quotas):
                draws = self.slide_draws(int(s))
                unit_count[first_unit[s] : first_unit[s] + n_shards[s]] = np.bincount(
                    draws // tps[s], minlength=n_shards[s]
                )
            # Offset of each unit's first draw within its slide's sorted draws.
            within = np.cumsum(unit_count) - unit_count
            self._draw_offset = within - np.repeat(within[first_unit], n_shards)
        keep = np.flatnonzero(unit_count > 0)
        self._slide, self._start, self._count = unit_slide[keep], unit_start[keep], unit_count[keep]
        if self._draw_offset is not None:
            self._draw_offset = self._draw_offset[keep]
        self._order = counter_rng(seed, TAG_UNITS, epoch).permutation(len(keep))
        self._cum = np.concatenate([[0], np.cumsum(self._count[self._order])])
        self.size = int(self._cum[-1])

    def slide_draws(self, slide: int) -> np.ndarray:
        """The sorted tile indices slide ``slide`` contributes this epoch (quota mode; repeats allowed)."""
        cached = self._draw_cache.get(slide)
        if cached is not None:
            self._draw_cache.move_to_end(slide)
            return cached
        n, quota = int(self.catalog.n_tiles[slide]), int(self.quotas[slide])
        reps, extra = divmod(quota, n)
        counts = np.full(n, reps, dtype=np.int64)
        if extra:
            counts[counter_rng(self.seed, TAG_QUOTA, self.epoch, slide).choice(n, extra, replace=False)] += 1
        draws = np.repeat(np.arange(n, dtype=np.int64), counts)
        self._draw_cache[slide] = draws
        if len(self._draw_cache) > 256:
            self._draw_cache.popitem(last=False)
        return draws

    def _tiles(self, units: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        if self._draw_offset is None:
            return self._start[units] + offsets
        tiles = np.empty(len(units), dtype=np.int64)
        slides = self._slide[units]
        for s in np.unique(slides):
            sel = slides == s
            tiles[sel] = self.slide_draws(int(s))[self._draw_offset[units[sel]] + offsets[sel]]
        return tiles

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slide, tile index) of each position."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.size):
            raise IndexError(f"positions outside the epoch order 0:{self.size}")
        o = np.searchsorted(self._cum, positions, side="right") - 1
        units = self._order[o]
        return self._slide[units], self._tiles(units, positions - self._cum[o])

    def reads(self, start: int, stop: int) -> list[Read]:
        """The zarr calls that fetch every draw at positions [start, stop), one per unit touched."""
        if start >= stop:
            return []
        o_lo = int(np.searchsorted(self._cum, start, side="right") - 1)
        o_hi = int(np.searchsorted(self._cum, stop - 1, side="right") - 1)
        out = []
        for o in range(o_lo, o_hi + 1):
            u = int(self._order[o])
            a, b = max(start, int(self._cum[o])), min(stop, int(self._cum[o + 1]))
            positions = np.arange(a, b, dtype=np.int64)
            tiles = self._tiles(np.full(b - a, u), positions - self._cum[o])
            out.append(Read(int(self._slide[u]), int(tiles.min()), int(tiles.max()) + 1, positions, tiles))
        return out


@dataclass(frozen=True)
class Layout:
    """How one epoch order is consumed: ranks, batch size, worker lanes per rank, window size in batches."""

    world_size: int
    rank: int
    batch_size: int
    lanes: int
    window_batches: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def window_tiles(self) -> int:
        return self.window_batches * self.batch_size

    @property
    def round_tiles(self) -> int:
        return self.world_size * self.lanes * self.window_tiles


@dataclass(frozen=True)
class Window:
    """Virtual positions [start, start + length) shuffled together; a batch is chunk ``chunk`` of the shuffle."""

    start: int
    length: int
    chunk: int


class Schedule:
    """Maps a rank's batches (epoch, j) to windows; epochs after the first start at position 0.

    ``start_position`` > 0 only after resuming with a different layout: that first epoch then covers positions
    [start_position, epoch_size) only.
    """

    def __init__(
        self,
        epoch_size: int,
        layout: Layout,
        remainder: str,
        seed: int,
        epoch: int = 0,
        batch: int = 0,
        start_position: int = 0,
    ):
        self.epoch_size, self.layout, self.remainder, self.seed = epoch_size, layout, remainder, seed
        self.first_epoch, self.first_batch, self.first_start = epoch, batch, start_position
        if self.n_batches(epoch + 1) == 0:
            raise ConfigError(
                f"an epoch has {epoch_size} draws, fewer than one global batch "
                f"({layout.world_size} processes x {layout.batch_size}): lower the batch size or "
                "select more tiles"
            )

    def epoch_start(self, epoch: int) -> int:
        return self.first_start if epoch == self.first_epoch else 0

    def n_batches(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch`` (the same on all ranks)."""
        return _n_batches(self.epoch_size - self.epoch_start(epoch), self.layout.global_batch, self.remainder)

    def nth(self, n: int) -> tuple[int, int]:
        """The (epoch, batch) of the n-th batch counted from where this schedule starts."""
        first_left = self.n_batches(self.first_epoch) - self.first_batch
        if n < first_left:
            return self.first_epoch, self.first_batch + n
        per_epoch = self.n_batches(self.first_epoch + 1)
        k, j = divmod(n - first_left, per_epoch)
        return self.first_epoch + 1 + k, j

    def window(self, epoch: int, j: int) -> Window:
        lay = self.layout
        start = self.epoch_start(epoch)
        n_batches = self.n_batches(epoch)
        if not 0 <= j < n_batches:
            raise IndexError(f"batch {j} outside epoch {epoch}'s {n_batches} batches")
        per_round = lay.lanes * lay.window_batches
        full_rounds = (n_batches * lay.global_batch) // lay.round_tiles
        if j < full_rounds * per_round:
            q, t = divmod(j, per_round)
            lane, chunk = t % lay.lanes, t // lay.lanes
            origin = start + q * lay.round_tiles + (lay.rank * lay.lanes + lane) * lay.window_tiles
            return Window(origin, lay.window_tiles, chunk)
        # The last, partial round: each rank takes an equal run of whole batches, split over lanes by batch count.
        last = n_batches - full_rounds * per_round
        t = j - full_rounds * per_round
        lane, chunk = t % lay.lanes, t // lay.lanes
        lane_batches = [(last - k + lay.lanes - 1) // lay.lanes for k in range(lay.lanes)]
        origin = (
            start
            + full_rounds * lay.round_tiles
            + lay.rank * last * lay.batch_size
            + sum(lane_batches[:lane]) * lay.batch_size
        )
        return Window(origin, lane_batches[lane] * lay.batch_size, chunk)

    def positions(self, epoch: int, j: int) -> tuple[Window, np.ndarray]:
        """The window of batch (epoch, j) and the virtual positions of its samples, in batch order."""
        w = self.window(epoch, j)
        perm = counter_rng(self.seed, TAG_WINDOW, epoch, w.start).permutation(w.length)
        b = self.layout.batch_size
        return w, w.start + perm[w.chunk * b : (w.chunk + 1) * b]

    def actual(self, virtual: np.ndarray) -> np.ndarray:
        """Epoch-order positions of virtual positions (``wrap`` maps the overflow to the order's start)."""
        return np.where(virtual >= self.epoch_size, virtual - self.epoch_size, virtual)


def _n_batches(available: int, global_batch: int, remainder: str) -> int:
    available = max(available, 0)
    return available // global_batch if remainder == "drop" else -(-available // global_batch)


def round_start(epoch_start: int, batch: int, epoch_size: int, layout: Layout, remainder: str) -> int:
    """Position where the round holding ``batch`` began: every position before it was consumed under ``layout``.

    Resuming with another layout restarts the epoch here: draws already used from this round are seen again (at
    most one round), none is skipped.
    """
    n_batches = _n_batches(epoch_size - epoch_start, layout.global_batch, remainder)
    full_rounds = (n_batches * layout.global_batch) // layout.round_tiles
    q = min(batch // (layout.lanes * layout.window_batches), full_rounds)
    return epoch_start + q * layout.round_tiles
