"""Run health: collapse warnings, the NaN/inf guard, throughput/MFU (metric logging lives in logs.py).

Everything here is cheap per step; the costlier statistics (entropies, embedding rank) are computed by the loop
only on logging steps.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from tiling.errors import PathdinoError

log = logging.getLogger("pathdino.train")

# Dense (no sparsity) peak TFLOP/s per device for MFU, by substring of torch.cuda.get_device_name(); first match
# wins, so specific names precede general ones. fp32 means true fp32 (PyTorch's default, TF32 off).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "fp32": 66.9}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp32": 82.6}),
]


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Nominal dense peak TFLOP/s of one device (``override`` wins); None when unknown (CPUs, unlisted GPUs)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks["bf16" if precision == "bf16" else "fp32"]
    return None


class NonFiniteError(PathdinoError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; ``max_consecutive`` in a row raise ``NonFiniteError``."""

    def __init__(self, max_consecutive: int, total: int = 0) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = total

    def update(self, finite: bool, step: int, last_checkpoint: str | None) -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        log.warning(
            "step %d: non-finite loss or gradient norm; step skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.total,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"norm (train.max_nonfinite_steps={self.max_consecutive}). The last good checkpoint is "
                f"{last_checkpoint or 'none (no checkpoint was written yet)'}; it is intact. Lower optim.base_lr, "
                "check the data (blank or corrupt tiles), or use train.precision=fp32, then resume from it."
            )


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of a probability matrix."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean()


def effective_rank(features: torch.Tensor) -> float:
    """RankMe: exp(entropy of the normalised singular values) of the L2-normalised rows, not centred, so that
    rows collapsed onto one direction give 1 (at most min(rows, dims))."""
    x = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    if x.shape[0] < 2 or not torch.isfinite(x).all():
        return float("nan")
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class CollapseMonitor:
    """Warns when the teacher's prototype usage or the embedding rank falls (signs of representation collapse).

    From ``after_steps`` on, a warning is issued when the effective rank of the teacher CLS embeddings or the
    entropy of the teacher's mean prototype distribution drops below ``drop_fraction`` of its best value, or when
    the teacher's per-image targets are almost uniform (entropy above 98% of log K). The usage entropy's best counts
    from the first step; the rank's best only from ``after_steps``: an untrained network's features have a rank
    that nothing learned, and healthy runs lose much of it early and regain it later (RankMe's dip; on the small
    preset with KoLeo 0.01, 16 -> 7-10 within 100 steps while the probe rose, back to 12-14 by step 500). A
    collapse before ``after_steps`` shows in the usage entropy or in uniform targets.
    """

    # Health figures whose best counts only from ``after_steps`` (see above).
    BEST_FROM_AFTER_STEPS = frozenset({"embedding_rank"})

    def __init__(self, after_steps: int, drop_fraction: float, n_prototypes: int) -> None:
        self.after_steps = after_steps
        self.drop_fraction = drop_fraction
        self.log_k = math.log(n_prototypes)
        self.best: dict[str, float] = {}
        self.warnings = 0

    def check(self, step: int, metrics: dict[str, float]) -> bool:
        reasons = []
        for key in ("embedding_rank", "teacher_usage_entropy"):
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            if step < self.after_steps and key in self.BEST_FROM_AFTER_STEPS:
                continue
            self.best[key] = max(self.best.get(key, value), value)
            if step >= self.after_steps and value < self.drop_fraction * self.best[key]:
                reasons.append(f"{key} {value:.3g} fell below {self.drop_fraction:g} x its best {self.best[key]:.3g}")
        teacher_h = metrics.get("teacher_entropy")
        if step >= self.after_steps and teacher_h is not None and teacher_h > 0.98 * self.log_k:
            reasons.append(f"teacher targets are nearly uniform (entropy {teacher_h:.3g} of max {self.log_k:.3g})")
        if reasons:
            self.warnings += 1
            log.warning("step %d: possible collapse: %s", step, "; ".join(reasons))
        return bool(reasons)


class ProbeMonitor:
    """The best in-training probe score so far, and a warning when a probe falls well below it.

    ``check(step, record)`` reads ``metric`` (one of the ``probe_*`` keys) from a step's record: a value above the
    best so far (the first probe, step 0's initial teacher included, sets it) makes it the new best and returns
    True; a value more than ``drop_warning`` (accuracy points, absolute) below the best logs a warning and counts
    it. Probe scores move by a few points from one probe to the next on a few hundred images (one binomial standard
    error is ~0.03 at 250 images), so the default 0.05 warns about a fall beyond noise, not jitter.
    """

    def __init__(self, metric: str, drop_warning: float) -> None:
        self.metric = metric
        self.drop_warning = drop_warning
        self.best: float | None = None
        self.best_step: int | None = None
        self.warnings = 0

    def state(self) -> dict[str, float | int | str | None]:
        """What a checkpoint carries (``load`` restores it on resume)."""
        return {"metric": self.metric, "value": self.best, "step": self.best_step}

    def load(self, state: dict | None) -> None:
        if state and state.get("metric") == self.metric and state.get("value") is not None:
            self.best, self.best_step = float(state["value"]), int(state["step"])

    def check(self, step: int, record: dict[str, float]) -> bool:
        value = record.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best is None or value > self.best:
            self.best, self.best_step = float(value), step
            return True
        if value < self.best - self.drop_warning:
            self.warnings += 1
            log.warning(
                "step %d: the probe fell: %s %.3f is %.3f below its best %.3f (step %d); the features are "
                "losing what the probe reads. eval.probe.keep_best keeps the best checkpoint "
                "(checkpoints/best); see docs/training.md, 'Small budgets'",
                step,
                self.metric,
                value,
                self.best - value,
                self.best,
                self.best_step,
            )
        return False


def memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last call (CUDA), else this process's resident memory, in MiB."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return value
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class Throughput:
    """Wall time and data-wait time between logging steps -> images/s, data-wait share, achieved TFLOP/s, MFU."""

    def __init__(self, images_per_step: int, flops_per_image: float, peak_tflops_total: float | None) -> None:
        self.images_per_step = images_per_step
        self.flops_per_image = flops_per_image
        self.peak_total = peak_tflops_total
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.data_wait_s = 0.0
        self.steps = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def step_done(self) -> None:
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """Figures since the last ``summary`` (call on logging steps, after a device sync)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        images_per_s = self.steps * self.images_per_step / elapsed
        tflops = images_per_s * self.flops_per_image / 1e12
        out = {
            "images_per_s": images_per_s,
            "data_wait_share": self.data_wait_s / elapsed,
            "tflops_per_s": tflops,
        }
        if self.peak_total:
            out["mfu"] = tflops / self.peak_total
        self.reset()
        return out
