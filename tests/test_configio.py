"""One config idiom: every config (tiling, data, models, train) raises tiling.configio.ConfigError naming the key;
YAML + key=value overrides + typed flags are merged by one function."""

from __future__ import annotations

import pytest

from pathdino.data import AugmentConfig, DataConfig, DataConfigError
from pathdino.models import BackboneConfig
from pathdino.train.config import RunConfig, TrainConfig
from tiling.config import TilingConfig
from tiling.configio import ConfigError, apply_overrides, load_config


@pytest.mark.parametrize(
    "make",
    [
        lambda: TilingConfig(tile_px=4),
        lambda: DataConfig(stores=()),
        lambda: AugmentConfig(hflip_p=2.0),
        lambda: BackboneConfig(arch="nope"),
        lambda: TrainConfig(total_steps=0),
    ],
)
def test_every_config_raises_the_one_config_error(make):
    with pytest.raises(ConfigError) as info:
        make()
    assert isinstance(info.value, ValueError)  # old `except ValueError` callers keep working


def test_data_config_error_is_the_common_error():
    assert DataConfigError is ConfigError
    with pytest.raises(DataConfigError, match=r"DataConfig\.num_workers=-1 is invalid") as info:
        DataConfig(stores=("a",), num_workers=-1)
    assert info.value.key == "DataConfig.num_workers"


def test_section_checks_say_where_they_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {stores: [a]}\ntrain: {total_steps: 0}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml\.train: train\.total_steps=0 must be positive") as info:
        load_config(RunConfig, path)
    assert info.value.key == "train.total_steps"
    with pytest.raises(ConfigError, match=r"missing section 'data' \(the tile stores to train on\)"):
        load_config(RunConfig, None, ["train.total_steps=5"])


def test_overrides_then_typed_flags_on_top_of_yaml(tmp_path):
    path = tmp_path / "tiling.yaml"
    path.write_text("tile_px: 512\ntarget_mpp: 1.0\ntissue: {min_tissue_fraction: 0.5}\n")
    cfg = load_config(
        TilingConfig,
        path,
        ["tile_px=256", "tissue.min_tissue_fraction=0.2"],
        values={"tile_px": 128, "target_mpp": None, "tissue.min_tissue_fraction": 0.3},
    )
    assert (cfg.tile_px, cfg.target_mpp, cfg.tissue.min_tissue_fraction) == (128, 1.0, 0.3)
    with pytest.raises(ConfigError, match="'tile_px' is not a section"):
        apply_overrides({"tile_px": 224}, ["tile_px.x=1"])
    with pytest.raises(ConfigError, match=r"TilingConfig: overlap_px must be in \[0, tile_px\)"):
        load_config(TilingConfig, None, values={"overlap_px": 300})
