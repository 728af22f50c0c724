"""The slide-pretraining data plan: pure functions of (seed, epoch, slide), no I/O, no torch.

One epoch visits every slide once: the slides are shuffled by ``(seed, epoch)``, each is cut to at most
``max_tokens_per_slide`` tiles (``crop_indices``), and consecutive slides are packed greedily into micro-batches
("packs") of at most ``tokens_per_pack`` tiles (``pack_slides``). Packs are numbered globally over epochs; optimizer
step ``s`` of a run with ``P`` packs per step consumes packs ``[s * P, (s + 1) * P)``, process ``r`` of ``W`` taking
packs ``s * P + m * W + r`` (micro-step ``m``). So every slide is seen exactly once per epoch whatever the number
of processes and data workers, and a run's position is one number (the next step) that any process count can
continue from.

Which tiles are masked (``mask_indices``) is drawn from ``(seed, epoch, slide)`` too, so an interrupted run that
resumes masks exactly as the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Distinct streams of one (seed, epoch, slide): the crop's anchor and the mask.
_CROP, _MASK, _ORDER = 1, 2, 3


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def crop_indices(grid_xy: np.ndarray, max_tokens: int, *, seed: int, epoch: int, slide: int) -> np.ndarray:
    """Tiles (indices into ``grid_xy`` [N, 2], ascending) kept of a slide with more than ``max_tokens`` tiles.

    The kept region is contiguous on the tile grid: the ``max_tokens`` tiles nearest to an anchor tile in the
    Chebyshev (square) distance, ties broken in row-major order, i.e. a square window around the anchor whose
    outermost ring is filled row by row (at a slide's edge the square grows inward). The anchor is a tile drawn
    from ``(seed, epoch, slide)``, so each epoch sees another region, and a resumed run the same one.
    Slides with at most ``max_tokens`` tiles are kept whole.
    """
    n = int(grid_xy.shape[0])
    if n <= max_tokens:
        return np.arange(n)
    anchor = grid_xy[_rng(seed, epoch, slide, _CROP).integers(n)]
    distance = np.abs(grid_xy - anchor).max(axis=1)
    order = np.lexsort((grid_xy[:, 0], grid_xy[:, 1], distance))  # by distance, then row (y), then column (x)
    return np.sort(order[:max_tokens])


def mask_count(n_tiles: int, mask_ratio: float) -> int:
    """Masked tiles of a slide of ``n_tiles``: ``round(mask_ratio * n)``, at least one masked and one visible
    (a one-tile slide has nothing to predict from and is not masked)."""
    if n_tiles < 2:
        return 0
    return min(max(int(round(mask_ratio * n_tiles)), 1), n_tiles - 1)


def mask_indices(n_tiles: int, mask_ratio: float, *, seed: int, epoch: int, slide: int) -> np.ndarray:
    """Which of a (cropped) slide's ``n_tiles`` tokens are masked: a boolean [n_tiles], uniformly at random
    (MAE), ``mask_count`` of them, drawn from ``(seed, epoch, slide)``."""
    masked = np.zeros(n_tiles, dtype=bool)
    k = mask_count(n_tiles, mask_ratio)
    masked[_rng(seed, epoch, slide, _MASK).permutation(n_tiles)[:k]] = True
    return masked


@dataclass(frozen=True)
class Pack:
    """One micro-batch of the plan: the slides (indices into the run's slide list) and their kept tile counts."""

    epoch: int
    index: int  # global pack number (over epochs)
    slides: tuple[int, ...]
    tokens: tuple[int, ...]  # tiles kept of each slide (after cropping)


def pack_slides(order: Sequence[int], tokens: Sequence[int], tokens_per_pack: int) -> list[list[int]]:
    """Greedy packing in ``order``: a slide joins the current pack while the pack's tiles stay within
    ``tokens_per_pack``, else it opens the next one. Returns positions into ``order`` per pack."""
    packs: list[list[int]] = []
    used = tokens_per_pack + 1
    for position, slide in enumerate(order):
        if used + tokens[slide] > tokens_per_pack:
            packs.append([])
            used = 0
        packs[-1].append(position)
        used += tokens[slide]
    return packs


class EpochPlan:
    """The packs of every epoch for slides of ``n_tiles`` tiles (in the run's slide order), numbered globally.

    ``pack(g)`` is the g-th pack of the run; epochs are planned on demand (a few microseconds per slide) and the
    last few are kept.
    """

    def __init__(self, n_tiles: Sequence[int], *, max_tokens_per_slide: int, tokens_per_pack: int, seed: int):
        if not n_tiles:
            raise ValueError("EpochPlan: no slides")
        self.tokens = [min(int(n), max_tokens_per_slide) for n in n_tiles]
        self.tokens_per_pack = tokens_per_pack
        self.seed = seed
        self._starts = [0]  # first global pack number of epoch e (known for the epochs planned so far)
        self._epoch = lru_cache(maxsize=4)(self._plan_epoch)

    def _plan_epoch(self, epoch: int) -> tuple[tuple[int, ...], list[list[int]]]:
        order = tuple(int(i) for i in _rng(self.seed, epoch, _ORDER).permutation(len(self.tokens)))
        return order, pack_slides(order, self.tokens, self.tokens_per_pack)

    def packs_in_epoch(self, epoch: int) -> int:
        return len(self._epoch(epoch)[1])

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, pack within the epoch) of global pack ``g``."""
        while self._starts[-1] <= g:
            self._starts.append(self._starts[-1] + self.packs_in_epoch(len(self._starts) - 1))
        epoch = int(np.searchsorted(self._starts, g, side="right")) - 1
        return epoch, g - self._starts[epoch]

    def pack(self, g: int) -> Pack:
        epoch, j = self.locate(g)
        order, packs = self._epoch(epoch)
        slides = tuple(order[p] for p in packs[j])
        return Pack(epoch=epoch, index=g, slides=slides, tokens=tuple(self.tokens[s] for s in slides))


def rank_packs(start_step: int, *, packs_per_step: int, rank: int, world: int):
    """The global pack numbers process ``rank`` of ``world`` trains on from optimizer step ``start_step`` on,
    in order (endless): micro-step ``m`` of step ``s`` is pack ``s * packs_per_step + m * world + rank``."""
    accum = packs_per_step // world
    step = start_step
    while True:
        for micro in range(accum):
            yield step * packs_per_step + micro * world + rank
        step += 1


def step_masked_tiles(plan: EpochPlan, step: int, *, packs_per_step: int, mask_ratio: float) -> int:
    """Masked tiles of optimizer step ``step`` over all its packs (every process computes it alone: the loss of
    each micro-batch is divided by it, so that the step's gradient is the mean over all its masked tiles)."""
    return sum(
        mask_count(t, mask_ratio)
        for g in range(step * packs_per_step, (step + 1) * packs_per_step)
        for t in plan.pack(g).tokens
    )
