"""``build_run``: everything a training run needs before its first step, as one small dataclass.

Processes (accelerate) -> student/teacher pair and objective -> AdamW and schedules -> data -> resume point ->
health monitors. ``train`` (loop.py) only reads the result; nothing here runs a training step.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType
from torch import nn

from pathdino.losses import DINOLoss, IBOTPatchLoss, build_uniformity_loss
from pathdino.models import dinov2_train_flops_per_image, load_init_checkpoint
from pathdino.models.backbone import SUBSET_DROP_PATH_ABOVE, set_fused_attention
from pathdino.train.checkpoint import load_checkpoint, read_trainer_state
from pathdino.train.config import CropPlan, RunConfig, config_to_dict, crop_plan, per_process_batch, validate_config
from pathdino.train.distributed import check_launch, make_accelerator, shard_fsdp2
from pathdino.train.health import CollapseMonitor, MetricLogger, NonFiniteGuard, Throughput, peak_tflops
from pathdino.train.model import SSLModel, build_student_teacher
from pathdino.train.param_groups import param_groups
from pathdino.train.phases import describe_phase, phase_at, phase_config
from pathdino.train.probe import TrainingProbe, build_probe
from pathdino.train.runtime import (
    build_loader,
    check_compiler,
    config_changes,
    flat_config,
    loader_state_for,
    resume_point,
    setup_logging,
    trackers,
    tune_cpu_runtime,
    truncate_metrics,
)
from pathdino.train.schedules import Schedules, scaled_lr
from tiling.configio import ConfigError

log = logging.getLogger("pathdino.train")


@dataclass
class Run:
    """The parts of a training run, built by ``build_run`` (and again by ``switch_phase``); ``train`` mutates
    only ``step``."""

    base_cfg: RunConfig  # the config as given (all phases)
    cfg: RunConfig  # the config in effect in the current phase (its crops, img_size, batch; see phases.py)
    phase: int  # 0 = the run as ``augment``/``train`` say; i >= 1 = train.phases[i - 1]
    accelerator: Any
    use_fsdp: bool
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    is_main: bool
    plan: CropPlan
    batch_per_process: int  # images per process per micro-step
    student: SSLModel  # unwrapped: parameters, heads, health statistics
    teacher: SSLModel
    model: nn.Module  # the student as trained: DDP-wrapped, FSDP2-sharded or the student itself
    losses: nn.ModuleDict  # "dino" and "ibot", with their teacher centers
    uniformity: nn.Module | None  # KoLeo / KDE on the student's global CLS, or None
    optimizer: torch.optim.Optimizer
    clip_modules: dict[str, nn.Module]  # clipped separately (backbone, each head), as DINOv2
    schedules: Schedules
    loader: Any
    autocast: Any
    step: int  # optimizer steps done (the resume point's, then counting)
    resume_from: Path | None
    metrics: MetricLogger
    throughput: Throughput
    guard: NonFiniteGuard
    collapse: CollapseMonitor
    probe: TrainingProbe | None = None  # eval.probe: kNN / linear probe of the teacher every eval.probe period
    restore_cpu_runtime: Callable[[], None] = lambda: None  # undoes tune_cpu_runtime; train() calls it at the end


def build_run(cfg: RunConfig, resume: bool | str | None = None, loader: Any = None) -> Run:
    """Set up processes, models, objective, optimizer, data and resume state for ``train`` (see its docstring)."""
    tc = cfg.train
    out_dir = Path(tc.output_dir)
    accelerator = make_accelerator(tc.precision, str(out_dir), trackers(cfg.log.trackers))
    check_launch(accelerator)
    world, device, is_main = accelerator.num_processes, accelerator.device, accelerator.is_main_process
    restore_cpu_runtime = tune_cpu_runtime(device, tc.cpu_flush_denormal, tc.cpu_reuse_freed_memory)
    try:
        setup_logging(is_main)
        validate_config(cfg, world, check_stores=loader is None)
        if tc.phases and loader is not None and not hasattr(loader, "for_phase"):
            raise ConfigError("train.phases need a loader that serves each phase's crops: leave loader=None (tile "
                              "stores or train.synthetic_data), or give the loader a for_phase(config, batch) method")
        use_fsdp = _use_fsdp(cfg, accelerator)
        resume_from = resume_point(out_dir, resume)
        phase = phase_at(cfg, read_trainer_state(resume_from)["step"]) if resume_from is not None else 0
        pcfg = phase_config(cfg, phase)
        log.info("%d process(es) on %s, %d images per step (%d per process x %d micro-steps), %s%s",
                 world, device, pcfg.train.batch_size, per_process_batch(pcfg, world), pcfg.train.grad_accum_steps,
                 "FSDP2" if use_fsdp else "DDP" if world > 1 else "single process",
                 f", resuming from {resume_from}" if resume_from else "")
        if tc.phases:
            log.info("; ".join(describe_phase(cfg, i) for i in range(len(tc.phases) + 1)))
        parts, resumed = _build_phase(cfg, phase, accelerator, use_fsdp, resume_from, loader)
        metrics = _start_metrics(cfg, accelerator, out_dir, resumed["step"], resume_from)
        guard = NonFiniteGuard(tc.max_nonfinite_steps, total=resumed["nonfinite_total"])
        collapse = CollapseMonitor(cfg.log.collapse_after_steps, cfg.log.collapse_drop_fraction,
                                   cfg.model.dino_head.n_prototypes)
        collapse.best.update(resumed["collapse_best"])
        # The student's outputs are split views of one head pass; nothing modifies them in place, which is what FSDP2's
        # "returned a view tensor" warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        return Run(base_cfg=cfg, accelerator=accelerator, use_fsdp=use_fsdp, out_dir=out_dir,
                   rank=accelerator.process_index, world=world, device=device, is_main=is_main, step=resumed["step"],
                   resume_from=resume_from, metrics=metrics, guard=guard, collapse=collapse,
                   probe=build_probe(cfg, device), restore_cpu_runtime=restore_cpu_runtime, **parts)
    except BaseException:
        restore_cpu_runtime()  # a bad config or store must not leave the caller's process changed
        raise


def switch_phase(run: Run, checkpoint: Path) -> Run:
    """The run rebuilt for the phase of its current step from ``checkpoint`` (just written at this step), exactly
    as a resume from that checkpoint would build it: models at the phase's img_size (position embedding resampled
    on load), optimizer, schedules and loader for its crops and batch; counters and monitors carry on."""
    phase = phase_at(run.base_cfg, run.step)
    old_loader = run.loader
    if hasattr(old_loader, "close"):
        old_loader.close()
    for name in ("student", "teacher", "model", "losses", "optimizer", "clip_modules"):
        setattr(run, name, None)  # free the old phase's models before building the new ones
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    custom = old_loader if hasattr(old_loader, "for_phase") else None
    parts, _ = _build_phase(run.base_cfg, phase, run.accelerator, run.use_fsdp, checkpoint, custom)
    log.info("switched to %s; position embedding resampled to %d x %d patches", describe_phase(run.base_cfg, phase),
             *(2 * [parts["cfg"].model.backbone.img_size // parts["cfg"].model.backbone.patch_size]))
    return replace(run, **parts)


def _build_phase(cfg: RunConfig, phase: int, accelerator: Any, use_fsdp: bool, resume_from: Path | None,
                 loader: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The phase-dependent parts of a ``Run`` (as keyword arguments) and the resumed counters."""
    pcfg = phase_config(cfg, phase)
    tc, world, device, rank = pcfg.train, accelerator.num_processes, accelerator.device, accelerator.process_index
    batch_per_process = per_process_batch(pcfg, world)
    plan = crop_plan(pcfg)
    student, teacher, model, losses, uniformity = _build_models(pcfg, accelerator, use_fsdp, resume_from)
    optimizer = torch.optim.AdamW(
        param_groups(student.named_parameters(), pcfg.model.backbone.depth_, pcfg.optim.layerwise_decay,
                     pcfg.optim.patch_embed_lr_mult, pcfg.optim.decay_tokens),
        lr=0.0, betas=tuple(pcfg.optim.betas), weight_decay=0.0,
        # One fused kernel for all parameters (CUDA, and CPU since torch 2.4: the default there is a per-tensor
        # loop); FSDP2's sharded DTensors take the default path.
        fused=True if device.type in ("cuda", "cpu") and not use_fsdp else None)
    clip_modules = {"backbone": student.backbone, "dino_head": student.dino_head}
    if student.ibot_head is not None:
        clip_modules["ibot_head"] = student.ibot_head
    if loader is None:
        loader = build_loader(pcfg, plan, batch_per_process, rank, world, device)
    elif phase > 0 or tc.phases:
        loader = loader.for_phase(pcfg, batch_per_process)

    # Drop path etc. differ between processes; numpy / python RNGs are seeded too for libraries that use them.
    torch.manual_seed(tc.seed + 1 + rank)
    np.random.seed((tc.seed + 1 + rank) % 2**32)
    random.seed(tc.seed + 1 + rank)
    resumed = _load_resume_state(cfg, resume_from, model, teacher, losses, optimizer, loader, rank, world)
    parts = dict(cfg=pcfg, phase=phase, plan=plan, batch_per_process=batch_per_process, student=student,
                 teacher=teacher, model=model, losses=losses, uniformity=uniformity, optimizer=optimizer,
                 clip_modules=clip_modules, schedules=_schedules(pcfg), loader=loader,
                 autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"),
                 throughput=_throughput(pcfg, plan, device, world, student))
    return parts, resumed


def _use_fsdp(cfg: RunConfig, accelerator: Any) -> bool:
    tc = cfg.train
    # On CPU accelerate turns an FSDP config into plain MULTI_CPU but leaves ACCELERATE_USE_FSDP set.
    accelerate_fsdp = (accelerator.distributed_type == DistributedType.FSDP
                       or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
    if tc.parallel == "ddp" and accelerate_fsdp:
        raise ConfigError("train.parallel=ddp, but accelerate was launched with an FSDP config: use "
                          "train.parallel=auto (or fsdp2), or launch with configs/accelerate/multi_gpu.yaml")
    use_fsdp = tc.parallel == "fsdp2" or (tc.parallel == "auto" and accelerate_fsdp)
    if use_fsdp and accelerator.num_processes == 1:
        log.info("train.parallel=fsdp2 with one process: nothing to shard, running unsharded")
        use_fsdp = False
    return use_fsdp


def _build_models(cfg: RunConfig, accelerator: Any, use_fsdp: bool, resume_from: Path | None):
    """Student, teacher, the student as trained (wrapped or sharded), the DINO/iBOT losses and the regulariser."""
    tc, mc, lc = cfg.train, cfg.model, cfg.loss
    if tc.compile:
        check_compiler()
    device = accelerator.device
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    ibot_head_cfg = (mc.ibot_head or mc.dino_head) if mc.ibot_separate_head else None
    student, teacher = build_student_teacher(mc.backbone, mc.dino_head, ibot_head_cfg)
    if mc.init_checkpoint and resume_from is None:
        load_init_checkpoint(student.backbone, mc.init_checkpoint)
        teacher.load_state_dict(student.state_dict())
    student.to(device)
    teacher.to(device)
    if device.type == "cpu" and tc.precision == "bf16":
        for module in (student, teacher):  # measured faster there; see set_fused_attention
            set_fused_attention(module, False)
    losses = nn.ModuleDict({
        "dino": DINOLoss(mc.dino_head.n_prototypes, lc.student_temp, lc.targets, lc.center_momentum,
                         lc.sinkhorn_iterations),
        "ibot": IBOTPatchLoss((ibot_head_cfg or mc.dino_head).n_prototypes, lc.student_temp, lc.targets,
                              lc.center_momentum, lc.sinkhorn_iterations),
    }).to(device)
    uniformity = None
    if lc.uniformity == "koleo":
        uniformity = build_uniformity_loss("koleo", duplicate_tol=lc.koleo_duplicate_tol)
    elif lc.uniformity == "kde":
        uniformity = build_uniformity_loss("kde", kappa=lc.kde_kappa)
    if tc.compile:
        for model in (student, teacher):
            blocks = list(model.backbone.backbone.blocks)
            # A trimmed last block sees a new number of query rows every step (the iBOT masks): left eager rather
            # than recompiled per shape; it is a fifth of a block's work (pathdino/models/query_rows.py).
            for block in blocks[:-1] if model.trim_last_block else blocks:
                # In place (parameter names and checkpoints stay the same); one static graph each for the
                # teacher's and the student's global crops and the student's local crops, shared by all blocks.
                block.compile(dynamic=False)
    if use_fsdp:
        shard_fsdp2(student, tc.precision, tc.fsdp_reshard_after_forward)
        shard_fsdp2(teacher, tc.precision, tc.fsdp_reshard_after_forward)
        model = student
    else:
        model = accelerator.prepare_model(student) if accelerator.num_processes > 1 else student  # DDP
    return student, teacher, model, losses, uniformity


def _schedules(cfg: RunConfig) -> Schedules:
    tc, oc, lc = cfg.train, cfg.optim, cfg.loss
    return Schedules(
        total_steps=tc.total_steps, peak_lr=scaled_lr(oc.base_lr, tc.batch_size, oc.lr_scaling),
        min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, weight_decay=oc.weight_decay,
        weight_decay_end=oc.weight_decay_end, momentum_teacher=oc.momentum_teacher,
        momentum_teacher_end=oc.momentum_teacher_end, teacher_temp=lc.teacher_temp,
        teacher_temp_warmup_start=lc.teacher_temp_warmup_start,
        teacher_temp_warmup_steps=lc.teacher_temp_warmup_steps, freeze_last_layer_steps=oc.freeze_last_layer_steps)


def _load_resume_state(cfg: RunConfig, resume_from: Path | None, model: nn.Module, teacher: nn.Module,
                       losses: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, rank: int,
                       world: int) -> dict[str, Any]:
    """Load the checkpoint (if any) into the parts; returns step, counters and collapse bests to continue from."""
    if resume_from is None:
        return {"step": 0, "nonfinite_total": 0, "collapse_best": {}}
    state = load_checkpoint(resume_from, model, teacher, losses, optimizer)
    step = state["step"]
    loader.load_state_dict(loader_state_for(state["loader_states"], rank, world))
    if not state["rng_restored"]:
        torch.manual_seed(cfg.train.seed + 1 + rank + 1_000_003 * step)
        log.warning("checkpoint has no RNG state for rank %d (saved with %d processes): reseeded",
                    rank, state.get("world_size"))
    if state.get("world_size") != world:
        log.info("resharded: checkpoint saved with %s processes, resumed with %d", state.get("world_size"), world)
    # Checkpoints hold the config in effect for their weights (phases.py): compare with that phase's.
    changed = config_changes(state.get("config", {}), config_to_dict(phase_config(cfg, state.get("phase", 0))))
    if changed:
        log.warning("config differs from the checkpoint's in %d key(s): %s", len(changed), "; ".join(changed[:8]))
    return {"step": step, "nonfinite_total": state.get("nonfinite_total", 0),
            "collapse_best": state.get("collapse_best", {})}


def _start_metrics(cfg: RunConfig, accelerator: Any, out_dir: Path, step: int,
                   resume_from: Path | None) -> MetricLogger:
    """config.yaml, metrics.jsonl cut back to the resume point, trackers, and the start/resume event."""
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        truncate_metrics(out_dir / "metrics.jsonl", step)
    accelerator.wait_for_everyone()
    metrics = MetricLogger(out_dir / "metrics.jsonl", accelerator, enabled=accelerator.is_main_process)
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(cfg.log.project_name, config=flat_config(config_to_dict(cfg)))
    metrics.write({"event": "resume" if resume_from else "start", "step": step,
                   "world_size": accelerator.num_processes,
                   "checkpoint": str(resume_from) if resume_from else None}, step, to_trackers=False)
    return metrics


def _throughput(cfg: RunConfig, plan: CropPlan, device: torch.device, world: int, student: nn.Module) -> Throughput:
    """Throughput/MFU for this phase's crops and batch."""
    mc = cfg.model
    ibot_head_cfg = (mc.ibot_head or mc.dino_head) if mc.ibot_separate_head else None
    flops = dinov2_train_flops_per_image(
        mc.backbone, mc.dino_head, ibot_head_cfg or mc.dino_head, plan.global_px, plan.local_px, plan.n_global,
        plan.n_local, plan.mask_probability, plan.mask_ratio_mean,
        subset_drop_path=mc.backbone.drop_path_rate if mc.backbone.drop_path_rate > SUBSET_DROP_PATH_ABOVE else 0.0,
        trim_last_block=bool(getattr(student, "trim_last_block", False)))
    peak = peak_tflops(device, cfg.train.precision, cfg.log.peak_tflops)
    log.info("model: %.1fM student parameters; %s", sum(p.numel() for p in student.parameters()) / 1e6,
             flops.summary())
    return Throughput(cfg.train.batch_size, flops.total, peak * world if peak else None)
