"""Tile stores -> DINOv2 multi-crop batches: sampling, augmentation (CPU workers or batched on the GPU), iBOT masks.

Typical use (docs/data.md has the details and guarantees)::

    from pathdino.data import AugmentConfig, DataConfig, MaskConfig, build_train_loader

    loader = build_train_loader(DataConfig(stores=("tiles.zarr",)), AugmentConfig(), MaskConfig(), patch_size=14,
                                batch_size_per_process=64, rank=0, world_size=1, seed=0, device="cuda")
    for batch in loader:        # endless; loader.samples_per_epoch per process per epoch
        ...
    state = loader.state_dict() # save with the checkpoint; loader.load_state_dict(state) resumes exactly

The configs and `validate_stores` import without torch; the loader and the batch load it on first use.
"""

from typing import Any

from pathdino.data.catalog import Catalog, validate_stores
from pathdino.data.config import AugmentConfig, DataConfig, DataConfigError, MaskConfig

__all__ = [
    "AugmentConfig",
    "Catalog",
    "DataConfig",
    "DataConfigError",
    "MaskConfig",
    "MultiCropBatch",
    "TrainLoader",
    "build_train_loader",
    "validate_stores",
]


def __getattr__(name: str) -> Any:
    if name in ("TrainLoader", "build_train_loader"):
        from pathdino.data import loader

        return getattr(loader, name)
    if name == "MultiCropBatch":
        from pathdino.data.batch import MultiCropBatch

        return MultiCropBatch
    raise AttributeError(f"module 'pathdino.data' has no attribute {name!r}")
