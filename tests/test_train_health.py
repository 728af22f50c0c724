"""pathdino.train health: collapse warnings, the non-finite guard, entropy/rank statistics, MFU arithmetic,
trackers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from pathdino.train import health
from pathdino.train.health import (
    CollapseMonitor,
    NonFiniteError,
    NonFiniteGuard,
    Throughput,
    effective_rank,
    entropy,
    peak_tflops,
)

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu_smoke.yaml"


@pytest.fixture
def train_log(caplog, monkeypatch):
    """caplog for the trainer's logger even after an in-process run of an earlier test set up the trainer's logging
    (which stops "pathdino" records from reaching the root logger, where caplog listens)."""
    monkeypatch.setattr(logging.getLogger("pathdino"), "propagate", True)
    return caplog


def test_entropy_and_effective_rank():
    k = 16
    assert entropy(torch.full((3, k), 1.0 / k)).item() == pytest.approx(math.log(k))
    assert entropy(torch.eye(k)[:3]).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    spread = torch.randn(256, 32)
    collapsed = torch.randn(1, 32).repeat(256, 1) + 1e-4 * torch.randn(256, 32)
    assert effective_rank(spread) > 20 and effective_rank(collapsed) < 1.1
    assert math.isnan(effective_rank(torch.randn(1, 8)))


def test_collapse_monitor_warns_on_falling_rank_or_usage(train_log):
    caplog = train_log
    mon = CollapseMonitor(after_steps=10, drop_fraction=0.5, n_prototypes=1024)
    healthy = {"embedding_rank": 40.0, "teacher_usage_entropy": 5.0, "teacher_entropy": 2.0}
    assert not mon.check(5, healthy) and not mon.check(10, healthy)
    assert not mon.check(5, {**healthy, "embedding_rank": 5.0})  # too early to warn
    with caplog.at_level("WARNING", logger="pathdino.train"):
        assert mon.check(20, {**healthy, "embedding_rank": 15.0})
        assert mon.check(30, {**healthy, "teacher_usage_entropy": 1.0})
        assert mon.check(40, {**healthy, "teacher_entropy": 0.99 * math.log(1024)})  # uniform teacher
    assert "possible collapse" in caplog.text and "embedding_rank" in caplog.text and mon.warnings == 3


def test_collapse_monitor_lets_the_rank_dip_before_warnings_start(train_log):
    """An untrained network's rank is not a level the run reached by learning: a dip before after_steps (16 -> 7.5
    on the small preset with KoLeo 0.01, while the probe rose) is no collapse; a fall after it is. The usage
    entropy still counts from the first step, so a collapse onto few prototypes early is seen."""
    caplog = train_log
    mon = CollapseMonitor(after_steps=100, drop_fraction=0.5, n_prototypes=256)
    healthy = {"teacher_usage_entropy": 5.0, "teacher_entropy": 3.0}
    with caplog.at_level("WARNING", logger="pathdino.train"):
        for step, rank in [(10, 16.8), (50, 9.0), (100, 7.5), (150, 8.0), (200, 12.0)]:
            assert not mon.check(step, {**healthy, "embedding_rank": rank}), step
        assert mon.best["embedding_rank"] == 12.0
        assert mon.check(300, {**healthy, "embedding_rank": 5.9})  # below half of what was reached after step 100
        early = CollapseMonitor(after_steps=100, drop_fraction=0.5, n_prototypes=256)
        assert not early.check(10, {**healthy, "embedding_rank": 16.8})
        assert early.check(100, {**healthy, "teacher_usage_entropy": 2.0, "embedding_rank": 7.5})
    assert "teacher_usage_entropy 2 fell below 0.5 x its best 5" in caplog.text
    assert "embedding_rank 5.9 fell below 0.5 x its best 12" in caplog.text


def test_probe_monitor_keeps_the_best_and_warns_when_the_probe_falls_well_below_it(train_log):
    caplog = train_log
    from pathdino.train.health import ProbeMonitor

    mon = ProbeMonitor("probe_knn_accuracy", drop_warning=0.05)
    assert not mon.check(3, {"loss": 1.0})  # not a probe step
    assert mon.check(0, {"probe_knn_accuracy": 0.55})  # the initial teacher is the first best
    assert mon.check(25, {"probe_knn_accuracy": 0.65})
    assert not mon.check(50, {"probe_knn_accuracy": 0.65})  # a tie is not a new best
    with caplog.at_level("WARNING", logger="pathdino.train"):
        assert not mon.check(75, {"probe_knn_accuracy": 0.61})  # within the threshold: no warning
        assert mon.warnings == 0 and not caplog.text
        assert not mon.check(100, {"probe_knn_accuracy": 0.59})  # 0.06 below the best
    assert mon.warnings == 1 and "probe fell" in caplog.text and "best 0.650 (step 25)" in caplog.text
    assert mon.state() == {"metric": "probe_knn_accuracy", "value": 0.65, "step": 25}
    resumed = ProbeMonitor("probe_knn_accuracy", drop_warning=0.05)
    resumed.load(mon.state())
    assert not resumed.check(125, {"probe_knn_accuracy": 0.62}) and resumed.best_step == 25
    other = ProbeMonitor("probe_linear_accuracy", drop_warning=0.05)
    other.load(mon.state())  # another metric's best does not carry over
    assert other.best is None


def test_nonfinite_guard_counts_and_stops():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.update(False, 1, None)
    guard.update(True, 2, "ckpt/step_2")
    guard.update(False, 3, "ckpt/step_2")
    assert guard.total == 2 and guard.consecutive == 1
    with pytest.raises(NonFiniteError, match="stopping at step 4: 2 consecutive.*ckpt/step_2.*intact"):
        guard.update(False, 4, "ckpt/step_2")


def test_throughput_and_mfu_arithmetic(monkeypatch):
    clock = iter([100.0, 110.0, 110.0])  # reset, summary, reset
    monkeypatch.setattr(health.time, "perf_counter", lambda: next(clock))
    meter = Throughput(images_per_step=64, flops_per_image=2e12, peak_tflops_total=100.0)
    meter.add_data_wait(2.5)
    for _ in range(5):
        meter.step_done()
    out = meter.summary()
    assert out["images_per_s"] == pytest.approx(32.0) and out["data_wait_share"] == pytest.approx(0.25)
    assert out["tflops_per_s"] == pytest.approx(64.0) and out["mfu"] == pytest.approx(0.64)


def test_peak_flops_table():
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    assert peak_tflops(torch.device("cpu"), "bf16", override=1.5) == 1.5
    names = [name for name, _ in health.PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the specific name must win


def test_tensorboard_tracker_and_jsonl_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from pathdino.train.config import load_config
    from pathdino.train.loop import train

    out = tmp_path / "tb"
    cfg = load_config(
        SMOKE,
        [
            "train.synthetic_data=true",
            f"train.output_dir={out}",
            "train.total_steps=2",
            "optim.warmup_steps=1",
            "log.every_steps=1",
            "log.trackers=[tensorboard]",
        ],
    )
    train(cfg)
    assert list(out.glob("pathdino/**/events.out.tfevents.*")), "no TensorBoard event file"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r.get("step") == 2 and "loss" in r)
    for key in (
        "loss",
        "dino_global",
        "dino_local",
        "ibot",
        "uniformity",
        "lr",
        "weight_decay",
        "momentum",
        "teacher_temp",
        "grad_norm",
        "teacher_entropy",
        "teacher_usage_entropy",
        "student_entropy",
        "embedding_rank",
        "center_norm_dino",
        "center_norm_ibot",
        "images_per_s",
        "data_wait_share",
        "tflops_per_s",
        "memory_mb",
        "nonfinite_total",
        "collapse_warning",
    ):
        assert key in step, key
    assert "mfu" not in step  # no known peak on a CPU unless log.peak_tflops is set


def _collapse_flags(out: Path, *overrides: str) -> dict[int, bool]:
    from pathdino.train.config import load_config
    from pathdino.train.loop import train

    train(
        load_config(
            SMOKE,
            [
                "train.synthetic_data=true",
                f"train.output_dir={out}",
                "log.trackers=[]",
                "log.every_steps=1",
                *overrides,
            ],
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["collapse_warning"] for r in records if "loss" in r}


def test_smoke_run_does_not_warn_of_collapse_but_a_run_past_the_threshold_does(tmp_path):
    """The smoke preset (`pathdino demo`'s 6 steps) ends before collapse warnings start; the same figures past
    log.collapse_after_steps warn (a tiny ViT on noise halves its prototype usage within a few steps)."""
    smoke = _collapse_flags(tmp_path / "smoke")
    assert sorted(smoke) == [1, 2, 3, 4, 5, 6] and not any(smoke.values())
    real = _collapse_flags(tmp_path / "real", "log.collapse_after_steps=2")
    assert any(real.values()), real
