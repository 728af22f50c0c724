"""`build_train_loader` and `TrainLoader`: the endless, resumable stream of `MultiCropBatch`es the trainer consumes."""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from pathdino.data.augment import augment_on_device, uint8_to_normalised
from pathdino.data.batch import MultiCropBatch
from pathdino.data.catalog import validate_stores
from pathdino.data.config import AugmentConfig, DataConfig, MaskConfig, check_patch_grid
from pathdino.data.plan import Layout, Schedule, round_start
from pathdino.data.worker import RankStream, RawBatch, StreamSpec, tune_worker_allocator
from tiling.configio import ConfigError

log = logging.getLogger("pathdino.data")
STATE_FORMAT = 1
_LOGGED_FAILURES = 20


def _identity(x: Any) -> Any:
    return x


class TrainLoader:
    """Endless iterable of `MultiCropBatch` for one process; epochs follow each other without a break.

    Every rank yields ``batches_per_epoch`` batches per epoch (the same on all ranks, so DDP never waits on a rank
    with fewer). ``state_dict()`` after a batch records the position after it; a loader given that state with
    ``load_state_dict`` yields exactly the batches the uninterrupted loader would have yielded next.
    """

    def __init__(self, spec: StreamSpec, device: torch.device | str):
        self.spec = spec
        self.device = torch.device(device)
        self._schedule = Schedule(spec.epoch_size, spec.layout, spec.data.epoch_remainder, spec.seed)
        self.batches_per_epoch = self._schedule.n_batches(1)
        self.samples_per_epoch = self.batches_per_epoch * spec.layout.batch_size
        self._position = [0, 0, 0]  # epoch, batch within epoch, start position of this epoch (see plan.py)
        self._start = torch.zeros(3, dtype=torch.int64)
        self._stream: RankStream | None = None
        self._dataloader: DataLoader | None = None
        self._generation = 0
        self._stats = {"batches": 0, "samples": 0, "failed_tiles": 0, "read_failures": 0, "decode_failures": 0}

    # -- iteration -----------------------------------------------------------------------------------------------

    def _make_dataloader(self) -> None:
        d = self.spec.data
        if d.num_workers > 0:
            self._start.share_memory_()
        self._stream = RankStream(self.spec, self._start)
        if d.num_workers == 0:
            return
        ctx = multiprocessing.get_context(d.start_method)
        if d.start_method == "forkserver":
            ctx.set_forkserver_preload(["torch"])  # workers fork from a server that has torch, not zarr, loaded
        self._dataloader = DataLoader(
            self._stream,
            batch_size=None,
            collate_fn=_identity,
            num_workers=d.num_workers,
            multiprocessing_context=ctx,
            persistent_workers=True,
            prefetch_factor=d.prefetch_batches,
            pin_memory=d.pin_memory and self.device.type == "cuda",
            worker_init_fn=tune_worker_allocator,
            # Its own generator: creating the worker iterator otherwise draws from the global torch RNG, which the
            # trainer restores on resume, so a resumed run's drop path etc. would differ from the uninterrupted one.
            generator=torch.Generator().manual_seed(self.spec.seed),
        )

    def __iter__(self) -> Iterator[MultiCropBatch]:
        """Batches from the current position on; a new iterator supersedes any earlier one."""
        self._generation += 1
        generation = self._generation
        if self._stream is None:
            self._make_dataloader()
        self._start.copy_(torch.tensor(self._position, dtype=torch.int64))
        source = iter(self._dataloader) if self._dataloader is not None else iter(self._stream)
        pin = self.spec.data.pin_memory and self.device.type == "cuda" and self._dataloader is None
        while generation == self._generation:  # checked before pulling: a superseded iterator takes nothing
            raw = next(source)
            epoch, batch, _ = self._position
            if (raw.epoch, raw.batch) != (epoch, batch):
                raise RuntimeError(
                    f"data loader out of order: got batch {raw.batch} of epoch {raw.epoch}, expected {batch} of {epoch}"
                )
            if pin:
                raw = raw.pin_memory()
            out = self._finalise(raw)
            self._advance()
            yield out

    def _advance(self) -> None:
        epoch, batch, start = self._position
        n_batches = Schedule(
            self.spec.epoch_size, self.spec.layout, self.spec.data.epoch_remainder, self.spec.seed, epoch, batch, start
        ).n_batches(epoch)
        self._position = [epoch, batch + 1, start] if batch + 1 < n_batches else [epoch + 1, 0, 0]
        self._stats["batches"] += 1
        self._stats["samples"] += self.spec.layout.batch_size

    def _finalise(self, raw: RawBatch) -> MultiCropBatch:
        aug, dev = self.spec.aug, self.device
        if raw.global_u8 is not None:
            g = uint8_to_normalised(raw.global_u8.to(dev, non_blocking=True), aug)
            loc = uint8_to_normalised(raw.local_u8.to(dev, non_blocking=True), aug)
        else:
            from pathdino.data.device import device_tiles

            tiles = device_tiles(raw, dev, self.spec.catalog.store_urls)
            g, loc = augment_on_device(tiles, raw.params, aug)
        self._record_failures(raw.failures)
        return MultiCropBatch(
            global_crops=g,
            local_crops=loc,
            masks=raw.masks.to(dev, non_blocking=True),
            slide_ids=raw.slide_ids,
            tile_indices=raw.tile_indices,
            store_indices=raw.store_indices,
        )

    def _record_failures(self, failures: list[dict]) -> None:
        for f in failures:
            self._stats["failed_tiles"] += 1
            kind = "read_failures" if f["error"].startswith("read failed") else "decode_failures"
            self._stats[kind] += 1
            n = self._stats["failed_tiles"]
            if n <= _LOGGED_FAILURES or n % 1000 == 0:
                log.warning(
                    "skipped tile %d of slide %r in %s (%s); %d tiles skipped so far%s",
                    f["tile"],
                    f["slide"],
                    f["store"],
                    f["error"],
                    n,
                    "; logging every 1000th from now on" if n == _LOGGED_FAILURES else "",
                )

    @property
    def stats(self) -> dict[str, int]:
        """Counters for logging: batches and samples yielded, tiles skipped (read or decode failures)."""
        return {**self._stats, "epoch": self._position[0]}

    # -- resume --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly position: the next batch is ``batch_in_epoch`` of ``epoch``. Identical on every rank."""
        lay = self.spec.layout
        epoch, batch, start = self._position
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "epoch_start_position": start,
            "seed": self.spec.seed,
            "world_size": lay.world_size,
            "num_workers": self.spec.data.num_workers,
            "batch_size_per_process": lay.batch_size,
            "window_batches": lay.window_batches,
            "epoch_size": self.spec.epoch_size,
            "epoch_remainder": self.spec.data.epoch_remainder,
            "dataset_fingerprint": self.spec.catalog.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool | None = None) -> None:
        """Continue from ``state``.

        Same world size, workers, batch size, window and stores: the next batches equal the uninterrupted run's.
        Otherwise the epoch restarts at the first position of the round that held the checkpoint under the old
        layout: nothing is skipped, and at most one round (old world_size x workers x window draws) repeats.
        Changed stores raise unless ``strict=False`` (default: ``not data.resume_changed_stores``), which resumes
        at the same epoch and share of the epoch.
        """
        if strict is None:
            strict = not self.spec.data.resume_changed_stores
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown data-loader state format {state.get('format')!r} (expected {STATE_FORMAT})")
        if int(state["seed"]) != self.spec.seed:
            raise ConfigError(
                f"the checkpoint's data seed {state['seed']} differs from this run's {self.spec.seed}; "
                "use the same seed (train.seed) to resume"
            )
        epoch, batch, start = int(state["epoch"]), int(state["batch_in_epoch"]), int(state["epoch_start_position"])
        lay = self.spec.layout
        if state["dataset_fingerprint"] != self.spec.catalog.fingerprint or state["epoch_size"] != self.spec.epoch_size:
            if strict:
                raise ConfigError(
                    "the selected stores/slides changed since the checkpoint (fingerprint "
                    f"{state['dataset_fingerprint']} -> {self.spec.catalog.fingerprint}, now "
                    f"{self.spec.catalog.uses or 'see data.stores'}); to continue at the same share "
                    "of the epoch with the new tiles, resume with the override "
                    "data.resume_changed_stores=true (or restore the old selection)",
                    key="data.resume_changed_stores",
                )
            old_global = int(state["world_size"]) * int(state["batch_size_per_process"])
            done = (start + batch * old_global) / max(int(state["epoch_size"]), 1)
            self._set_position(epoch, math.floor(done * self.spec.epoch_size))
            return
        old = Layout(
            int(state["world_size"]),
            lay.rank,
            int(state["batch_size_per_process"]),
            max(int(state["num_workers"]), 1),
            int(state["window_batches"]),
        )
        same = (old.world_size, old.batch_size, old.lanes, old.window_batches) == (
            lay.world_size,
            lay.batch_size,
            lay.lanes,
            lay.window_batches,
        )
        if same and state["epoch_remainder"] == self.spec.data.epoch_remainder:
            self._position = [epoch, batch, start]
            self._generation += 1
            return
        restart = round_start(start, batch, self.spec.epoch_size, old, state["epoch_remainder"])
        log.info(
            "resuming epoch %d at position %d with a different layout (world size %d->%d, workers %d->%d, "
            "batch %d->%d): up to one round of draws repeats",
            epoch,
            restart,
            old.world_size,
            lay.world_size,
            old.lanes,
            lay.lanes,
            old.batch_size,
            lay.batch_size,
        )
        self._set_position(epoch, restart)

    def _set_position(self, epoch: int, start: int) -> None:
        sched = Schedule(
            self.spec.epoch_size, self.spec.layout, self.spec.data.epoch_remainder, self.spec.seed, epoch, 0, start
        )
        self._position = [epoch, 0, start] if sched.n_batches(epoch) > 0 else [epoch + 1, 0, 0]
        self._generation += 1

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._generation += 1
        # torch has no public way to stop a persistent DataLoader's workers now; tests/test_private_apis.py pins
        # DataLoader._iterator and _shutdown_workers() (without them, workers stop at garbage collection).
        iterator = getattr(self._dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._dataloader = None
        self._stream = None


def build_train_loader(
    data: DataConfig,
    aug: AugmentConfig,
    masks: MaskConfig,
    *,
    patch_size: int,
    batch_size_per_process: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> TrainLoader:
    """Validate the stores against the recipe and return this process's `TrainLoader`.

    Batches come out on ``device``; global crops [n_global * B, 3, G, G] and local crops are normalised floats,
    masks are iBOT block masks over the global crops' patch grid (``G / patch_size`` per side).
    """
    grid = check_patch_grid(aug, patch_size)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: expected an integer >= 1")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: expected 0 <= rank < world_size ({world_size})")
    if (
        isinstance(batch_size_per_process, bool)
        or not isinstance(batch_size_per_process, int)
        or batch_size_per_process < 1
    ):
        raise ValueError(f"batch_size_per_process={batch_size_per_process!r}: expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**63)")
    if data.path == "gpu" and data.decode_device == "gpu" and torch.device(device).type != "cuda":
        log.info("decode_device='gpu' with device %s: decoding with torchvision on that device", device)
    catalog = validate_stores(data, aug)
    epoch_size = data.samples_per_epoch if data.samples_per_epoch is not None else catalog.total_tiles
    layout = Layout(
        world_size=world_size,
        rank=rank,
        batch_size=batch_size_per_process,
        lanes=max(data.num_workers, 1),
        window_batches=max(1, -(-data.shuffle_buffer_tiles // batch_size_per_process)),
    )
    spec = StreamSpec(
        catalog=catalog, data=data, aug=aug, masks=masks, grid=grid, layout=layout, seed=seed, epoch_size=epoch_size
    )
    return TrainLoader(spec, device)
