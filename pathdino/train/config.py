"""The training config: typed frozen dataclasses filled from YAML (``configs/train/*.yaml``) + ``key=value``.

Every default is documented here once (field comments) and in docs/training.md. ``load_config`` parses and
type-checks (unknown keys and wrong types are errors naming the key); ``validate.validate_config`` checks the
things that need several sections or the launch (crop sizes vs patch size, batch divisibility, tile stores).

The global crop size has one key, ``augment.global_crop_px``: the backbone is built at it (its position-embedding
grid), so ``model.backbone.img_size`` is derived from it (``RunConfig``), in every phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pathdino.data import AugmentConfig, DataConfig, MaskConfig
from pathdino.models import BackboneConfig, HeadConfig
from pathdino.train.logs import flat_config
from pathdino.train.probe import EvalConfig
from tiling.configio import ConfigError, apply_overrides, blame_override, from_dict, load_yaml, to_dict


def _check_fields(
    section: str,
    *,
    positive: dict[str, float] | None = None,
    non_negative: dict[str, float] | None = None,
    unit: dict[str, float] | None = None,
) -> None:
    """Single-field checks of a section (``__post_init__``); messages name the YAML key (``section.field``)."""
    for name, value in (positive or {}).items():
        if not value > 0:
            raise ConfigError(f"{section}.{name}={value} must be positive", key=f"{section}.{name}")
    for name, value in (non_negative or {}).items():
        if value < 0:
            raise ConfigError(f"{section}.{name}={value} must be >= 0", key=f"{section}.{name}")
    for name, value in (unit or {}).items():
        if not 0 < value <= 1:
            raise ConfigError(f"{section}.{name}={value} must be in (0, 1]", key=f"{section}.{name}")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and heads (DINOv2 ViT-S/14 defaults)."""

    # see pathdino.models.BackboneConfig; its img_size is augment.global_crop_px (set by RunConfig, not in YAML)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    dino_head: HeadConfig = field(default_factory=HeadConfig)  # 65,536 prototypes, bottleneck 256 (L/g: 131,072, 384)
    ibot_separate_head: bool = False  # DINOv2 shares the head for S/B; separate for L/g
    # only with ibot_separate_head; None = same sizes as dino_head (L/g: 131,072 x 256)
    ibot_head: HeadConfig | None = None
    init_checkpoint: str | None = None  # local timm/dinov2 checkpoint to start the backbone from (no download)

    def __post_init__(self) -> None:
        if not self.ibot_separate_head and self.ibot_head is not None:
            raise ConfigError(
                "model.ibot_head is only used with model.ibot_separate_head=true; remove it or enable that",
                key="model.ibot_head",
            )

    @property
    def ibot_head_(self) -> HeadConfig | None:
        """The separate iBOT head's sizes (``ibot_head``, or those of ``dino_head``); None: the DINO head serves."""
        return (self.ibot_head or self.dino_head) if self.ibot_separate_head else None


@dataclass(frozen=True)
class GramConfig:
    """Gram anchoring (DINOv3; off while ``weight`` is 0): the student's global-crop patch cosine similarities held
    to those of a Gram teacher, a copy of the EMA teacher taken at ``start_step`` and every
    ``refresh_every_steps`` after it, which sees the global crops resampled by ``input_scale`` (its patch features
    are resampled back to the student's grid). Loss: pathdino/losses/gram.py; docs/training.md, "Recipes"."""

    weight: float = 0.0  # loss weight; 0 = off
    start_step: int = 0  # first optimizer step with the loss (the Gram teacher is copied from the EMA teacher here)
    refresh_every_steps: int = 10_000  # re-copy the Gram teacher from the EMA teacher this often; 0 = never
    input_scale: float = 2.0  # Gram teacher input = global crop x this (bicubic); 1 = the crop as it is
    remove_negative: bool = True  # negative similarities set to 0 in both matrices (dinov3's remove_neg)

    def __post_init__(self) -> None:
        _check_fields(
            "loss.gram",
            positive={"input_scale": self.input_scale},
            non_negative={
                "weight": self.weight,
                "start_step": self.start_step,
                "refresh_every_steps": self.refresh_every_steps,
            },
        )


@dataclass(frozen=True)
class LossConfig:
    """DINO + iBOT + uniformity objective (DINOv2 defaults)."""

    dino_weight: float = 1.0  # DINO CLS loss (global + local terms)
    ibot_weight: float = 1.0  # iBOT masked-patch loss
    uniformity: Literal["koleo", "kde", "none"] = "koleo"  # KoLeo (DINOv2) or KDE (Virchow2 / Midnight)
    uniformity_weight: float = 0.1  # KoLeo 0.1 (DINOv2); use 0.05 with kde (OpenMidnight)
    koleo_duplicate_tol: float = 1e-3  # neighbours closer than this count as duplicates (guard, dinov2 #492)
    kde_kappa: float = 5.0  # vMF kernel concentration for kde
    targets: Literal["centering", "sinkhorn"] = "centering"  # teacher targets; DINOv2 uses sinkhorn for L/g
    center_momentum: float = 0.9  # EMA momentum of the teacher centers
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after the warm-up
    teacher_temp_warmup_start: float = 0.04
    teacher_temp_warmup_steps: int = 37_500  # DINOv2: 30 "epochs" x 1,250 iterations
    gram: GramConfig = field(default_factory=GramConfig)  # Gram anchoring (DINOv3); off by default

    def __post_init__(self) -> None:
        _check_fields(
            "loss",
            positive={
                "student_temp": self.student_temp,
                "teacher_temp": self.teacher_temp,
                "teacher_temp_warmup_start": self.teacher_temp_warmup_start,
            },
            non_negative={
                "teacher_temp_warmup_steps": self.teacher_temp_warmup_steps,
                "dino_weight": self.dino_weight,
                "ibot_weight": self.ibot_weight,
                "uniformity_weight": self.uniformity_weight,
            },
        )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the schedules, all counted in optimizer steps (DINOv2 ViT-S/B defaults)."""

    base_lr: float = 0.004  # peak lr for 1,024 images per step; scaled by lr_scaling
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"  # DINOv2: lr = base_lr * sqrt(batch_size / 1024)
    min_lr: float = 1e-6  # end of the cosine (not scaled)
    warmup_steps: int = 12_500  # linear lr warm-up from 0
    # The warm-up as a share of train.total_steps instead (rounded); then leave warmup_steps unset. A preset whose
    # users change the run length (small.yaml) keeps its measured shape this way.
    warmup_fraction: float | None = None
    weight_decay: float = 0.04  # cosine from this ...
    weight_decay_end: float = 0.4  # ... to this (0.2 for L/g)
    betas: tuple[float, float] = (0.9, 0.999)
    layerwise_decay: float = 0.9  # lr x decay^(depth + 1 - layer) in the backbone (1.0 for L/g)
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_steps: int = 1_250  # prototype layers get no update for this many steps
    # How they are frozen. zero_lr (DINOv2): lr 0 after clipping; clipping sees their gradients, AdamW's moments
    # and step count accumulate. drop_grads (DINO v1's cancel_gradients_last_layer): gradients dropped first.
    freeze_last_layer: Literal["zero_lr", "drop_grads"] = "zero_lr"
    decay_tokens: bool = True  # weight-decay CLS/register tokens, pos_embed, mask_token (DINOv2); false = timm/DINO v1
    clip_grad: float = 3.0  # max grad norm per module (backbone, each head); 0 disables clipping
    momentum_teacher: float = 0.992  # EMA momentum, cosine to momentum_teacher_end (0.994 for L/g)
    momentum_teacher_end: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(
            "optim",
            positive={"base_lr": self.base_lr},
            non_negative={
                "warmup_steps": self.warmup_steps,
                "freeze_last_layer_steps": self.freeze_last_layer_steps,
                "min_lr": self.min_lr,
                "clip_grad": self.clip_grad,
            },
            unit={
                "momentum_teacher": self.momentum_teacher,
                "momentum_teacher_end": self.momentum_teacher_end,
                "layerwise_decay": self.layerwise_decay,
            },
        )
        if self.warmup_fraction is None:
            return
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(
                f"optim.warmup_fraction={self.warmup_fraction} must be in [0, 1] (a share of train.total_steps)",
                key="optim.warmup_fraction",
            )
        if self.warmup_steps != _DEFAULT_WARMUP_STEPS:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps} and optim.warmup_fraction={self.warmup_fraction} both set "
                "the lr warm-up; keep one (e.g. optim.warmup_fraction=null to count it in steps)",
                key="optim.warmup_steps",  # what a preset with the fraction (small.yaml) gets on the command line
            )

    def warmup_steps_in(self, total_steps: int) -> int:
        """The lr warm-up of a run of ``total_steps``: ``warmup_fraction`` of it (rounded) when set, else
        ``warmup_steps``."""
        if self.warmup_fraction is None:
            return self.warmup_steps
        return round(self.warmup_fraction * total_steps)


_DEFAULT_WARMUP_STEPS = OptimConfig.warmup_steps


@dataclass(frozen=True)
class PhaseConfig:
    """A closing phase of the run at other crop sizes, e.g. DINOv2's short high-resolution phase (518 px).

    Phases fill the end of ``train.total_steps`` in the order listed; the steps before them use ``augment`` and
    ``train.batch_size``. Schedules continue (they count optimizer steps); the position embedding is resampled
    once, at the switch (see pathdino/train/phases.py and docs/training.md).
    """

    steps: int  # length in optimizer steps
    global_crop_px: int  # also the backbone's img_size during the phase (a multiple of the patch size)
    local_crop_px: int | None = None  # None = augment.local_crop_px
    batch_size: int | None = None  # images per optimizer step; None = train.batch_size (lr follows optim.lr_scaling)
    grad_accum_steps: int | None = None  # None = train.grad_accum_steps


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a frozen teacher (pathdino/train/distill.py; docs/training.md, "Recipes")."""

    # A pathdino checkpoint (step_* folder, or a run folder: its newest checkpoint): DINO/iBOT targets from its
    # heads. Or an encoder folder (pathdino export / known third-party timm encoder): cosine feature distillation.
    teacher: str | None = None
    cls_weight: float = 1.0  # encoder teacher: weight of the CLS cosine loss
    patch_weight: float = 1.0  # encoder teacher: weight of the patch-token cosine loss

    def __post_init__(self) -> None:
        _check_fields("train.distill", non_negative={"cls_weight": self.cls_weight, "patch_weight": self.patch_weight})


@dataclass(frozen=True)
class TrainConfig:
    """The run: batch, length, precision, parallelism, checkpoints."""

    output_dir: str = "runs/pathdino"  # metrics.jsonl, checkpoints/, config.yaml, done.json, <log.project_name>/
    batch_size: int = 1024  # images per optimizer step over all processes and accumulation micro-steps
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    total_steps: int = 125_000  # optimizer steps; every schedule ends here (DINOv2: 100 x 1,250)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast (fp32 master weights, fp32 losses) or plain fp32
    compile: bool = False  # torch.compile each ViT block of student and teacher (in place: same checkpoints)
    # CPU runs: flush denormal floats (< 1.2e-38 in fp32) to zero (FTZ/DAZ, TensorFlow's CPU default); fp32 ViT-S
    # step on a Zen 4 EPYC: ~15% faster (benchmarks/RESULTS.md). No effect on GPUs.
    cpu_flush_denormal: bool = True
    # CPU runs on Linux/glibc: large tensors from the heap and freed memory kept for reuse instead of fresh mmap'd
    # pages per allocation (page faults; the 65,536-prototype logits are ~360 MB a step): ViT-S/14 step ~5% faster
    # in fp32, ~15% in bf16 on a Zen 4 EPYC VM. Resident memory stays at the step's peak. No effect on GPUs.
    cpu_reuse_freed_memory: bool = True
    parallel: Literal["auto", "ddp", "fsdp2"] = "auto"  # auto: fsdp2 under an accelerate FSDP config, else ddp
    fsdp_reshard_after_forward: bool = True  # FSDP2: free unsharded params after forward (ZeRO-3 style)
    checkpoint_every_steps: int = 2_500
    checkpoint_at_end: bool = True  # also checkpoint the last step of the run (done, stop_at_step); off for benchmarks
    keep_checkpoints: int = 3  # newest N complete checkpoints are kept
    max_nonfinite_steps: int = 5  # this many consecutive NaN/inf steps stop the run
    stop_at_step: int | None = None  # stop (after a checkpoint) at this step; schedules still use total_steps
    synthetic_data: bool = False  # random pixels instead of tile stores (benchmarks, smoke tests)
    phases: tuple[PhaseConfig, ...] = ()  # closing phases at other crop sizes / batch sizes (high resolution)
    # Continued pretraining (model.init_checkpoint): the backbone gets no update for this many steps (no AdamW step,
    # no weight decay) while the new heads learn; the teacher follows by EMA (its backbone stays the checkpoint's).
    freeze_backbone_steps: int = 0
    backbone_lr_ramp_steps: int = 0  # after the freeze, the backbone's lr multiplier rises 0 -> 1 over this many steps
    distill: DistillConfig = field(default_factory=DistillConfig)  # a frozen teacher to distil from; off by default

    def __post_init__(self) -> None:
        _check_fields(
            "train",
            non_negative={
                "freeze_backbone_steps": self.freeze_backbone_steps,
                "backbone_lr_ramp_steps": self.backbone_lr_ramp_steps,
            },
        )
        _check_fields(
            "train",
            positive={
                "total_steps": self.total_steps,
                "batch_size": self.batch_size,
                "grad_accum_steps": self.grad_accum_steps,
                "checkpoint_every_steps": self.checkpoint_every_steps,
                "keep_checkpoints": self.keep_checkpoints,
                "max_nonfinite_steps": self.max_nonfinite_steps,
            },
        )
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.total_steps:
            raise ConfigError(
                f"train.stop_at_step={self.stop_at_step} must be in [1, train.total_steps={self.total_steps}]",
                key="train.stop_at_step",
            )


@dataclass(frozen=True)
class LogConfig:
    """Metrics and health checks."""

    every_steps: int = 20  # full metrics (entropies, rank, throughput, memory, MFU) every N steps; losses always
    trackers: list[str] | None = None  # None = tensorboard if installed + wandb if installed and configured
    project_name: str = "pathdino"  # tracker project / run group name
    collapse_after_steps: int = 2_000  # no collapse warnings before this step
    collapse_drop_fraction: float = 0.5  # warn when rank or prototype usage falls below this x its best
    peak_tflops: float | None = None  # per device, for MFU; None = from the GPU name (unknown on CPU)

    def __post_init__(self) -> None:
        _check_fields("log", positive={"every_steps": self.every_steps})


@dataclass(frozen=True)
class RunConfig:
    """A whole training run; YAML sections have the field names."""

    data: DataConfig = field(metadata={"help": "the tile stores to train on"})
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # probes during training (pathdino.train.probe)

    def __post_init__(self) -> None:
        # One crop size: the backbone is built at the global crop size, so its img_size follows the one key.
        px, patch = self.augment.global_crop_px, self.model.backbone.patch_size
        if px % patch:
            raise ConfigError(
                f"augment.global_crop_px={px} is not divisible by model.backbone.patch_size={patch}; use a "
                f"multiple (e.g. {max(patch, px - px % patch)} or {px - px % patch + patch})",
                key="augment.global_crop_px",
            )
        if self.model.backbone.img_size != px:
            backbone = replace(self.model.backbone, img_size=px)
            object.__setattr__(self, "model", replace(self.model, backbone=backbone))


@dataclass(frozen=True)
class CropPlan:
    """Crop geometry of a step, read from the data sections (the one place that knows their field names)."""

    n_global: int
    global_px: int  # also the backbone's img_size (its position-embedding grid)
    n_local: int
    local_px: int
    mask_probability: float
    mask_ratio: tuple[float, float]  # (min, max) share of a masked crop's patches

    @property
    def mask_ratio_mean(self) -> float:
        return (self.mask_ratio[0] + self.mask_ratio[1]) / 2


def crop_plan(cfg: RunConfig) -> CropPlan:
    """The crops of ``cfg`` (a phase's config gives the phase's crops): the route of the crop size to every user."""
    a, m = cfg.augment, cfg.masks
    return CropPlan(
        n_global=a.n_global_crops,
        global_px=a.global_crop_px,
        n_local=a.n_local_crops,
        local_px=a.local_crop_px,
        mask_probability=m.mask_probability,
        mask_ratio=(m.mask_ratio[0], m.mask_ratio[1]),
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, build the typed config (ConfigError on any problem)."""
    data = apply_overrides(load_yaml(path) if path is not None else {}, list(overrides or []))
    _drop_derived_img_size(data)
    where = str(path) if path is not None else "config"
    try:
        return from_dict(RunConfig, data, where)
    except ConfigError as exc:  # a key given as key=value is blamed on the command line, not on the file
        raise blame_override(exc, where, overrides) from exc.__cause__


def _drop_derived_img_size(data: dict[str, Any]) -> None:
    """Configs written before the crop size had one key set ``model.backbone.img_size`` too: still read when it
    equals ``augment.global_crop_px`` (then dropped: it is derived), an error naming both keys when not."""
    model = data.get("model")
    backbone = model.get("backbone") if isinstance(model, dict) else None
    if not isinstance(backbone, dict) or "img_size" not in backbone:
        return
    augment = data.get("augment") if isinstance(data.get("augment"), dict) else {}
    crop_px = augment.get("global_crop_px", AugmentConfig.global_crop_px)
    img_size = backbone.pop("img_size")
    if img_size != crop_px:
        raise ConfigError(
            f"model.backbone.img_size={img_size} and augment.global_crop_px={crop_px} disagree: the backbone is "
            "built at the global crop size, which has one key now; remove model.backbone.img_size and set "
            "augment.global_crop_px",
            key="model.backbone.img_size",
        )


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (JSON/YAML)."""
    return to_dict(cfg)


# Keys that may legitimately change on resume: where and how often the run writes, not what it computes.
_RESUME_MAY_CHANGE = {
    "train.output_dir",
    "train.stop_at_step",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.checkpoint_at_end",
    "log.trackers",
    "log.every_steps",
    "data.num_workers",
    "data.resume_changed_stores",
}


def config_changes(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    may_change: set[str] | frozenset[str] = frozenset(_RESUME_MAY_CHANGE),
) -> list[str]:
    """``key: old -> new`` for every leaf that differs, ignoring keys that may legitimately change on resume
    (``may_change``: this trainer's; the slide trainer passes its own)."""
    old, new = flat_config(saved, raw=True), flat_config(current, raw=True)

    def shown(flat: dict[str, Any], key: str) -> str:
        # A key only one side has (a section null on the other side) is "unset", not None.
        return repr(flat[key]) if key in flat else "unset"

    # A key one side lacks and the other holds as None (a key added since, at None) is no change.
    return [
        f"{k}: {shown(old, k)} -> {shown(new, k)}"
        for k in sorted(set(old) | set(new))
        if k not in may_change and old.get(k) != new.get(k)
    ]


def per_process_batch(cfg: RunConfig, world_size: int) -> int:
    """Images per process per micro-step; ConfigError unless train.batch_size divides evenly."""
    t = cfg.train
    denom = world_size * t.grad_accum_steps
    if t.batch_size % denom:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by processes ({world_size}) x "
            f"train.grad_accum_steps ({t.grad_accum_steps}); choose a multiple of {denom}"
        )
    return t.batch_size // denom
