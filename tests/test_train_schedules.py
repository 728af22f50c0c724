"""pathdino.train schedules: shapes, endpoints and the lr scaling rule, all in optimizer steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pathdino.train.config import load_config
from pathdino.train.run import build_schedules
from pathdino.train.schedules import Schedules, cosine, linear, scaled_lr, warmup_cosine
from tiling.configio import ConfigError

SMALL = Path(__file__).resolve().parents[1] / "configs" / "train" / "small.yaml"


def test_cosine_and_linear_endpoints_and_midpoints():
    assert cosine(0, 0.04, 0.4, n_steps=100) == pytest.approx(0.04)
    assert cosine(50, 0.04, 0.4, n_steps=100) == pytest.approx(0.22)  # half-way on a half cosine = the mean
    assert cosine(100, 0.04, 0.4, n_steps=100) == 0.4 and cosine(10**6, 0.04, 0.4, n_steps=100) == 0.4
    assert cosine(0, 1.0, 0.0, n_steps=0) == 0.0  # zero-length schedule is at its end
    assert linear(0, 0.04, 0.07, n_steps=30) == 0.04
    assert linear(15, 0.04, 0.07, n_steps=30) == pytest.approx(0.055)
    assert linear(30, 0.04, 0.07, n_steps=30) == 0.07 and linear(31, 0.04, 0.07, n_steps=30) == 0.07


def test_warmup_then_cosine_lr():
    peak, final, total, warm = 1e-3, 1e-6, 1000, 100
    assert warmup_cosine(0, peak, final, total_steps=total, warmup_steps=warm) == 0.0
    assert warmup_cosine(50, peak, final, total_steps=total, warmup_steps=warm) == pytest.approx(peak / 2)
    assert warmup_cosine(100, peak, final, total_steps=total, warmup_steps=warm) == pytest.approx(peak)
    assert warmup_cosine(550, peak, final, total_steps=total, warmup_steps=warm) == pytest.approx((peak + final) / 2)
    assert warmup_cosine(1000, peak, final, total_steps=total, warmup_steps=warm) == pytest.approx(final)
    values = [warmup_cosine(s, peak, final, total_steps=total, warmup_steps=warm) for s in range(total)]
    assert values.index(max(values)) == warm  # rises to the peak at the end of warm-up, then only falls
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1 :]))


def test_lr_scaling_rules():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)  # DINOv2 sqrt_wrt_1024
    assert scaled_lr(2e-4, 3072) == pytest.approx(2e-4 * math.sqrt(3))
    assert scaled_lr(0.004, 256, "linear") == pytest.approx(0.001)
    assert scaled_lr(0.004, 256, "none") == 0.004
    with pytest.raises(ValueError, match="lr scaling rule"):
        scaled_lr(0.004, 256, "cube")


def test_schedules_at_step():
    s = Schedules(
        total_steps=1000,
        peak_lr=1e-3,
        min_lr=1e-6,
        warmup_steps=100,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.992,
        momentum_teacher_end=1.0,
        teacher_temp=0.07,
        teacher_temp_warmup_start=0.04,
        teacher_temp_warmup_steps=300,
        freeze_last_layer_steps=50,
    )
    first, last = s.at(0), s.at(999)
    assert first.lr == 0.0 and first.weight_decay == pytest.approx(0.04) and first.momentum == pytest.approx(0.992)
    assert first.teacher_temp == pytest.approx(0.04) and first.last_layer_frozen
    assert s.at(49).last_layer_frozen and not s.at(50).last_layer_frozen
    assert s.at(150).teacher_temp == pytest.approx(0.055) and s.at(300).teacher_temp == pytest.approx(0.07)
    assert s.at(700).teacher_temp == pytest.approx(0.07)
    assert last.weight_decay == pytest.approx(0.4, abs=1e-5) and last.momentum == pytest.approx(1.0, abs=1e-5)
    assert last.lr == pytest.approx(1e-6, abs=1e-8)
    momenta = [s.at(i).momentum for i in range(0, 1000, 10)]
    assert all(a <= b for a, b in zip(momenta, momenta[1:]))


@pytest.mark.parametrize(("total_steps", "warmup_steps"), [(100, 20), (200, 40), (500, 100), (7, 1)])
def test_warmup_fraction_stretches_with_the_run(total_steps, warmup_steps):
    """optim.warmup_fraction is a share of train.total_steps: the lr peaks at that step whatever the run length."""
    cfg = load_config(SMALL, [f"train.total_steps={total_steps}", "optim.warmup_fraction=0.2"])
    schedules = build_schedules(cfg)
    lrs = [schedules.at(step).lr for step in range(total_steps)]
    assert lrs.index(max(lrs)) == warmup_steps
    assert all(a < b for a, b in zip(lrs[:warmup_steps], lrs[1 : warmup_steps + 1]))


def test_warmup_fraction_and_steps_are_one_setting():
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=50 and optim.warmup_fraction=0.2 both set"):
        load_config(SMALL, ["optim.warmup_fraction=0.2", "optim.warmup_steps=50"])
    with pytest.raises(ConfigError, match=r"^override 'optim.warmup_steps=50' \(command line\): .*keep one"):
        load_config(SMALL, ["optim.warmup_steps=50"])  # the preset's own fraction and a step count given here
    with pytest.raises(ConfigError, match=r"optim.warmup_fraction=1.5 must be in \[0, 1\]"):
        load_config(SMALL, ["optim.warmup_fraction=1.5", "optim.warmup_steps=12500"])
    steps = load_config(SMALL, ["optim.warmup_fraction=null", "optim.warmup_steps=50", "train.total_steps=500"])
    assert build_schedules(steps).at(49).lr < build_schedules(steps).at(50).lr
