"""Tiling configs: the shipped YAML equals the documented defaults; flags override; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathdino.cli.tile import build_config
from tiling.config import TilingConfig
from tiling.configio import ConfigError, from_dict, load_yaml

CONFIGS = Path(__file__).parents[1] / "configs" / "tiling"


def test_default_yaml_is_the_dataclass_defaults():
    assert from_dict(TilingConfig, load_yaml(CONFIGS / "default.yaml")) == TilingConfig()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    from_dict(TilingConfig, load_yaml(path), str(path))


def test_flags_override_yaml_and_nested_sections(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tile_px: 256\ntissue:\n  min_tissue_fraction: 0.5\n")
    cfg = build_config(cfg_file, {"tile_px": 128, "tissue.min_tissue_fraction": None, "workers": 3})
    assert cfg.tile_px == 128 and cfg.tissue.min_tissue_fraction == 0.5 and cfg.workers == 3


def test_unknown_and_invalid_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile_size: 224\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tile_size'\]"):
        build_config(bad, {})
    bad.write_text("tissue:\n  saturation_treshold: 3\n")
    with pytest.raises(ConfigError, match="tissue"):
        build_config(bad, {})
    bad.write_text("overlap_px: 300\n")
    with pytest.raises(ConfigError, match="overlap_px"):
        build_config(bad, {})
    bad.write_text("encoding: webp\n")
    with pytest.raises(ConfigError, match="encoding"):
        build_config(bad, {})


def test_params_key_ignores_run_only_settings():
    assert TilingConfig(workers=1).params_key() == TilingConfig(workers=8, qc_images=False).params_key()
    assert TilingConfig().params_key() != TilingConfig(tile_px=256).params_key()


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("target_mpp: 5e-1\n")  # YAML 1.1 reads this as a string
    assert build_config(cfg_file, {}).target_mpp == 0.5
    cfg_file.write_text("target_mpp: half\n")
    with pytest.raises(ConfigError, match="expected a number"):
        build_config(cfg_file, {})
