"""Configuration of pathdino.data: defaults, normalisation of inputs, and errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from pathdino.data import AugmentConfig, DataConfig, DataConfigError, MaskConfig


def test_defaults_are_the_documented_recipe():
    aug = AugmentConfig()
    assert (aug.n_global_crops, aug.global_crop_px, aug.global_crop_scale) == (2, 224, (0.32, 1.0))
    assert (aug.n_local_crops, aug.local_crop_px, aug.local_crop_scale) == (8, 98, (0.05, 0.32))
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue, aug.color_jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert aug.blur_p_global == (1.0, 0.1) and aug.blur_p_local == 0.5 and aug.solarize_p_global == (0.0, 0.2)
    assert AugmentConfig.preset("dinov2_upstream").blur_p_global == (0.0, 0.9)
    masks = MaskConfig()
    assert (masks.mask_probability, masks.mask_ratio, masks.min_block_patches) == (0.5, (0.1, 0.5), 4)
    data = DataConfig(stores=["a.zarr"], slides="TCGA-*")
    assert data.stores == ("a.zarr",) and data.slides == ("TCGA-*",)  # lists and strings become tuples
    assert data.sampling == "tile" and data.path == "cpu" and data.start_method == "forkserver"
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.num_workers = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"stores": ()}, "stores"),
        ({"sampling": "uniform"}, "sampling"),
        ({"store_weights": (1.0,)}, "store_weights"),
        ({"store_weights": (0.0, 0.0)}, "store_weights"),
        ({"num_workers": -1}, "num_workers"),
        ({"shuffle_buffer_tiles": 0}, "shuffle_buffer_tiles"),
        ({"path": "tpu"}, "path"),
        ({"decode_device": "gpu"}, "decode_device"),
        ({"start_method": "fork"}, "start_method"),
        ({"epoch_remainder": "pad"}, "epoch_remainder"),
        ({"samples_per_epoch": 0}, "samples_per_epoch"),
        ({"slides": ()}, "slides"),
    ],
)
def test_data_config_errors_name_the_field(kwargs, field):
    base = {"stores": ("a.zarr", "b.zarr")}
    with pytest.raises(DataConfigError, match=rf"DataConfig\.{field}="):
        DataConfig(**{**base, **kwargs})


def test_fork_is_refused_with_the_reason():
    with pytest.raises(DataConfigError, match="deadlock"):
        DataConfig(stores=("a.zarr",), start_method="fork")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"global_crop_scale": (0.5, 0.2)}, "global_crop_scale"),
        ({"n_global_crops": 0}, "n_global_crops"),
        ({"hue": 0.7}, "hue"),
        ({"blur_kernel_px": 8}, "blur_kernel_px"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"solarize_p_global": (0.1, 0.2, 0.3)}, "solarize_p_global"),
        ({"hed_shift": 1.5}, "hed_shift"),
    ],
)
def test_augment_config_errors_name_the_field(kwargs, field):
    with pytest.raises(DataConfigError, match=rf"AugmentConfig\.{field}="):
        AugmentConfig(**kwargs)
