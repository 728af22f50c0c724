"""Decode tile-store tiles in DataLoader workers, batch by batch, in the store's order.

Each work unit is a run of up to ``batch_size`` consecutive tiles of one slide (one zarr call reads its bytes).
Workers decode JPEG/PNG with imagecodecs into uint8 [n, H, W, 3] tensors; the main process moves them to the device
and normalises there, so the model never waits for decoding once the prefetch queue is full. Workers start with
``spawn`` (zarr 3's event-loop thread can deadlock a forked worker) and open the store themselves. A unit whose
tiles cannot be read comes back as an error message instead of an exception, so one corrupt slide does not stop
the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class WorkUnit:
    slide_id: str
    start: int
    stop: int
    last: bool  # the final unit of its tile range: the runner finishes that range when it arrives
    item: int = 0  # index of the tile range (a whole slide or a part of one) this unit belongs to


def plan_units(ranges: list[tuple[str, int, int]], batch_size: int) -> list[WorkUnit]:
    """Units of ``batch_size`` consecutive tiles over each ``(slide_id, start, stop)`` (empty ranges get none)."""
    units = []
    for k, (slide_id, first, end) in enumerate(ranges):
        for start in range(first, end, batch_size):
            stop = min(start + batch_size, end)
            units.append(WorkUnit(slide_id, start, stop, stop == end, k))
    return units


class TileBatches(Dataset):
    """Map-style dataset: item ``i`` is ``(i, uint8 tiles [n, H, W, 3] or None, error message or "")``."""

    def __init__(self, store_url: str, units: list[WorkUnit], tile_px: dict[str, int]):
        self.store_url = store_url
        self.units = units
        self.tile_px = tile_px
        self._store = None
        self._slide = None

    def __len__(self) -> int:
        return len(self.units)

    def _open(self, slide_id: str):
        from tiling.store import TileStore

        if self._store is None:  # opened lazily: in the worker process, never inherited
            self._store = TileStore(self.store_url)
        if self._slide is None or self._slide.slide_id != slide_id:
            self._slide = self._store.slide(slide_id)
        return self._slide

    def __getitem__(self, i: int):
        from tiling.store import decode_tile

        unit = self.units[i]
        try:
            slide = self._open(unit.slide_id)
            encoded = slide.read_encoded(unit.start, unit.stop)
            px = self.tile_px[unit.slide_id]
            out = np.empty((len(encoded), px, px, 3), dtype=np.uint8)
            for j, data in enumerate(encoded):
                tile = decode_tile(data, slide.encoding)
                if tile.shape != (px, px, 3):
                    raise ValueError(f"tile {unit.start + j} decodes to {tile.shape}, expected {(px, px, 3)}")
                out[j] = tile
        except Exception as exc:  # noqa: BLE001 - reported per slide by the runner
            return i, None, f"{type(exc).__name__}: {exc} (tiles {unit.start}:{unit.stop})"
        return i, torch.from_numpy(out), ""


def _limit_threads(_: int) -> None:
    # Decoding is single-threaded per tile; extra intra-op threads in workers only steal cores from the model.
    torch.set_num_threads(1)


def make_loader(
    store_url: str,
    units: list[WorkUnit],
    tile_px: dict[str, int],
    num_workers: int,
    pin_memory: bool,
    prefetch_units: int = 4,
) -> DataLoader:
    """A DataLoader yielding units in order; ``num_workers=0`` decodes in the calling process."""
    workers = max(0, min(num_workers, len(units)))
    extra = (
        {
            "multiprocessing_context": "spawn",
            "prefetch_factor": prefetch_units,
            "persistent_workers": False,
            "worker_init_fn": _limit_threads,
        }
        if workers
        else {}
    )
    return DataLoader(
        TileBatches(store_url, units, tile_px),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        **extra,
    )
