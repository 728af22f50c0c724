"""pathdino.train in one process: exact resume, checkpoint layout and safety, the NaN/inf guard.

Runs use the real tile-store loader (``pathdino.data``) on a 64-tile store cut from the bundled slide, except the
NaN test, which injects non-finite pixels through the synthetic loader.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pathdino.train.checkpoint import latest_checkpoint, list_checkpoints, rng_state, set_rng_state
from pathdino.train.config import crop_plan, load_config
from pathdino.train.health import NonFiniteError
from pathdino.train.loop import LOSS_TERMS, train
from pathdino.train.synthetic import SyntheticLoader
from tiling.configio import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "cpu_smoke.yaml"
SLIDE = ROOT / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


def make_tile_store(url: Path, n_side: int = 8, tile_px: int = 64) -> Path:
    """A tiny JPEG tile store of real H&E pixels: an n_side x n_side grid of tiles from the bundled slide."""
    import tiffslide

    from tiling.store import encode_tile
    from tiling.store_write import TileStoreWriter

    with tiffslide.TiffSlide(SLIDE) as slide:
        side = n_side * tile_px
        region = np.asarray(slide.read_region((600, 900), 0, (side, side)).convert("RGB"))
    sw = TileStoreWriter(url).begin_slide("cmu1", tile_px, encoding="jpeg", tiles_per_shard=32)
    tiles, xy = [], []
    for i in range(n_side):
        for j in range(n_side):
            tile = region[i * tile_px : (i + 1) * tile_px, j * tile_px : (j + 1) * tile_px]
            tiles.append(encode_tile(np.ascontiguousarray(tile)))
            xy.append((600 + j * tile_px, 900 + i * tile_px))
    sw.add(tiles, np.array(xy, dtype=np.int64), np.ones(len(tiles), np.float32))
    sw.commit({"source_path": str(SLIDE), "source_fingerprint": "test"})
    return url


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tile_store(tmp_path_factory.mktemp("store") / "tiles.zarr")


def smoke(out: Path, store: Path | None, *overrides: str):
    data = [f"data.stores=[{store}]"] if store else ["train.synthetic_data=true"]
    return load_config(
        SMOKE,
        [
            *data,
            f"train.output_dir={out}",
            "log.trackers=[]",
            "train.checkpoint_every_steps=2",
            "train.keep_checkpoints=5",
            *overrides,
        ],
    )


def steps(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "event" not in r}
    assert len(by_step) == len([r for r in records if "event" not in r]), "a step was logged twice"
    return by_step


def assert_same_run(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in (*LOSS_TERMS, "grad_norm", "lr", "teacher_temp", "skipped"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("student.safetensors", "teacher.safetensors", "losses.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for name in oa["state"]:
        for key, value in oa["state"][name].items():
            assert torch.equal(value, ob["state"][name][key]), (name, key)


class CrashingLoader:
    """The real loader, raising (as a killed job would stop) when batch ``crash_at`` is requested."""

    def __init__(self, inner, crash_at: int):
        self.inner, self.crash_at = inner, crash_at
        self.samples_per_epoch = inner.samples_per_epoch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.crash_at:
                raise KeyboardInterrupt("simulated interruption")
            yield batch


def test_interrupted_and_resumed_runs_reproduce_the_uninterrupted_run(tmp_path, store):
    from pathdino.data import build_train_loader

    ref = tmp_path / "ref"
    summary = train(smoke(ref, store))
    assert summary["done"] and summary["step"] == 6 and (ref / "done.json").is_file()
    reference = steps(ref)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # crash while fetching step 5's batch: checkpoints at 2 and 4 exist, resume picks 4
    run = tmp_path / "crash"
    cfg = smoke(run, store)
    inner = build_train_loader(
        cfg.data, cfg.augment, cfg.masks, patch_size=14, batch_size_per_process=8, rank=0, world_size=1, seed=0
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, loader=CrashingLoader(inner, crash_at=4))
    assert [s for s, _ in list_checkpoints(run)] == [2, 4] and not (run / "done.json").exists()
    summary = train(smoke(run, store), resume=True)
    assert summary["done"] and summary["step"] == 6
    assert_same_run(reference, steps(run))
    assert_same_checkpoint(ref / "checkpoints" / "step_000000006", run / "checkpoints" / "step_000000006")

    # stop at step 3, then resume from the OLDER checkpoint 2: the log is cut back to step 2 and rebuilt
    run = tmp_path / "stop"
    summary = train(smoke(run, store, "train.stop_at_step=3"))
    assert summary["step"] == 3 and not summary["done"] and (run / "checkpoints" / "step_000000003").is_dir()
    train(smoke(run, store), resume=str(run / "checkpoints" / "step_000000002"))
    assert_same_run(reference, steps(run))
    assert_same_checkpoint(ref / "checkpoints" / "step_000000006", run / "checkpoints" / "step_000000006")


def test_checkpoint_layout_atomicity_and_pruning(tmp_path, store):
    out = tmp_path / "run"
    train(smoke(out, store, "train.keep_checkpoints=2", "train.checkpoint_every_steps=1"))
    assert [s for s, _ in list_checkpoints(out)] == [5, 6]  # only the newest 2 kept
    ckpt = latest_checkpoint(out)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "losses.safetensors",
        "optimizer.pt",
        "rng_rank0.pt",
        "student.safetensors",
        "teacher.safetensors",
        "trainer_state.json",
    ]
    # nothing pickled: every non-safetensors file loads with weights_only=True
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert "backbone.backbone.blocks.0.attn.qkv.weight" in optim["state"]  # keyed by parameter name
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in rng.values())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and state["config"]["train"]["batch_size"] == 8
    assert state["loader_states"][0]["batch_in_epoch"] is not None  # the data position (pathdino.data format)
    student = load_file(ckpt / "student.safetensors")
    assert "backbone.mask_token" in student and "dino_head.last_layer.weight" in student
    assert (out / "config.yaml").is_file()

    # a half-written checkpoint (temporary name, or a step folder without its state file) is never picked
    (out / "checkpoints" / ".tmp-step_000000009").mkdir()
    (out / "checkpoints" / "step_000000010").mkdir()
    assert latest_checkpoint(out) == ckpt
    # refusing to silently start over in a directory that holds a run
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(smoke(out, store))


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


class NaNLoader(SyntheticLoader):
    """Synthetic batches whose global crops are NaN for the listed batch indices."""

    def __init__(self, bad: set[int], plan, **kwargs):
        super().__init__(plan, **kwargs)
        self.bad = bad

    def make_batch(self, index):
        batch = super().make_batch(index)
        if index in self.bad:
            batch.global_crops[0, 0, 0, 0] = float("nan")
        return batch


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    out = tmp_path / "nan"
    cfg = smoke(out, None, "train.total_steps=8", "train.max_nonfinite_steps=3", "train.checkpoint_every_steps=3")
    loader = NaNLoader({1, 3, 4, 5}, crop_plan(cfg), patch_size=14, batch_size=8)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps.*step_000000003.*intact") as err:
        train(cfg, loader=loader)
    assert "stopping at step 6" in str(err.value)
    log = steps(out)
    assert [log[s]["skipped"] for s in range(1, 7)] == [False, True, False, True, True, True]
    assert log[2]["nonfinite_total"] == 1 and log[6]["nonfinite_total"] == 4
    # the last good checkpoint is intact and nothing was written after the bad steps
    assert [s for s, _ in list_checkpoints(out)] == [3]
    ckpt = out / "checkpoints" / "step_000000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["nonfinite_total"] == 1
    weights = load_file(ckpt / "student.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the skipped step 2 updated nothing: AdamW took steps 1 and 3 (the frozen last layer too, at lr 0, as DINOv2)
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optim["state"].values()} == {2}
    assert not (out / "done.json").exists()


def test_exact_resume_with_two_data_workers(tmp_path, store):
    """data.num_workers=2 (DataLoader worker processes, each reading its own windows): stop after step 2 and
    resume, and the losses and final checkpoint equal the uninterrupted run's."""
    workers = ("data.num_workers=2", "train.total_steps=4")
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(smoke(ref, store, *workers))
    train(smoke(run, store, *workers, "train.stop_at_step=2"))
    train(smoke(run, store, *workers), resume=True)
    reference = steps(ref)
    assert sorted(reference) == [1, 2, 3, 4]
    assert_same_run(reference, steps(run))
    assert_same_checkpoint(ref / "checkpoints" / "step_000000004", run / "checkpoints" / "step_000000004")
