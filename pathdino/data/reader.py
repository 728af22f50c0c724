"""Reading encoded tiles inside a worker: stores opened lazily, open slides kept in an LRU, windows read by threads.

Stores are opened in the process that reads them (never inherited through fork: zarr 3's event-loop thread does
not survive it). A window is read as one zarr call per shard it touches, `shards_in_flight` at a time; the next
window is read in the background while the current one is augmented.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pathdino.data.catalog import Catalog
from pathdino.data.plan import EpochPlan, Read
from tiling.store import StoreSlide, TileStore

_READ_ATTEMPTS = 3


@dataclass
class WindowData:
    """The encoded tiles of a window, by epoch-order position; a read failure is kept as its message."""

    encoded: dict[int, bytes]
    slide: dict[int, int]
    tile: dict[int, int]
    errors: dict[int, str]


class TileSource:
    """Encoded-tile access for one worker process."""

    def __init__(self, catalog: Catalog, max_open_slides: int, shards_in_flight: int):
        self.catalog = catalog
        self.max_open_slides = max_open_slides
        self._stores: dict[int, TileStore] = {}
        self._slides: OrderedDict[int, StoreSlide] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=shards_in_flight, thread_name_prefix="pathdino-read")

    def slide(self, s: int) -> StoreSlide:
        with self._lock:
            handle = self._slides.get(s)
            if handle is not None:
                self._slides.move_to_end(s)
                return handle
            store_i = int(self.catalog.store_index[s])
            if store_i not in self._stores:
                self._stores[store_i] = TileStore(self.catalog.store_urls[store_i])
            handle = self._stores[store_i].slide(self.catalog.slide_ids[s])
            self._slides[s] = handle
            if len(self._slides) > self.max_open_slides:
                self._slides.popitem(last=False)
            return handle

    def read(self, r: Read) -> list[bytes]:
        """The bytes of tiles [r.tile_start, r.tile_stop), retried on transient errors."""
        error: Exception | None = None
        for _ in range(_READ_ATTEMPTS):
            try:
                return self.slide(r.slide).read_encoded(r.tile_start, r.tile_stop)
            except Exception as exc:  # noqa: BLE001 - object stores raise many types; the caller records it
                error = exc
        assert error is not None
        raise error

    def fetch(self, plan: EpochPlan, ranges: list[tuple[int, int]]) -> PendingWindow:
        """Start reading the draws at epoch-order positions in ``ranges`` (returns at once)."""
        reads = [r for start, stop in ranges for r in plan.reads(start, stop)]
        return PendingWindow([(r, self._pool.submit(self.read, r)) for r in reads])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PendingWindow:
    """A window being read; `result()` waits for its reads and indexes the bytes by position."""

    def __init__(self, futures: list[tuple[Read, Future]]):
        self._futures = futures
        self._data: WindowData | None = None

    def result(self) -> WindowData:
        if self._data is None:
            data = WindowData({}, {}, {}, {})
            for r, fut in self._futures:
                try:
                    chunk, err = fut.result(), None
                except Exception as exc:  # noqa: BLE001 - recorded per tile, never fatal
                    chunk, err = None, f"read failed: {type(exc).__name__}: {exc}"
                for pos, tile in zip(r.positions.tolist(), r.tiles.tolist()):
                    data.slide[pos], data.tile[pos] = r.slide, tile
                    if chunk is None:
                        data.errors[pos] = err
                    else:
                        data.encoded[pos] = chunk[tile - r.tile_start]
            self._data, self._futures = data, []
        return self._data


def window_ranges(start: int, length: int, epoch_size: int) -> list[tuple[int, int]]:
    """Epoch-order ranges behind virtual positions [start, start + length) (``wrap`` overflows to the start)."""
    stop = start + length
    if stop <= epoch_size:
        return [(start, stop)]
    ranges = [(start, epoch_size)] if start < epoch_size else []
    lo = max(start, epoch_size) - epoch_size
    return ranges + [(lo, min(stop - epoch_size, epoch_size))]
