"""What runs in a DataLoader worker: read a window, decode its tiles, build this rank's batches.

Worker ``k`` of ``lanes`` builds the rank's batches k, k + lanes, k + 2 * lanes, ... counted from where iteration
starts, which is the order in which the DataLoader collects them, so the loader's output is batch 0, 1, 2, ... of
the rank and each worker reads only its own windows.
"""

from __future__ import annotations

import ctypes
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pathdino.data.augment import CpuAugmenter
from pathdino.data.catalog import Catalog
from pathdino.data.config import AugmentConfig, DataConfig, MaskConfig
from pathdino.data.masks import BlockMasker
from pathdino.data.params import CropParams, sample_params
from pathdino.data.plan import TAG_MASK, EpochPlan, Layout, Schedule, counter_rng
from pathdino.data.reader import PendingWindow, TileSource, window_ranges
from tiling.store import decode_tile


@dataclass
class RawBatch:
    """A batch as a worker hands it over: uint8 crops (CPU path) or decoded/encoded tiles + crop parameters."""

    epoch: int
    batch: int
    slide_ids: list[str]
    tile_indices: torch.Tensor
    store_indices: torch.Tensor
    masks: torch.Tensor
    failures: list[dict] = field(default_factory=list)
    global_u8: torch.Tensor | None = None
    local_u8: torch.Tensor | None = None
    tiles_u8: torch.Tensor | None = None
    encoded: torch.Tensor | None = None  # device decoding: all JPEG bytes in one flat uint8 tensor ...
    encoded_lengths: list[int] | None = None  # ... tile i's bytes; 0 where `predecoded` holds the tile
    predecoded: dict[int, torch.Tensor] | None = None  # (H, W, 3) uint8 tiles decoded by the worker (PNG)
    params: tuple[CropParams, CropParams] | None = None

    def pin_memory(self) -> RawBatch:
        """Called by the DataLoader's pinning thread."""
        for name in ("global_u8", "local_u8", "tiles_u8", "masks"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to rebuild its part of the stream (small and picklable)."""

    catalog: Catalog
    data: DataConfig
    aug: AugmentConfig
    masks: MaskConfig
    grid: int
    layout: Layout
    seed: int
    epoch_size: int


def _as_rgb(tile: np.ndarray) -> np.ndarray:
    if tile.ndim == 2:
        return np.repeat(tile[:, :, None], 3, axis=2)
    if tile.ndim == 3 and tile.shape[2] == 4:
        return np.ascontiguousarray(tile[:, :, :3])
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"decoded to shape {tile.shape} dtype {tile.dtype}, expected (H, W, 3) uint8")
    return tile


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # In a worker the batch travels through shared memory: allocate it there to skip a copy.
    t = torch.empty(shape, dtype=dtype)
    return t.share_memory_() if get_worker_info() is not None else t


class BatchBuilder:
    """Builds one rank's raw batches; holds the worker's open stores and its current and next window."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.cat = spec.catalog
        self.source = TileSource(spec.catalog, spec.data.max_open_slides, spec.data.shards_in_flight)
        self.augment = CpuAugmenter(spec.aug)
        self.masker = BlockMasker(spec.masks, spec.grid)
        self._plans: dict[int, EpochPlan] = {}
        self._windows: dict[tuple[int, int], PendingWindow] = {}
        self._last_good: tuple[np.ndarray, int, int] | None = None  # (tile, slide, tile index) for substitution

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            d = self.spec.data
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = EpochPlan(
                self.cat, d.sampling, d.store_weights, d.samples_per_epoch, self.spec.seed, epoch
            )
        return self._plans[epoch]

    def _fetch(self, schedule: Schedule, epoch: int, j: int) -> tuple[int, int]:
        w = schedule.window(epoch, j)
        key = (epoch, w.start)
        if key not in self._windows:
            ranges = window_ranges(w.start, w.length, self.spec.epoch_size)
            self._windows[key] = self.source.fetch(self.plan(epoch), ranges)
        return key

    def _decode(self, data: bytes, slide: int) -> np.ndarray:
        return _as_rgb(decode_tile(data, self.cat.encodings[slide]))

    def build(self, schedule: Schedule, epoch: int, j: int, next_batch: tuple[int, int] | None) -> RawBatch:
        spec, cat = self.spec, self.cat
        _, virtual = schedule.positions(epoch, j)
        key = self._fetch(schedule, epoch, j)
        keep = {key}
        if next_batch is not None:  # read the next window while this batch is augmented
            keep.add(self._fetch(schedule, *next_batch))
        self._windows = {k: v for k, v in self._windows.items() if k in keep}
        data = self._windows[key].result()
        actual = schedule.actual(virtual)
        gpu_decode = spec.data.path == "gpu" and spec.data.decode_device == "gpu"

        tiles: list[np.ndarray | None] = []
        encoded: list[bytes | None] = []
        failures: list[dict] = []
        slides = [data.slide[int(p)] for p in actual]
        tile_idx = [data.tile[int(p)] for p in actual]
        for pos, s, t in zip(actual.tolist(), slides, tile_idx):
            error = data.errors.get(pos)
            tile = None
            if error is None and gpu_decode and cat.encodings[s] == "jpeg":
                encoded.append(data.encoded[pos])
                tiles.append(None)
                continue
            if error is None:
                try:
                    tile = self._decode(data.encoded[pos], s)
                except Exception as exc:  # noqa: BLE001 - a corrupt tile is skipped, never fatal
                    error = f"decode failed: {type(exc).__name__}: {exc}"
            if error is not None:
                failures.append(
                    {
                        "store": cat.store_urls[int(cat.store_index[s])],
                        "slide": cat.slide_ids[s],
                        "tile": t,
                        "error": error,
                    }
                )
            tiles.append(tile)
            encoded.append(None)
        self._substitute(tiles, encoded, slides, tile_idx, failures)

        b = spec.layout.batch_size
        groups = []
        for i in range(b):
            if tiles[i] is not None:
                h, w = tiles[i].shape[:2]
            else:  # decoded on the device later: the store's tile size
                h = w = int(cat.tile_px[slides[i]])
            groups.append(sample_params(spec.aug, spec.seed, epoch, int(virtual[i]), h, w))
        mask_rng = random.Random(int(counter_rng(spec.seed, TAG_MASK, epoch, int(virtual[0])).integers(2**63)))
        masks = torch.from_numpy(self.masker.batch(spec.aug.n_global_crops * b, mask_rng))
        raw = RawBatch(
            epoch=epoch,
            batch=j,
            slide_ids=[cat.slide_ids[s] for s in slides],
            tile_indices=torch.tensor(tile_idx, dtype=torch.int64),
            store_indices=torch.tensor([int(cat.store_index[s]) for s in slides], dtype=torch.int64),
            masks=masks,
            failures=failures,
        )
        if spec.data.path == "cpu":
            self._augment_cpu(raw, tiles, groups)
        else:
            self._pack_tiles(raw, tiles, encoded, groups)
        return raw

    def _substitute(
        self, tiles: list, encoded: list, slides: list[int], tile_idx: list[int], failures: list[dict]
    ) -> None:
        """Fill failed slots with another tile of the batch (or this worker's last good tile): shapes stay fixed."""
        good = [i for i in range(len(tiles)) if tiles[i] is not None or encoded[i] is not None]
        if not failures:
            i = good[-1]
            if tiles[i] is not None:
                self._last_good = (tiles[i], slides[i], tile_idx[i])
            return
        for i in range(len(tiles)):
            if tiles[i] is not None or encoded[i] is not None:
                continue
            if good:
                src = good[i % len(good)]
                tiles[i], encoded[i], slides[i], tile_idx[i] = tiles[src], encoded[src], slides[src], tile_idx[src]
            elif self._last_good is not None:
                tiles[i], slides[i], tile_idx[i] = self._last_good
            else:
                raise RuntimeError(
                    f"every tile of this worker's first batch failed to read or decode: "
                    f"{failures[:3]} ... The stores look broken; check them with `pathdino info`."
                )

    def _augment_cpu(self, raw: RawBatch, tiles: list[np.ndarray], groups: list) -> None:
        aug, b = self.spec.aug, self.spec.layout.batch_size
        g = _new_tensor((aug.n_global_crops * b, 3, aug.global_crop_px, aug.global_crop_px), torch.uint8)
        loc = _new_tensor((aug.n_local_crops * b, 3, aug.local_crop_px, aug.local_crop_px), torch.uint8)
        gv = g.view(aug.n_global_crops, b, *g.shape[1:])
        lv = loc.view(aug.n_local_crops, b, *loc.shape[1:])
        for i, tile in enumerate(tiles):
            self.augment(tile, groups[i], (gv[:, i], lv[:, i]))
        raw.global_u8, raw.local_u8 = g, loc

    def _pack_tiles(self, raw: RawBatch, tiles: list, encoded: list, groups: list) -> None:
        raw.params = (CropParams.crop_major([gr[0] for gr in groups]), CropParams.crop_major([gr[1] for gr in groups]))
        if any(e is not None for e in encoded):
            # Device decoding: the bytes travel as one tensor (one shared-memory segment, not one per tile).
            raw.encoded_lengths = [len(e) if e is not None else 0 for e in encoded]
            raw.encoded = torch.frombuffer(bytearray(b"".join(e for e in encoded if e is not None)), dtype=torch.uint8)
            raw.predecoded = {
                i: torch.from_numpy(np.ascontiguousarray(t))
                for i, (e, t) in enumerate(zip(encoded, tiles))
                if e is None
            }
            return
        h = max(t.shape[0] for t in tiles)
        w = max(t.shape[1] for t in tiles)
        out = _new_tensor((len(tiles), h, w, 3), torch.uint8)
        if any(t.shape[:2] != (h, w) for t in tiles):
            out.zero_()
        for i, t in enumerate(tiles):
            out[i, : t.shape[0], : t.shape[1]] = torch.from_numpy(t)
        raw.tiles_u8 = out


def tune_worker_allocator(_: int = 0) -> None:
    """A DataLoader worker's start: Ctrl-C and SIGTERM sent to the whole process group (a terminal, SLURM) are
    left to the training process, which finishes its step, checkpoints and stops the workers (they also exit when
    it dies); a worker killed first would cost the step a traceback. And keep freed memory in the heap (glibc):
    crops are allocated and freed thousands of times a second, and returning them to the OS each time costs page
    faults on every new buffer (measured ~2x on blur)."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        except OSError:
            pass


class RankStream(IterableDataset):
    """The endless stream of one rank's raw batches, split over the DataLoader's workers (lanes)."""

    def __init__(self, spec: StreamSpec, start: torch.Tensor):
        self.spec = spec
        self.start = start  # shared [epoch, batch, start_position]: where the next iteration begins

    def __iter__(self):
        info = get_worker_info()
        worker, lanes = (info.id, info.num_workers) if info is not None else (0, 1)
        if lanes != self.spec.layout.lanes:
            raise RuntimeError(f"the stream was planned for {self.spec.layout.lanes} workers but runs on {lanes}")
        epoch, batch, start_position = (int(v) for v in self.start.tolist())
        spec = self.spec
        schedule = Schedule(
            spec.epoch_size, spec.layout, spec.data.epoch_remainder, spec.seed, epoch, batch, start_position
        )
        builder = BatchBuilder(spec)
        n = worker
        try:
            while True:
                current, following = schedule.nth(n), schedule.nth(n + lanes)
                yield builder.build(schedule, *current, next_batch=following)
                n += lanes
        finally:
            builder.source.close()
