"""The trainer's data: what a loader must offer (``Loader``), building one for a phase, its state in checkpoints.

``build_loader`` gives the tile-store ``TrainLoader`` (pathdino.data) or, with ``train.synthetic_data``, the
``SyntheticLoader``, both at the phase's crops. ``train(cfg, loader=...)`` takes any ``Loader`` instead (tests,
benchmarks); optional abilities are protocols of their own, checked with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from pathdino.data.batch import MultiCropBatch
from pathdino.train.config import CropPlan, RunConfig
from tiling.configio import ConfigError


@runtime_checkable
class Loader(Protocol):
    """An endless stream of multi-crop batches with a position that checkpoints save and resumes restore."""

    samples_per_epoch: int  # samples per process per epoch: the ``epoch`` figure of the metrics

    def __iter__(self) -> Iterator[MultiCropBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class PhasedLoader(Loader, Protocol):
    """A loader that serves other crop sizes and batches: given to ``train``, it makes a run with phases possible."""

    def for_phase(self, cfg: RunConfig, batch_per_process: int) -> Loader: ...


@runtime_checkable
class ClosableLoader(Protocol):
    """A loader with workers or files to release when the run (or its phase) ends."""

    def close(self) -> None: ...


@runtime_checkable
class LoaderWithStats(Protocol):
    """A loader that counts what it did (batches, failed tiles, ...): logged as ``data_<key>`` on full steps."""

    @property
    def stats(self) -> dict[str, int]: ...


def check_loader(loader: object, cfg: RunConfig) -> None:
    """ConfigError unless ``loader`` (given to ``train``) can serve this run: a ``Loader``, phased for phases."""
    if not isinstance(loader, Loader):
        missing = [
            name
            for name in ("samples_per_epoch", "__iter__", "state_dict", "load_state_dict")
            if not hasattr(loader, name)
        ]
        raise ConfigError(
            f"train(loader=...): a {type(loader).__name__} is not a loader (it lacks {missing}); "
            "see pathdino.train.loader.Loader"
        )
    if cfg.train.phases and not isinstance(loader, PhasedLoader):
        raise ConfigError(
            "train.phases need a loader that serves each phase's crops: leave loader=None (tile "
            "stores or train.synthetic_data), or give the loader a for_phase(config, batch) method"
        )


def close_loader(loader: Loader) -> None:
    """Stop a loader's workers now rather than at garbage collection (loaders without any: nothing to do)."""
    if isinstance(loader, ClosableLoader):
        loader.close()


def loader_stats(loader: Loader) -> dict[str, int]:
    return dict(loader.stats) if isinstance(loader, LoaderWithStats) else {}


def build_loader(
    cfg: RunConfig, plan: CropPlan, *, batch_per_process: int, rank: int, world: int, device: torch.device
) -> Loader:
    """This process's loader for ``cfg`` (a phase's config) and its crops ``plan``."""
    patch = cfg.model.backbone.patch_size
    if cfg.train.synthetic_data:
        from pathdino.train.synthetic import SyntheticLoader

        return SyntheticLoader(
            plan,
            patch_size=patch,
            batch_size=batch_per_process,
            rank=rank,
            world_size=world,
            seed=cfg.train.seed,
            device=device,
        )
    from pathdino.data import build_train_loader

    return build_train_loader(
        cfg.data,
        cfg.augment,
        cfg.masks,
        patch_size=patch,
        batch_size_per_process=batch_per_process,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        device=device,
    )


def gather_loader_states(loader: Loader, world: int) -> list[Any]:
    """Every process's loader state (a collective: every process calls it), for the checkpoint."""
    state = loader.state_dict()
    if world == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def loader_state_for(states: list[Any], rank: int, world: int) -> Any:
    """This process's saved loader state: its own rank's with the same number of processes, else rank 0's.

    ``TrainLoader`` states are identical on every rank and hold the old layout, from which the loader itself
    continues under a new world size (pathdino.data.loader); per-rank states are kept for loaders that differ.
    """
    if len(states) == world:
        return states[rank]
    return states[0]
