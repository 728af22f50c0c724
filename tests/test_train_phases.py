"""pathdino.train phases: a closing high-resolution phase completes, and resumes exactly across the switch.

The cpu_smoke preset (56/28-px crops) gets a 2-step phase at 112/42 px with half the batch, on a store of 128-px
tiles cut from the bundled slide.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pathdino.train.checkpoint import list_checkpoints
from pathdino.train.config import load_config
from pathdino.train.validate import validate_config
from pathdino.train.loop import train
from pathdino.models.pos_embed import resample_position_embeddings
from pathdino.train.phases import phase_at, phase_config
from tests.test_train_resume import SMOKE, assert_same_checkpoint, assert_same_run, make_tile_store, steps
from tiling.configio import ConfigError

PHASE = "train.phases=[{steps: 2, global_crop_px: 112, local_crop_px: 42, batch_size: 4}]"
POS = "backbone.backbone.pos_embed"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tile_store(tmp_path_factory.mktemp("store") / "tiles128.zarr", n_side=4, tile_px=128)


def smoke(out: Path, store: Path, *overrides: str):
    return load_config(
        SMOKE,
        [
            f"data.stores=[{store}]",
            f"train.output_dir={out}",
            "log.trackers=[]",
            "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=10",
            PHASE,
            *overrides,
        ],
    )


def test_phase_geometry_is_a_function_of_the_step(store):
    cfg = smoke(Path("unused"), store)
    assert [phase_at(cfg, s) for s in range(7)] == [0, 0, 0, 0, 1, 1, 1]
    high = phase_config(cfg, 1)
    assert (
        high.augment.global_crop_px,
        high.augment.local_crop_px,
        high.model.backbone.img_size,
        high.train.batch_size,
    ) == (112, 42, 112, 4)
    assert phase_config(cfg, 0) is cfg


def test_high_res_phase_completes_and_resumes_exactly_across_the_switch(tmp_path, store):
    ref = tmp_path / "ref"
    summary = train(smoke(ref, store))
    assert summary["done"] and summary["step"] == 6
    reference = steps(ref)
    events = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "phase"] == [4]
    assert reference[4]["lr"] != reference[5]["lr"]  # schedules continue (batch 8 -> 4 rescales the peak lr)
    ckpts = dict(list_checkpoints(ref))
    assert sorted(ckpts) == [2, 4, 6]
    # 56 px = 4 x 4 patches before the switch; 112 px = 8 x 8 after (registers: no CLS slot), student and teacher
    for name in ("student.safetensors", "teacher.safetensors"):
        assert load_file(ckpts[4] / name)[POS].shape == (1, 16, 64)
        assert load_file(ckpts[6] / name)[POS].shape == (1, 64, 64)
    state = json.loads((ckpts[6] / "trainer_state.json").read_text())
    assert state["phase"] == 1 and state["config"]["model"]["backbone"]["img_size"] == 112
    assert state["config"]["augment"]["global_crop_px"] == 112 and state["batch_size"] == 4
    # the position embedding's AdamW moments restart at the switch; the other parameters keep theirs
    optim = torch.load(ckpts[6] / "optimizer.pt", weights_only=True)["state"]
    assert optim[POS]["exp_avg"].shape == (1, 64, 64) and float(optim[POS]["step"]) == 2
    assert float(optim["backbone.backbone.cls_token"]["step"]) == 6

    # resume from before the switch (step 2), from the switch checkpoint (4), and from inside the phase (5)
    for resume_step, stop in ((2, None), (4, None), (5, 5)):
        run = tmp_path / f"resume{resume_step}"
        if stop:
            train(smoke(run, store, f"train.stop_at_step={stop}"))
        else:
            train(smoke(run, store, f"train.stop_at_step={resume_step}"))
        summary = train(smoke(run, store), resume=str(run / "checkpoints" / f"step_{resume_step:09d}"))
        assert summary["done"] and summary["step"] == 6
        assert_same_run(reference, steps(run))
        assert_same_checkpoint(ckpts[6], run / "checkpoints" / "step_000000006")


def test_phase_errors_name_the_key_and_the_fix(tmp_path, store):
    cfg = smoke(tmp_path, store, "train.phases=[{steps: 2, global_crop_px: 150}]")
    with pytest.raises(ConfigError, match=r"train\.phases\[0\]\.global_crop_px=150.*multiple.*14"):
        validate_config(cfg)
    cfg = smoke(tmp_path, store, "train.phases=[{steps: 6, global_crop_px: 112}]")
    with pytest.raises(ConfigError, match=r"cover 6 steps but train\.total_steps=6"):
        validate_config(cfg)
    cfg = smoke(tmp_path, store, "train.phases=[{steps: 2, global_crop_px: 112, batch_size: 3}]")
    with pytest.raises(ConfigError, match=r"train\.phases\[0\].*batch_size=3"):
        validate_config(cfg, world_size=2)
    # crops larger than the store's tiles: the error says to tile a store at that size
    cfg = smoke(tmp_path, store, "train.phases=[{steps: 2, global_crop_px: 224}]")
    with pytest.raises(ConfigError, match=r"train\.phases\[0\] crops 224.*128-px tiles.*tile_px >= 224"):
        validate_config(cfg)


def test_position_embedding_resampling_keeps_prefix_slots():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1).repeat(1, 1, 3)
    with_cls = torch.cat([torch.full((1, 1, 3), -5.0), grid], dim=1)
    state = {"a.pos_embed": with_cls.clone(), "b.pos_embed": grid.clone(), "c.weight": torch.zeros(2)}
    changed = resample_position_embeddings(
        state,
        {"a.pos_embed": torch.Size([1, 65, 3]), "b.pos_embed": torch.Size([1, 64, 3]), "c.weight": torch.Size([3])},
    )
    assert changed == ["a.pos_embed", "b.pos_embed"]
    assert state["a.pos_embed"].shape == (1, 65, 3) and torch.all(state["a.pos_embed"][:, 0] == -5.0)
    assert state["b.pos_embed"].shape == (1, 64, 3)
    assert torch.allclose(state["a.pos_embed"][:, 1:], state["b.pos_embed"])
    assert state["c.weight"].shape == (2,)  # not a position embedding: left for the shape check
