"""Slides from ``pathdino embed`` outputs -> packed, cropped, masked micro-batches for slide pretraining.

``SlideSource`` lists the complete slides of one or more embeddings stores (one tile encoder), with their tile
counts and tile strides. ``SlidePackLoader`` is this process's endless stream of ``SlidePack``s, following the
plan of ``pathdino.slide.plan`` (every slide once per epoch over processes and data workers, token budget,
contiguous crops, masks drawn per (seed, epoch, slide)); its position is the optimizer step it will serve next.
Layout of the stores: docs/export-embed-eval.md; the data path: docs/slide.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathdino.embed.store import EmbeddingStore
from pathdino.slide.plan import EpochPlan, crop_indices, mask_indices, rank_packs
from pathdino.slide.positions import grid_positions, row_major_order
from tiling.configio import ConfigError


@dataclass(frozen=True)
class SlideRef:
    store: int  # index into SlideSource.stores
    slide_id: str
    n_tiles: int


class SlideSource:
    """The slides of the embeddings stores ``paths`` (sorted by store, then slide id) with at least ``min_tiles``
    tiles; ConfigError when a store is missing, the stores come from different tile encoders, or no slide is left."""

    def __init__(
        self, paths: tuple[str, ...] | list[str], *, feature: str = "features", min_tiles: int = 2, cache: bool = False
    ):
        from pathdino.embed.store import EmbedError

        self.paths = tuple(str(p) for p in paths)
        self.feature = feature
        self._stores: list[EmbeddingStore] | None = None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        try:
            stores = self.stores
        except EmbedError as exc:
            raise ConfigError(f"data.embeddings: {exc}", key="data.embeddings") from exc
        self.encoder = stores[0].encoder  # the tile encoder (export names it in the slide encoder's card)
        for path, store in zip(self.paths[1:], stores[1:]):
            if store.encoder.get("weights_sha256") != self.encoder.get("weights_sha256"):
                raise ConfigError(
                    f"data.embeddings: {path} was embedded with another tile encoder ({store.encoder.get('dir')}) "
                    f"than {self.paths[0]} ({self.encoder.get('dir')}); a slide encoder trains on one encoder's "
                    "embeddings",
                    key="data.embeddings",
                )
        self.slides: list[SlideRef] = []
        self.skipped: list[str] = []
        for k, store in enumerate(stores):
            for sid in store.slide_ids:
                n = int(store.meta["slides"][sid].get("n_tiles", 0))
                (self.slides if n >= min_tiles else self.skipped).append(SlideRef(k, sid, n))
        if not self.slides:
            raise ConfigError(
                f"data.embeddings: no slide with at least data.min_tiles_per_slide={min_tiles} tiles "
                f"in {list(self.paths)}",
                key="data.embeddings",
            )
        self.dim = int(self.read(0)[0].shape[1])

    @property
    def stores(self) -> list[EmbeddingStore]:
        # opened lazily: a forked data worker opens its own handles
        if self._stores is None:
            self._stores = [EmbeddingStore(p, feature=self.feature) for p in self.paths]
        return self._stores

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stores": None}

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Slide ``index``: its tile embeddings [N, D] float32 and tile-grid positions [N, 2] (column, row), in
        row-major grid order (the order the encoder reads them in). Kept in memory with ``cache``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        ref = self.slides[index]
        store = self.stores[ref.store]
        features, coords = store[ref.slide_id]
        grid = grid_positions(torch.from_numpy(coords), tile_stride_px(store.slide_attrs(ref.slide_id), coords))
        order = row_major_order(grid).numpy()
        slide = np.ascontiguousarray(features[order], dtype=np.float32), grid.numpy()[order]
        if self._cache is not None:
            self._cache[index] = slide
        return slide

    def describe(self, index: int) -> str:
        ref = self.slides[index]
        return f"{Path(self.paths[ref.store]).name}/{ref.slide_id}"


def tile_stride_px(attrs: dict[str, Any], coords: np.ndarray) -> float:
    """Level-0 distance between neighbouring tiles: the tile store's ``level0_step_px`` (tile side minus overlap),
    else ``level0_tile_px``, else the smallest non-zero coordinate step of the slide (stores without provenance)."""
    slide = attrs.get("slide", {})
    for key in ("level0_step_px", "level0_tile_px"):
        if slide.get(key):
            return float(slide[key])
    steps = np.diff(np.unique(coords)) if coords.size else np.zeros(0)
    steps = steps[steps > 0]
    return float(steps.min()) if steps.size else 1.0


@dataclass(frozen=True)
class SlidePack:
    """One micro-batch: the (cropped) slides of a pack, their tiles concatenated in row-major grid order."""

    features: torch.Tensor  # [N_total, D] float32: tile embeddings
    grid_xy: torch.Tensor  # [N_total, 2] int64: tile-grid positions (column, row)
    lengths: torch.Tensor  # [B] int64: tiles of each slide
    masked: torch.Tensor  # [N_total] bool: the tokens the encoder does not see and the decoder predicts
    slides: tuple[int, ...]  # indices into SlideSource.slides
    epoch: int
    index: int  # global pack number

    def to(self, device: torch.device) -> SlidePack:
        move = {k: getattr(self, k).to(device, non_blocking=True) for k in ("features", "grid_xy", "lengths", "masked")}
        return SlidePack(**move, slides=self.slides, epoch=self.epoch, index=self.index)

    @property
    def n_masked(self) -> int:
        return int(self.masked.sum())


class PackDataset(torch.utils.data.Dataset):
    """Global pack number -> ``SlidePack`` (read, cropped, masked): what a data worker runs."""

    def __init__(
        self, source: SlideSource, plan: EpochPlan, *, max_tokens_per_slide: int, mask_ratio: float, seed: int
    ):
        self.source, self.plan = source, plan
        self.max_tokens, self.mask_ratio, self.seed = max_tokens_per_slide, mask_ratio, seed

    def __len__(self) -> int:  # endless; DataLoader only needs it for samplers it builds itself
        return 2**62

    def slide_tokens(self, slide: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slide ``slide`` as epoch ``epoch`` trains on it: features, grid positions, mask."""
        features, grid = self.source.read(slide)
        keep = crop_indices(grid, self.max_tokens, seed=self.seed, epoch=epoch, slide=slide)
        masked = mask_indices(len(keep), self.mask_ratio, seed=self.seed, epoch=epoch, slide=slide)
        return features[keep], grid[keep], masked

    def __getitem__(self, g: int) -> SlidePack:
        pack = self.plan.pack(g)
        parts = [self.slide_tokens(s, pack.epoch) for s in pack.slides]
        return SlidePack(
            features=torch.from_numpy(np.concatenate([p[0] for p in parts])),
            grid_xy=torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64)),
            lengths=torch.tensor([len(p[2]) for p in parts], dtype=torch.int64),
            masked=torch.from_numpy(np.concatenate([p[2] for p in parts])),
            slides=pack.slides,
            epoch=pack.epoch,
            index=pack.index,
        )


def _first(items: SlidePack) -> SlidePack:
    return items


class _RankSampler(torch.utils.data.Sampler):
    """This process's pack numbers from a step on (``plan.rank_packs``), endless."""

    def __init__(self, start_step: int, *, packs_per_step: int, rank: int, world: int):
        self.args = dict(start_step=start_step, packs_per_step=packs_per_step, rank=rank, world=world)

    def __iter__(self) -> Iterator[int]:
        return rank_packs(**self.args)

    def __len__(self) -> int:
        return 2**62


class SlidePackLoader:
    """This process's endless stream of ``SlidePack``s, resumable at an optimizer step.

    Each process reads ``packs_per_step / world`` packs per optimizer step; ``num_workers`` DataLoader workers
    read them in parallel (each pack number goes to one worker, and DataLoader returns them in order). The state
    is the next optimizer step, the same on every process: a run resumes with any number of processes.
    """

    def __init__(self, dataset: PackDataset, *, packs_per_step: int, rank: int, world: int, num_workers: int = 0):
        if packs_per_step % world:
            raise ConfigError(
                f"train.packs_per_step={packs_per_step} is not divisible by the {world} processes; "
                f"choose a multiple of {world}",
                key="train.packs_per_step",
            )
        self.dataset = dataset
        self.packs_per_step, self.rank, self.world = packs_per_step, rank, world
        self.accum = packs_per_step // world
        self.num_workers = num_workers
        self.next_step = 0
        self._served = 0  # packs served since next_step was set
        self._batches: Iterator[SlidePack] | None = None  # the DataLoader's iterator (its workers)
        slides = len(dataset.source.slides)
        self.samples_per_epoch = max(1, slides // world)  # slides per process per epoch (the metrics' epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step + self._served // self.accum, "packs_per_step": self.packs_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.next_step, self._served = int(state["next_step"]), 0

    def __iter__(self) -> Iterator[SlidePack]:
        self.close()
        self.next_step, self._served = self.state_dict()["next_step"], 0
        sampler = _RankSampler(self.next_step, packs_per_step=self.packs_per_step, rank=self.rank, world=self.world)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_first,
            prefetch_factor=2 if self.num_workers else None,
        )
        self._batches = batches = iter(loader)
        for pack in batches:
            self._served += 1
            yield pack

    def close(self) -> None:
        """Stop the data workers now (DataLoader's private ``_shutdown_workers``, pinned by
        tests/test_private_apis.py) rather than at garbage collection."""
        if self._batches is not None:
            if hasattr(self._batches, "_shutdown_workers"):
                self._batches._shutdown_workers()
            self._batches = None
