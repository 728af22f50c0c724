"""pathdino.train config: presets, overrides, and the errors raised before any training starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pathdino.train.__main__ import main
from pathdino.train.config import config_changes, config_to_dict, crop_plan, load_config, per_process_batch
from pathdino.train.validate import validate_config
from tiling.configio import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
SMOKE = CONFIGS / "cpu_smoke.yaml"


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14", "vitg14", "cpu_smoke", "small"])
def test_presets_load_and_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate_config(cfg, world_size=1 if name == "cpu_smoke" else 8, check_stores=False)


def test_presets_carry_the_upstream_recipes():
    s, large, g = (load_config(CONFIGS / f"{n}.yaml") for n in ("vits14", "vitl14", "vitg14"))
    assert s.model.backbone.arch == "vit_small" and s.model.backbone.num_register_tokens == 4
    assert s.model.dino_head.n_prototypes == 65_536 and not s.model.ibot_separate_head
    assert (s.loss.targets, s.optim.layerwise_decay, s.optim.weight_decay_end) == ("centering", 0.9, 0.4)
    assert (s.optim.momentum_teacher, s.model.backbone.drop_path_rate, s.optim.base_lr) == (0.992, 0.3, 0.004)
    for big in (large, g):
        assert big.model.dino_head.n_prototypes == 131_072 and big.model.dino_head.bottleneck_dim == 384
        assert big.model.ibot_separate_head and big.model.ibot_head.n_prototypes == 131_072
        assert big.model.ibot_head.bottleneck_dim == 256  # upstream overrides only the DINO head's bottleneck
        assert (big.loss.targets, big.optim.layerwise_decay, big.optim.weight_decay_end) == ("sinkhorn", 1.0, 0.2)
        assert (big.optim.momentum_teacher, big.model.backbone.drop_path_rate) == (0.994, 0.4)
    assert g.model.backbone.ffn == "swiglu" and large.model.backbone.ffn == "swiglu"  # ffn_layer: swiglufused
    assert large.model.backbone.mlp_hidden_features == 2_736  # 2/3 x 4 x 1,024, rounded up to a multiple of 8
    # DINOv2's parameter-group mechanics in every preset
    for cfg in (s, large, g):
        assert cfg.model.dino_head.trainable_gain and cfg.optim.decay_tokens
        assert cfg.optim.freeze_last_layer == "zero_lr"
    # pathology augmentation defaults in every preset
    for cfg in (s, large, g):
        a = cfg.augment
        assert a.vflip_p == 0.5 and a.rot90 and a.hed_p == 0.5 and a.solarize_p_global == (0.0, 0.0)
        plan = crop_plan(cfg)
        assert (plan.n_global, plan.global_px, plan.n_local, plan.local_px) == (2, 224, 8, 98)


def test_small_preset_carries_the_measured_knobs():
    """The values docs/training.md "Small budgets" measured; changing one means re-measuring the curve there."""
    c = load_config(CONFIGS / "small.yaml")
    assert (c.model.dino_head.n_prototypes, c.model.backbone.layerscale_init, c.optim.base_lr) == (256, 0.1, 0.006)
    assert c.loss.uniformity_weight == 0.01  # with base_lr 0.006: holds its probe at 200 and 500 steps (issue 25)
    loss, optim = c.loss, c.optim
    assert (loss.teacher_temp, loss.teacher_temp_warmup_start, loss.teacher_temp_warmup_steps) == (0.04, 0.04, 0)
    assert (c.train.batch_size, c.train.total_steps) == (32, 100)
    assert (optim.warmup_fraction, optim.layerwise_decay) == (0.2, 1.0)  # 20% of any length, as measured
    assert optim.warmup_steps_in(100) == 20 and optim.warmup_steps_in(500) == 100
    assert (optim.momentum_teacher, optim.freeze_last_layer_steps, c.model.backbone.drop_path_rate) == (0.99, 0, 0.0)
    plan = crop_plan(c)
    assert (plan.n_global, plan.global_px, plan.n_local, plan.local_px) == (2, 112, 2, 56)


def test_overrides_apply_and_are_typed():
    cfg = load_config(
        SMOKE, ["optim.base_lr=2.0e-4", "train.batch_size=16", "data.stores=[/a,/b]", "model.backbone.depth=3"]
    )
    assert cfg.optim.base_lr == 2e-4 and cfg.train.batch_size == 16
    assert cfg.data.stores == ("/a", "/b") and cfg.model.backbone.depth == 3
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(SMOKE, ["train.batch_size=lots"])


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['base_learning_rate'\]"):
        load_config(SMOKE, ["optim.base_learning_rate=1e-3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\nschedule:\n  total: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['schedule'\]"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing section 'data'"):
        load_config(None, [])


def test_crop_sizes_must_be_multiples_of_the_patch():
    cfg = load_config(SMOKE, ["augment.local_crop_px=30"])
    with pytest.raises(ConfigError, match=r"augment.local_crop_px=30 is not divisible by .*patch_size=14.*28 or 42"):
        validate_config(cfg, check_stores=False)
    with pytest.raises(ConfigError, match=r"augment.global_crop_px=64 is not divisible by .*patch_size=14.*56 or 70"):
        load_config(SMOKE, ["augment.global_crop_px=64"])


def test_the_global_crop_size_has_one_key(tmp_path):
    """augment.global_crop_px is the backbone's img_size too; the presets no longer carry the duplicate; a config
    written before (both keys) still loads when they agree and fails naming both keys when they do not."""
    cfg = load_config(SMOKE, ["augment.global_crop_px=70"])
    assert cfg.model.backbone.img_size == crop_plan(cfg).global_px == 70
    for preset in CONFIGS.glob("*.yaml"):
        assert "img_size" not in yaml.safe_load(preset.read_text())["model"]["backbone"], preset.name
    old = tmp_path / "old.yaml"
    old.write_text(SMOKE.read_text().replace("    patch_size: 14\n", "    patch_size: 14\n    img_size: 56\n"))
    assert "img_size: 56" in old.read_text()
    assert load_config(old) == load_config(SMOKE)
    with pytest.raises(
        ConfigError,
        match=r"model.backbone.img_size=56 and augment.global_crop_px=70 disagree.*"
        r"remove model.backbone.img_size",
    ):
        load_config(old, ["augment.global_crop_px=70"])
    with pytest.raises(ConfigError, match=r"img_size=84 and augment.global_crop_px=56 disagree"):
        load_config(SMOKE, ["model.backbone.img_size=84"])


def test_batch_must_divide_over_processes_and_micro_steps():
    cfg = load_config(SMOKE, ["train.batch_size=10", "train.grad_accum_steps=2"])
    assert per_process_batch(cfg, 1) == 5
    with pytest.raises(ConfigError, match=r"batch_size=10 is not divisible by processes \(2\) x .*multiple of 4"):
        validate_config(cfg, world_size=2, check_stores=False)


def test_other_cross_checks():
    with pytest.raises(ConfigError, match="warmup_steps=100 exceeds train.total_steps=6"):
        validate_config(load_config(SMOKE, ["optim.warmup_steps=100"]), check_stores=False)
    with pytest.raises(ConfigError, match="ibot_head is only used with model.ibot_separate_head"):
        validate_config(load_config(SMOKE, ["model.ibot_head={n_prototypes: 64}"]), check_stores=False)
    with pytest.raises(ConfigError, match="stop_at_step=9 must be in"):
        validate_config(load_config(SMOKE, ["train.stop_at_step=9"]), check_stores=False)
    with pytest.raises(ConfigError, match="momentum_teacher=1.5"):
        validate_config(load_config(SMOKE, ["optim.momentum_teacher=1.5"]), check_stores=False)
    with pytest.raises(ConfigError, match="loss.uniformity: 'vicreg' is not one of"):
        load_config(SMOKE, ["loss.uniformity=vicreg"])


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.zarr"
    cfg = load_config(SMOKE, [f"data.stores=[{missing}]"])
    with pytest.raises(ConfigError, match=rf"data.stores: .*{missing.name}"):
        validate_config(cfg)
    # the command line reports it and exits 2 without a traceback
    assert main(["--config", str(SMOKE), "--check", f"data.stores=[{missing}]"]) == 2
    err = capsys.readouterr().err
    assert "pathdino.train: error: data.stores:" in err and "Traceback" not in err


def test_check_passes_on_a_real_store(tmp_path, capsys):
    from tiling.store import encode_tile
    from tiling.store_write import TileStoreWriter

    url = tmp_path / "store.zarr"
    sw = TileStoreWriter(url).begin_slide("s1", 64)
    rng = np.random.default_rng(0)
    tiles = [encode_tile(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    sw.add(tiles, np.zeros((4, 2), np.int64), np.ones(4, np.float32))
    sw.commit({"source_path": "x", "source_fingerprint": "x"})
    assert main(["--config", str(SMOKE), "--check", f"data.stores=[{url}]"]) == 0
    assert "valid" in capsys.readouterr().out
    # a 64-px store cannot feed 224-px global crops: named before training
    big = load_config(CONFIGS / "vits14.yaml", [f"data.stores=[{url}]"])
    with pytest.raises(ConfigError, match="data.stores: .*global_crop_px=224"):
        validate_config(big, world_size=8)


def test_config_changes_say_unset_for_a_section_one_side_lacks():
    """A resume's "config differs" line names what changed; a probe section set to null is "unset" on its keys,
    and a key added since at None (an older checkpoint) is no change."""
    saved = config_to_dict(load_config(SMOKE, ["eval.probe={data: probe/labels.csv, every_steps: 25}"]))
    now = config_to_dict(load_config(SMOKE, ["train.output_dir=elsewhere"]))
    changed = config_changes(saved, now)
    assert "eval.probe.data: 'probe/labels.csv' -> unset" in changed
    assert "eval.probe.every_steps: 25 -> unset" in changed
    assert not [c for c in changed if c.startswith(("eval.probe:", "train.output_dir"))]
    del saved["optim"]["warmup_fraction"]
    assert not [c for c in config_changes(saved, now) if "warmup_fraction" in c]
    assert config_changes(now, config_to_dict(load_config(SMOKE, ["optim.betas=[0.9,0.99]"]))) == [
        "optim.betas: [0.9, 0.999] -> [0.9, 0.99]"
    ]
