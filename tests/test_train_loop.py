"""pathdino.train loop options in one process: gradient accumulation, objective variants, preemption signals."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from pathdino.train.checkpoint import list_checkpoints
from pathdino.train.config import crop_plan, load_config
from tiling.configio import ConfigError
from pathdino.train.loop import train
from pathdino.train.synthetic import SyntheticLoader

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu_smoke.yaml"


def smoke(out: Path, *overrides: str):
    return load_config(
        SMOKE,
        ["train.synthetic_data=true", f"train.output_dir={out}", "log.trackers=[]", "log.every_steps=1", *overrides],
    )


def losses(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_gradient_accumulation_runs_micro_steps(tmp_path):
    out = tmp_path / "accum"
    train(smoke(out, "train.grad_accum_steps=2", "train.total_steps=3", "optim.warmup_steps=1"))
    records = losses(out)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    state = json.loads((list_checkpoints(out)[-1][1] / "trainer_state.json").read_text())
    assert state["loader_states"][0]["next_sample"] == 24  # 3 steps x 2 micro-batches x 4 tiles
    assert records[0]["masked_tokens"] > 0


def test_separate_ibot_head_sinkhorn_and_kde(tmp_path):
    out = tmp_path / "variants"
    cfg = smoke(
        out,
        "model.ibot_separate_head=true",
        "model.ibot_head={n_prototypes: 128, bottleneck_dim: 16}",
        "loss.targets=sinkhorn",
        "loss.uniformity=kde",
        "loss.uniformity_weight=0.05",
        "train.total_steps=2",
        "optim.warmup_steps=1",
    )
    train(cfg)
    records = losses(out)
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "ibot", "uniformity", "grad_norm_ibot_head"))
    assert records[0]["uniformity"] <= 0.0  # KDE is minus an entropy estimate
    # Sinkhorn targets use no center: it stays at zero
    assert records[-1]["center_norm_dino"] == 0.0 and records[-1]["center_norm_ibot"] == 0.0


class SignalLoader(SyntheticLoader):
    """Sends this process SIGTERM (as a cluster scheduler would) while producing batch ``at``."""

    def __init__(self, at: int, plan, **kwargs):
        super().__init__(plan, **kwargs)
        self.at = at

    def make_batch(self, index):
        if index == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().make_batch(index)


def test_sigterm_finishes_the_step_checkpoints_and_stops(tmp_path):
    out = tmp_path / "preempted"
    cfg = smoke(out, "train.checkpoint_every_steps=100")
    loader = SignalLoader(2, crop_plan(cfg), patch_size=14, batch_size=8)
    previous = signal.getsignal(signal.SIGTERM)
    summary = train(cfg, loader=loader)
    assert summary["stopped_early"] and summary["step"] == 3 and not summary["done"]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    # and the run continues from there
    summary = train(smoke(out, "train.checkpoint_every_steps=100"), resume=True)
    assert summary["done"] and [r["step"] for r in losses(out)] == [1, 2, 3, 4, 5, 6]


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    """train.precision=bf16 (every real preset's default) on CPU autocast: losses close to fp32 but not equal
    (autocast really engaged), finite steps, fp32 weights in the checkpoint."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(smoke(fp32, "train.total_steps=2", "optim.warmup_steps=1", "model.backbone.drop_path_rate=0.0"))
    train(
        smoke(
            bf16,
            "train.total_steps=2",
            "optim.warmup_steps=1",
            "model.backbone.drop_path_rate=0.0",
            "train.precision=bf16",
        )
    )
    a, b = losses(fp32), losses(bf16)
    assert not any(r["skipped"] for r in b)
    for key in ("dino_global", "ibot"):
        assert a[0][key] != b[0][key]
        assert abs(a[0][key] - b[0][key]) <= 0.05 * abs(a[0][key]), key
    from safetensors.torch import load_file

    weights = load_file(list_checkpoints(bf16)[-1][1] / "student.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_compiled_blocks_train_like_eager(tmp_path):
    """train.compile=true: each ViT block compiled in place; same losses as eager to float tolerance."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("train.total_steps=2", "optim.warmup_steps=1", "model.backbone.drop_path_rate=0.0")
    train(smoke(eager, *common))
    train(smoke(compiled, *common, "train.compile=true"))
    a, b = losses(eager), losses(compiled)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("loss", "dino_global", "ibot", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-4 * max(1.0, abs(ra[key])), (ra["step"], key)


def test_compile_without_a_compiler_is_a_config_error_before_training(tmp_path, monkeypatch):
    """No C/C++ compiler: train.compile=true fails up front, naming the flag, not inside the first step."""
    import pathdino.train.host as host

    monkeypatch.setattr(host.shutil, "which", lambda name: "/usr/bin/mycc" if name == "mycc" else None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(ConfigError, match=r"train\.compile=true.*set train\.compile=false"):
        train(smoke(tmp_path / "run", "train.total_steps=2", "optim.warmup_steps=1", "train.compile=true"))
    assert not list((tmp_path / "run").glob("checkpoints/*"))
    monkeypatch.setenv("CXX", "mycc -O2")  # a compiler named by $CXX (with flags) counts
    host.check_compiler()


def test_small_preset_runs_and_logs_teacher_entropy(tmp_path):
    """configs/train/small.yaml as shipped (only data, batch and length shrunk) trains: finite losses, and the
    teacher-entropy health metric that docs/training.md's small-budget curve is read from is logged."""
    small = SMOKE.parent / "small.yaml"
    out = tmp_path / "small"
    train(
        load_config(
            small,
            [
                "train.synthetic_data=true",
                f"train.output_dir={out}",
                "log.trackers=[]",
                "log.every_steps=1",
                "train.batch_size=4",
                "train.total_steps=2",
            ],
        )
    )
    records = losses(out)
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    n_prototypes = load_config(small).model.dino_head.n_prototypes
    assert all(0 < r["teacher_entropy"] <= math.log(n_prototypes) + 1e-4 for r in records)


def test_cpu_runtime_tuning_is_switched_on_and_undone():
    """train.cpu_flush_denormal / cpu_reuse_freed_memory: denormals flush to zero while on, not after restore."""
    from pathdino.train.host import tune_cpu_runtime

    tiny = torch.tensor([1e-39])  # denormal in fp32; one element, so the op runs on this thread
    restore = tune_cpu_runtime(torch.device("cpu"), flush_denormal=True, reuse_freed_memory=True)
    try:
        if not torch.set_flush_denormal(True):  # CPU without FTZ/DAZ: nothing to check
            return
        assert float(tiny * 1.0) == 0.0
    finally:
        restore()
    assert float(tiny * 1.0) > 0.0
    assert tune_cpu_runtime(torch.device("cpu"), False, False) is not None  # nothing switched, still callable


def test_a_run_that_fails_to_start_leaves_the_cpu_settings_as_they_were(tmp_path):
    """open_context switches FTZ on before the models are built; a config error after that must switch it off again."""
    tiny = torch.tensor([1e-39])  # denormal in fp32
    if float(tiny * 1.0) == 0.0:  # FTZ already on in this process (or no denormals at all): nothing to check
        return
    cfg = smoke(tmp_path / "bad", "train.total_steps=4", "train.phases=[{steps: 2, global_crop_px: 56}]")
    with pytest.raises(ConfigError, match="for_phase"):
        train(cfg, loader=SyntheticLoader.__new__(SyntheticLoader))  # a loader without for_phase: refused at the start
    assert float(tiny * 1.0) > 0.0
