"""The slide-pretraining config: typed frozen dataclasses filled from YAML (``configs/slide/*.yaml``) + ``key=value``.

Every default is documented here once (field comments) and in docs/slide.md. ``load_pretrain_config`` parses and
type-checks (unknown keys and wrong types are errors naming the key); ``validate_pretrain_config`` checks what
needs several sections, the launch or the embeddings stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pathdino.slide.config import SlideEncoderConfig
from tiling.configio import ConfigError, load_config, to_dict


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{section}.{name}={value} must be positive", key=f"{section}.{name}")


@dataclass(frozen=True)
class SlideDataConfig:
    """Where the slides come from and how they are cut and batched (docs/slide.md, "The data path")."""

    embeddings: tuple[str, ...]  # `pathdino embed` output folders, all from one tile encoder
    feature: str = "features"  # the tile embedding: the encoder's recipe ("features"), or "cls" / "mean_patch"
    # A slide with more tiles is cropped to this many: a contiguous square region of its tile grid, another one
    # each epoch (pathdino.slide.plan.crop_indices). Bounds a micro-batch's memory whatever the slide.
    max_tokens_per_slide: int = 4096
    # Tiles per micro-batch (one process): consecutive slides are packed until the next would exceed it.
    tokens_per_pack: int = 16384
    min_tiles_per_slide: int = 2  # slides with fewer tiles are skipped (nothing to predict one tile from)
    num_workers: int = 2  # DataLoader workers per process reading the stores; 0 reads in the training process
    # Keep every slide read in memory (in each data worker): for datasets that fit in RAM, trained for many epochs
    # (a store read costs tens of ms per slide, whatever its size).
    cache_slides: bool = False

    def __post_init__(self) -> None:
        if not self.embeddings:
            raise ConfigError(
                "data.embeddings is empty: give the `pathdino embed` output folder(s)", key="data.embeddings"
            )
        _positive(
            "data",
            max_tokens_per_slide=self.max_tokens_per_slide,
            tokens_per_pack=self.tokens_per_pack,
            min_tiles_per_slide=self.min_tiles_per_slide,
        )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0", key="data.num_workers")
        if self.tokens_per_pack < self.max_tokens_per_slide:
            raise ConfigError(
                f"data.tokens_per_pack={self.tokens_per_pack} is smaller than data.max_tokens_per_slide="
                f"{self.max_tokens_per_slide}: a cropped slide must fit one micro-batch; raise tokens_per_pack or "
                "lower max_tokens_per_slide",
                key="data.tokens_per_pack",
            )


@dataclass(frozen=True)
class MAEConfig:
    """Masked autoencoding on tile embeddings (docs/slide.md, "The objective")."""

    mask_ratio: float = 0.75  # share of each slide's tiles hidden from the encoder and predicted (MAE: 0.75)
    norm_targets: bool = True  # predict each tile embedding standardised over its features (MAE's norm_pix_loss)
    decoder_dim: int = 256  # decoder width
    decoder_depth: int = 2  # decoder blocks (dilated attention, as the encoder's)
    decoder_heads: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio} must be in (0, 1)", key="objective.mask_ratio")
        _positive(
            "objective",
            decoder_dim=self.decoder_dim,
            decoder_depth=self.decoder_depth,
            decoder_heads=self.decoder_heads,
        )
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(
                f"objective.decoder_dim={self.decoder_dim} is not divisible by objective.decoder_heads="
                f"{self.decoder_heads}",
                key="objective.decoder_dim",
            )


@dataclass(frozen=True)
class SlideOptimConfig:
    """AdamW and the schedules, counted in optimizer steps."""

    lr: float = 1.5e-4  # peak learning rate (not scaled by the batch)
    min_lr: float = 1e-6  # end of the cosine
    warmup_steps: int = 500  # linear warm-up from 0
    weight_decay: float = 0.05  # cosine from this ...
    weight_decay_end: float = 0.05  # ... to this (biases, norms, tokens: none)
    betas: tuple[float, float] = (0.9, 0.95)  # MAE's
    clip_grad: float = 1.0  # max grad norm over the model; 0 disables clipping
    # EMA of the encoder (exported instead of the trained weights when set): momentum, cosine to ema_momentum_end
    ema_momentum: float | None = None
    ema_momentum_end: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim", lr=self.lr)
        for name in ("min_lr", "warmup_steps", "weight_decay", "weight_decay_end", "clip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be >= 0", key=f"optim.{name}")
        for name in ("ema_momentum", "ema_momentum_end"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"optim.{name}={value} must be in (0, 1]", key=f"optim.{name}")


@dataclass(frozen=True)
class SlideTrainConfig:
    """The run: batch, length, precision, checkpoints (the fields ``pathdino.train.context`` reads share the tile
    trainer's names and meaning)."""

    output_dir: str = "runs/slide"  # metrics.jsonl, checkpoints/, config.yaml, done.json
    # Micro-batches (packs of data.tokens_per_pack tiles) per optimizer step over all processes: each process
    # runs packs_per_step / processes of them, accumulating gradients (so it must divide evenly).
    packs_per_step: int = 8
    total_steps: int = 20_000  # optimizer steps; every schedule ends here
    seed: int = 0  # weights, slide order, crops and masks
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast (fp32 master weights and loss) or plain fp32
    cpu_flush_denormal: bool = True  # as the tile trainer's (docs/training.md)
    cpu_reuse_freed_memory: bool = True  # as the tile trainer's
    parallel: Literal["auto", "ddp"] = "auto"  # DDP across processes (FSDP2 sharding: not for slide encoders yet)
    checkpoint_every_steps: int = 1_000
    checkpoint_at_end: bool = True
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # this many consecutive NaN/inf steps stop the run
    stop_at_step: int | None = None  # stop (after a checkpoint) at this step; schedules still use total_steps

    def __post_init__(self) -> None:
        _positive(
            "train",
            packs_per_step=self.packs_per_step,
            total_steps=self.total_steps,
            checkpoint_every_steps=self.checkpoint_every_steps,
            keep_checkpoints=self.keep_checkpoints,
            max_nonfinite_steps=self.max_nonfinite_steps,
        )
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.total_steps:
            raise ConfigError(
                f"train.stop_at_step={self.stop_at_step} must be in [1, train.total_steps={self.total_steps}]",
                key="train.stop_at_step",
            )


@dataclass(frozen=True)
class SlideLogConfig:
    """Metrics."""

    every_steps: int = 20  # full metrics (throughput, memory, embedding rank, data) every N steps; losses always
    trackers: list[str] | None = None  # None = tensorboard if installed + wandb if installed and configured
    project_name: str = "pathdino-slide"

    def __post_init__(self) -> None:
        _positive("log", every_steps=self.every_steps)


@dataclass(frozen=True)
class SlidePretrainConfig:
    """A whole slide-pretraining run; YAML sections have the field names."""

    data: SlideDataConfig = field(metadata={"help": "the embeddings stores to train on"})
    model: SlideEncoderConfig = field(default_factory=SlideEncoderConfig)
    objective: MAEConfig = field(default_factory=MAEConfig)
    optim: SlideOptimConfig = field(default_factory=SlideOptimConfig)
    train: SlideTrainConfig = field(default_factory=SlideTrainConfig)
    log: SlideLogConfig = field(default_factory=SlideLogConfig)


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> SlidePretrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, build the typed config (ConfigError on any problem)."""
    return load_config(SlidePretrainConfig, path, list(overrides or []))


def config_to_dict(cfg: SlidePretrainConfig) -> dict[str, Any]:
    return to_dict(cfg)


# Keys that may change on resume: where and how often the run writes, not what it computes.
RESUME_MAY_CHANGE = {
    "train.output_dir",
    "train.stop_at_step",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.checkpoint_at_end",
    "log.trackers",
    "log.every_steps",
    "data.num_workers",
}
