"""In-training probes: every ``eval.probe.every_steps`` the teacher backbone embeds a labelled tile set and a kNN
(k = 20) and a linear probe report how well its features separate the classes, beside the health metrics.

The labelled set uses the layouts ``pathdino eval`` reads (``pathdino.eval.datasets``: class folders, split folders
or a CSV ``path,label[,split][,patient]``). Probes fit on its ``train`` split and score on ``val`` + ``test``
(when the source gives no split, a seeded stratified one is drawn). Images are decoded once and kept as uint8 at
their own size; each batch becomes the teacher's input through ``TileTransform`` (``pathdino.data.tile_transform``),
the preprocessing ``pathdino eval`` / ``pathdino embed`` apply to an exported encoder (resized to the global crop
size when the side differs, the crops' normalisation), and the feature is the backbone's CLS after the final norm
with every token through every block, which is the exported timm model's ``model(x)``. fp32 on CPU and bf16 autocast
on CUDA, as ``pathdino eval``. So a probe score is the score ``pathdino eval`` gives the exported teacher of that
step (tests/test_train_probe.py checks the features against an export).

Embedding is sharded: every process embeds every ``world``-th image with its teacher (under FSDP2 every process
must take part in each forward anyway) and the CLS features are gathered; process 0 fits the probes (kNN as
DINOv2's evaluation, T = 0.07; multinomial logistic regression, L-BFGS, l2 picked by cross-validation) and the
result goes to metrics.jsonl and the trackers as ``probe_knn_accuracy``, ``probe_knn_balanced_accuracy``,
``probe_linear_accuracy``, ``probe_linear_balanced_accuracy``.

A probe must not change the run: it reads the teacher without grads in eval mode, and every random number
generator (torch, numpy, python) is saved before and restored after, so a run with probes has the same losses
as one without, and resumes exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pathdino.train.health import ProbeMonitor

log = logging.getLogger("pathdino.train")

PROBE_KEYS = (
    "probe_knn_accuracy",
    "probe_knn_balanced_accuracy",
    "probe_linear_accuracy",
    "probe_linear_balanced_accuracy",
)


@dataclass(frozen=True)
class ProbeConfig:
    """A labelled tile set probed during training (section ``eval.probe``)."""

    data: str  # class-folder root or CSV (the layouts `pathdino eval` reads)
    every_steps: int = 1_000  # probe after every N optimizer steps (and once before the first step)
    knn_k: int = 20  # neighbours of the weighted kNN (DINOv2's evaluation uses 20)
    max_images: int = 2_000  # at most this many images (a seeded subset per split); held in memory as uint8, own size
    batch_size: int = 64  # images per teacher forward, per process
    img_px: int | None = None  # side the images are resized/cropped to; None = augment.global_crop_px
    at_start: bool = True  # also probe the initial teacher (the baseline a run should beat)
    metric: str = "probe_knn_balanced_accuracy"  # the score "best" means (keep_best, drop_warning): a PROBE_KEYS
    keep_best: bool = False  # keep the checkpoint of the best probe score in <output_dir>/checkpoints/best
    drop_warning: float = 0.05  # warn when a probe falls more than this (absolute) below the best so far; 0 = off


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training."""

    probe: ProbeConfig | None = None  # None = no probes


@contextlib.contextmanager
def _untouched_rngs():
    """Restore torch (CPU and CUDA), numpy and python RNG states afterwards: probes draw from no training stream."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingProbe:
    """Loads the labelled set once; ``maybe_run(step, teacher)`` probes on schedule and returns the metrics."""

    def __init__(
        self, cfg: ProbeConfig, *, img_px: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
    ) -> None:
        from pathdino.data.tile_transform import TileTransform
        from pathdino.eval.datasets import load_tile_dataset

        if cfg.every_steps < 1 or cfg.knn_k < 1 or cfg.max_images < 2 or cfg.batch_size < 1:
            raise ValueError("eval.probe: every_steps, knn_k and batch_size must be >= 1, max_images >= 2")
        if cfg.metric not in PROBE_KEYS:
            raise ValueError(f"eval.probe.metric={cfg.metric!r}: choose one of {', '.join(PROBE_KEYS)}")
        if not cfg.drop_warning >= 0:
            raise ValueError(f"eval.probe.drop_warning={cfg.drop_warning}: must be >= 0 (0 turns the warning off)")
        self.cfg, self.device = cfg, device
        self.best = ProbeMonitor(cfg.metric, cfg.drop_warning if cfg.drop_warning > 0 else math.inf)
        self.img_px = cfg.img_px or img_px
        with _untouched_rngs():
            try:
                dataset = load_tile_dataset(Path(cfg.data))
            except (OSError, ValueError) as exc:
                raise ValueError(f"eval.probe.data={cfg.data}: {exc}") from exc
            fit = list(dataset.records("train"))
            score = list(dataset.records("val")) + list(dataset.records("test"))
            if not score:
                raise ValueError(f"eval.probe.data={cfg.data}: no val/test images to score the probes on")
            share = max(1, cfg.max_images * len(fit) // (len(fit) + len(score)))
            rng = np.random.default_rng(0)
            fit = [fit[i] for i in sorted(rng.permutation(len(fit))[:share])]
            score = [score[i] for i in sorted(rng.permutation(len(score))[: max(1, cfg.max_images - share)])]
            # Held as uint8 [H, W, 3] at their own size (4x less memory than floats: ~0.3 GB at 2,000 images of
            # 224 px) and turned into inputs per batch by the exported encoder's own transform.
            self.transform = TileTransform(input_px=self.img_px, mean=tuple(mean), std=tuple(std))
            rank, world = _world()
            records = fit + score
            # This process decodes only its own images (every world-th), padded to equal counts across processes.
            self.n_total, self.n_fit = len(records), len(fit)
            self.per_rank = -(-self.n_total // world)
            self.images = [_open(r.path) for r in records[rank::world]]
            self.labels = torch.tensor([r.label for r in records])
            self.n_classes = len(dataset.class_names)
        log.info(
            "probe: %s, %d classes, fit on %d images, scored on %d, every %d steps",
            cfg.data,
            self.n_classes,
            len(fit),
            len(score),
            cfg.every_steps,
        )

    def due(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0 and (step > 0 or self.cfg.at_start)

    def inputs(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Stored uint8 images [H, W, 3] as the teacher's float input [N, 3, img_px, img_px], on the device."""
        if len({tuple(im.shape) for im in images}) == 1:
            return self.transform.batch(torch.stack(images).to(self.device))
        return torch.cat([self.transform.batch(im[None].to(self.device)) for im in images])

    @torch.no_grad()
    def embed(self, teacher: nn.Module) -> torch.Tensor | None:
        """CLS features [N, D] of every probe image on process 0 (None elsewhere); all processes must call."""
        rank, world = _world()
        feats = []
        # As pathdino eval's extract_features: bf16 autocast on CUDA, fp32 elsewhere.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for start in range(0, self.per_rank, self.cfg.batch_size):
            stop = min(start + self.cfg.batch_size, self.per_rank)
            batch = list(self.images[start:stop])
            # Equal forward calls on every process (FSDP2 collectives); the padding rows are dropped later.
            batch += [torch.zeros(self.img_px, self.img_px, 3, dtype=torch.uint8)] * (stop - start - len(batch))
            x = self.inputs(batch)
            with autocast:
                # The root module's forward (FSDP2 gathers the root's own parameters only there), in its embedding
                # mode: all tokens, final norm, CLS; the objective's forward reads other rows (query_rows.py).
                out = teacher(x, None, None, embed_only=True)
            feats.append(out["cls"].float())
        local = torch.cat(feats) if feats else torch.zeros(0)
        if world > 1:
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local.contiguous())
        else:
            gathered = [local]
        if rank != 0:
            return None
        # Process r holds images r, r + world, ...: interleave back to the original order.
        out = torch.empty(self.per_rank * world, local.shape[1], device=local.device)
        for r, g in enumerate(gathered):
            out[r::world] = g
        return out[: self.n_total].cpu()

    def new_best(self, step: int, record: dict[str, Any]) -> bool:
        """Whether ``record`` (a step's metrics; the probe scores are on process 0 only) holds a new best score,
        as every process learns it from process 0 (all must call: saving the best checkpoint is collective); warns
        when the score fell ``drop_warning`` below the best. False when the step was not probed."""
        if not self.due(step):  # every process knows the probe steps: no collective on the others
            return False
        rank, world = _world()
        found = self.best.check(step, record) if rank == 0 else False
        if world > 1:
            flag = torch.tensor([float(found)], device=self.device)
            dist.broadcast(flag, src=0)
            found = bool(flag.item())
        return found

    def maybe_run(self, step: int, teacher: nn.Module) -> dict[str, Any]:
        """Probe if due at ``step``: metrics on process 0, {} elsewhere and when not due."""
        if not self.due(step):
            return {}
        from pathdino.eval.knn import knn_evaluate
        from pathdino.eval.linear import linear_probe_evaluate

        with _untouched_rngs():
            features = self.embed(teacher)
            if features is None:
                return {}
            f_fit, f_score = features[: self.n_fit], features[self.n_fit :]
            y_fit, y_score = self.labels[: self.n_fit], self.labels[self.n_fit :]
            knn = knn_evaluate(f_fit, y_fit, f_score, y_score, n_classes=self.n_classes, ks=(self.cfg.knn_k,))
            knn = knn["by_k"][str(self.cfg.knn_k)]
            folds = max(2, min(3, int(torch.bincount(y_fit).min())))
            try:
                linear = linear_probe_evaluate(
                    f_fit, y_fit, f_score, y_score, n_classes=self.n_classes, cv_folds=folds
                )["test"]
            except ValueError as exc:  # e.g. too few images per class for cross-validation
                log.warning("probe at step %d: linear probe skipped (%s)", step, exc)
                linear = {}
        record = {"probe_knn_accuracy": knn["accuracy"], "probe_knn_balanced_accuracy": knn["balanced_accuracy"]}
        if linear:
            record.update(
                probe_linear_accuracy=linear["accuracy"], probe_linear_balanced_accuracy=linear["balanced_accuracy"]
            )
        log.info(
            "probe at step %d: kNN accuracy %.3f, linear %s",
            step,
            record["probe_knn_accuracy"],
            f"{record['probe_linear_accuracy']:.3f}" if linear else "n/a",
        )
        return record


def _open(path: Path) -> torch.Tensor:
    """An image file as uint8 [H, W, 3] (what ``TileTransform`` takes from a PIL image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8, copy=True))
    except (OSError, ValueError) as exc:
        raise ValueError(f"eval.probe: cannot read image {path}: {exc}") from exc


def build_probe(
    probe: ProbeConfig | None, *, crop_px: int, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> TrainingProbe | None:
    """The run's probe (None without ``eval.probe``), at the run's global crop size ``crop_px`` (unless
    ``eval.probe.img_px``) and the crops' normalisation; ConfigError if its data is unusable."""
    from tiling.configio import ConfigError

    if probe is None:
        return None
    try:
        return TrainingProbe(probe, img_px=crop_px, mean=mean, std=std, device=device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def probe_metrics(probe: TrainingProbe | None, step: int, teacher: nn.Module) -> dict[str, Any]:
    """``probe.maybe_run`` or {} without a probe: the loop's one call (every process must make it)."""
    return {} if probe is None else probe.maybe_run(step, teacher)
