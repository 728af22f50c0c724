"""Everything a DINOv2 run needs before its first step, as typed parts with one constructor each.

``start_phase``: the config checked, the resume point found, then ``build_phase``: for one phase (its config
resolved once, ``phases.phase_config``), the student/teacher pair and objective -> AdamW and schedules -> data ->
the checkpoint loaded (a resume, or a phase switch). ``start_monitors``: metrics, the non-finite guard, collapse
warnings, probes, which live across phases. ``train`` (loop.py) only reads these; nothing here runs a step.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathdino.losses import DINOLoss, IBOTPatchLoss, build_uniformity_loss
from pathdino.models import dinov2_train_flops_per_image, load_init_checkpoint
from pathdino.models.backbone import SUBSET_DROP_PATH_ABOVE, set_fused_attention
from pathdino.train.checkpoint import CheckpointError, load_checkpoint, read_trainer_state, resume_point
from pathdino.train.config import CropPlan, RunConfig, config_changes, config_to_dict, crop_plan, per_process_batch
from pathdino.train.context import RunContext
from pathdino.train.distill import DistillTeacher, build_distill_teacher, check_resumed_teacher, distill_units
from pathdino.train.distributed import shard_fsdp2
from pathdino.train.health import CollapseMonitor, NonFiniteGuard, Throughput, peak_tflops
from pathdino.train.host import check_compiler
from pathdino.train.loader import Loader, PhasedLoader, build_loader, check_loader, close_loader, loader_state_for
from pathdino.train.logs import MetricLogger, open_metrics
from pathdino.train.model import SSLModel, build_student_teacher
from pathdino.train.param_groups import param_groups
from pathdino.train.phases import describe_phase, phase_at, phase_config, phase_end
from pathdino.train.probe import TrainingProbe, build_probe
from pathdino.train.schedules import Schedules, scaled_lr
from pathdino.train.step import Objective, StepParts
from pathdino.train.validate import validate_config

log = logging.getLogger("pathdino.train")


@dataclass(frozen=True)
class Phase:
    """One phase of the run and everything built for it; a phase switch builds the next one whole."""

    index: int  # 0 = the run as ``augment``/``train`` say; i >= 1 = train.phases[i - 1]
    cfg: RunConfig  # the config in effect in this phase (its crops, img_size, batch; phases.phase_config)
    end_step: int  # the optimizer step at which the phase ends (the next one's first, or train.total_steps)
    plan: CropPlan  # this phase's crops
    batch_per_process: int  # images per process per micro-step
    parts: StepParts  # models, objective, optimizer
    schedules: Schedules
    loader: Loader
    throughput: Throughput


@dataclass(frozen=True)
class Progress:
    """Where the run stands: optimizer steps done, and the counters a checkpoint carries over."""

    step: int = 0
    nonfinite_total: int = 0
    collapse_best: dict[str, float] = field(default_factory=dict)
    probe_best: dict[str, Any] = field(default_factory=dict)  # the best probe score so far (ProbeMonitor.state)
    checkpoint: Path | None = None  # the checkpoint it was loaded from (None: from scratch)


@dataclass(frozen=True)
class Monitors:
    """What watches the whole run, across phases: the metrics log, the NaN/inf guard, collapse warnings, probes."""

    metrics: MetricLogger
    guard: NonFiniteGuard
    collapse: CollapseMonitor
    probe: TrainingProbe | None  # eval.probe: kNN / linear probe of the teacher every eval.probe period


def start_phase(
    ctx: RunContext, cfg: RunConfig, *, resume: bool | str | None, loader: Loader | None
) -> tuple[Phase, Progress]:
    """Check the config (and ``loader``), find the resume point, and build the phase it falls in."""
    catalog = validate_config(cfg, ctx.world, check_stores=loader is None)
    if catalog is not None:
        log.info("training on %s", catalog.uses)
    if loader is not None:
        check_loader(loader, cfg)
    checkpoint = resume_point(ctx.out_dir, resume)
    index = phase_at(cfg, read_trainer_state(checkpoint)["step"]) if checkpoint is not None else 0
    if cfg.train.phases:
        log.info("; ".join(describe_phase(cfg, i) for i in range(len(cfg.train.phases) + 1)))
    # The student's outputs are split views of one head pass; nothing modifies them in place, which is what FSDP2's
    # "returned a view tensor" warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    phase, progress = build_phase(ctx, cfg, index=index, checkpoint=checkpoint, loader=loader)
    log.info(
        "%d process(es) on %s, %d images per step (%d per process x %d micro-steps), %s%s",
        ctx.world,
        ctx.device,
        phase.cfg.train.batch_size,
        phase.batch_per_process,
        phase.cfg.train.grad_accum_steps,
        "FSDP2" if ctx.use_fsdp else "DDP" if ctx.world > 1 else "single process",
        f", resumed from {checkpoint}" if checkpoint else "",
    )
    return phase, progress


def build_phase(
    ctx: RunContext, cfg: RunConfig, *, index: int, checkpoint: Path | None, loader: Loader | None
) -> tuple[Phase, Progress]:
    """Phase ``index`` of the run ``cfg``: its config resolved once, models, optimizer, schedules and data, then
    ``checkpoint`` loaded into them (a resume, or the switch into this phase). ``loader``: a ``Loader`` given to
    ``train`` (asked ``for_phase`` when the run has phases), else one is built for the phase's crops."""
    pcfg = phase_config(cfg, index)
    batch_per_process = per_process_batch(pcfg, ctx.world)
    plan = crop_plan(pcfg)
    parts = _build_parts(ctx, pcfg, checkpoint)
    if loader is None:
        loader = build_loader(
            pcfg, plan, batch_per_process=batch_per_process, rank=ctx.rank, world=ctx.world, device=ctx.device
        )
    elif isinstance(loader, PhasedLoader) and cfg.train.phases:
        loader = loader.for_phase(pcfg, batch_per_process)

    # Drop path etc. differ between processes; numpy / python RNGs are seeded too for libraries that use them.
    seed = pcfg.train.seed + 1 + ctx.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    progress = _load_checkpoint(ctx, cfg, checkpoint, parts=parts, loader=loader)
    phase = Phase(
        index=index,
        cfg=pcfg,
        end_step=phase_end(cfg, index),
        plan=plan,
        batch_per_process=batch_per_process,
        parts=parts,
        schedules=build_schedules(pcfg),
        loader=loader,
        throughput=_throughput(ctx, pcfg, plan=plan, student=parts.student),
    )
    return phase, progress


def switch_phase(ctx: RunContext, cfg: RunConfig, *, index: int, checkpoint: Path, old_loader: Loader) -> Phase:
    """Phase ``index``, built from ``checkpoint`` (just written at the previous phase's last step) exactly as a
    resume from it would build it: models at the phase's img_size (position embedding resampled on load),
    optimizer, schedules and loader for its crops and batch. Counters and monitors carry on (not the phase's).

    The caller drops the previous phase first, so that its models are freed before these are built."""
    close_loader(old_loader)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    given = old_loader if isinstance(old_loader, PhasedLoader) else None
    phase, _ = build_phase(ctx, cfg, index=index, checkpoint=checkpoint, loader=given)
    grid = phase.cfg.model.backbone.img_size // phase.cfg.model.backbone.patch_size
    log.info("switched to %s; position embedding resampled to %d x %d patches", describe_phase(cfg, index), grid, grid)
    return phase


def start_monitors(ctx: RunContext, cfg: RunConfig, progress: Progress, *, cleanup: contextlib.ExitStack) -> Monitors:
    """Metrics (config.yaml, metrics.jsonl cut back to the resume point, trackers), the guard and the collapse
    monitor continuing the checkpoint's counters, and the probe (at the run's first crop size)."""
    metrics = open_metrics(
        ctx.accelerator,
        ctx.out_dir,
        config=config_to_dict(cfg),
        step=progress.step,
        project_name=cfg.log.project_name,
        resumed_from=progress.checkpoint,
    )
    cleanup.callback(metrics.close)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, total=progress.nonfinite_total)
    collapse = CollapseMonitor(
        cfg.log.collapse_after_steps, cfg.log.collapse_drop_fraction, cfg.model.dino_head.n_prototypes
    )
    collapse.best.update(progress.collapse_best)
    a = cfg.augment
    probe = build_probe(
        cfg.eval.probe, crop_px=crop_plan(cfg).global_px, mean=tuple(a.mean), std=tuple(a.std), device=ctx.device
    )
    if probe is not None:
        probe.best.load(progress.probe_best)
    return Monitors(metrics=metrics, guard=guard, collapse=collapse, probe=probe)


def _build_parts(ctx: RunContext, cfg: RunConfig, checkpoint: Path | None) -> StepParts:
    """Student, teacher, the student as trained (wrapped or sharded), losses, regulariser, AdamW, clip groups."""
    tc, device = cfg.train, ctx.device
    distill = build_distill_teacher(cfg, device)
    student, teacher, model, gram_teacher = _build_models(ctx, cfg, checkpoint, distill=distill)
    losses, uniformity = _build_losses(cfg, device)
    optimizer = torch.optim.AdamW(
        param_groups(
            student.named_parameters(),
            cfg.model.backbone.depth_,
            layerwise_decay=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
            decay_tokens=cfg.optim.decay_tokens,
        ),
        lr=0.0,
        betas=tuple(cfg.optim.betas),
        weight_decay=0.0,
        # One fused kernel for all parameters (CUDA, and CPU since torch 2.4: the default there is a per-tensor
        # loop); FSDP2's sharded DTensors take the default path.
        fused=True if device.type in ("cuda", "cpu") and not ctx.use_fsdp else None,
    )
    clip_modules = {"backbone": student.backbone, "dino_head": student.dino_head}
    if student.ibot_head is not None:
        clip_modules["ibot_head"] = student.ibot_head
    if student.distill_proj is not None:
        clip_modules["distill_proj"] = student.distill_proj
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    return StepParts(
        student=student,
        teacher=teacher,
        model=model,
        losses=losses,
        uniformity=uniformity,
        optimizer=optimizer,
        clip_modules=clip_modules,
        autocast=autocast,
        objective=_objective(cfg),
        gram_teacher=gram_teacher,
        distill=distill,
    )


def _objective(cfg: RunConfig) -> Objective:
    """The objective's numbers for the step functions (which see no config)."""
    lc, oc = cfg.loss, cfg.optim
    return Objective(
        dino_weight=lc.dino_weight,
        ibot_weight=lc.ibot_weight,
        uniformity_weight=lc.uniformity_weight,
        student_temp=lc.student_temp,
        update_centers=lc.targets == "centering",
        grad_accum_steps=cfg.train.grad_accum_steps,
        clip_grad=oc.clip_grad,
        freeze_last_layer=oc.freeze_last_layer,
        gram_input_scale=lc.gram.input_scale,
        gram_remove_negative=lc.gram.remove_negative,
        distill_cls_weight=cfg.train.distill.cls_weight,
        distill_patch_weight=cfg.train.distill.patch_weight,
    )


def _build_models(
    ctx: RunContext, cfg: RunConfig, checkpoint: Path | None, *, distill: DistillTeacher | None
) -> tuple[SSLModel, SSLModel, nn.Module, nn.Module | None]:
    """Student, teacher, the student as trained (DDP-wrapped, FSDP2-sharded, or itself), on the device, and the
    Gram teacher (loss.gram; a plain copy of the teacher's backbone, refreshed by the loop; None without it)."""
    tc, mc, device = cfg.train, cfg.model, ctx.device
    if tc.compile:
        check_compiler()
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    student, teacher = build_student_teacher(
        mc.backbone,
        mc.dino_head,
        mc.ibot_head_,
        distill_dim=distill.embed_dim if distill is not None and distill.kind == "encoder" else None,
    )
    if mc.init_checkpoint and checkpoint is None:
        load_init_checkpoint(student.backbone, mc.init_checkpoint, layout=True)
        teacher.load_state_dict(student.state_dict())
    student.to(device)
    teacher.to(device)
    if device.type == "cpu" and tc.precision == "bf16":
        for module in (student, teacher):  # measured faster there; see set_fused_attention
            set_fused_attention(module, False)
    gram_teacher = copy.deepcopy(teacher.backbone).requires_grad_(False).eval() if cfg.loss.gram.weight else None
    if tc.compile:
        for module in (student, teacher):
            blocks = list(module.backbone.backbone.blocks)
            # A trimmed last block sees a new number of query rows every step (the iBOT masks): left eager rather
            # than recompiled per shape; it is a fifth of a block's work (pathdino/models/query_rows.py).
            for block in blocks[:-1] if module.trim_last_block else blocks:
                # In place (parameter names and checkpoints stay the same); one static graph each for the
                # teacher's and the student's global crops and the student's local crops, shared by all blocks.
                block.compile(dynamic=False)
    if ctx.use_fsdp:
        for module in (student, teacher):
            shard_fsdp2(
                module, module.fsdp_units(), precision=tc.precision, reshard_after_forward=tc.fsdp_reshard_after_forward
            )
        if distill is not None:  # a large teacher is sharded like the student (inference only)
            shard_fsdp2(
                distill.model,
                distill_units(distill),
                precision=tc.precision,
                reshard_after_forward=tc.fsdp_reshard_after_forward,
            )
        return student, teacher, student, gram_teacher
    model = ctx.accelerator.prepare_model(student) if ctx.world > 1 else student  # DDP
    return student, teacher, model, gram_teacher


def _build_losses(cfg: RunConfig, device: torch.device) -> tuple[nn.ModuleDict, nn.Module | None]:
    """The DINO and iBOT losses (with their teacher centers) and the uniformity regulariser (None: none)."""
    mc, lc = cfg.model, cfg.loss
    losses = nn.ModuleDict(
        {
            "dino": DINOLoss(
                mc.dino_head.n_prototypes, lc.student_temp, lc.targets, lc.center_momentum, lc.sinkhorn_iterations
            ),
            "ibot": IBOTPatchLoss(
                (mc.ibot_head_ or mc.dino_head).n_prototypes,
                lc.student_temp,
                lc.targets,
                lc.center_momentum,
                lc.sinkhorn_iterations,
            ),
        }
    ).to(device)
    uniformity = None
    if lc.uniformity == "koleo":
        uniformity = build_uniformity_loss("koleo", duplicate_tol=lc.koleo_duplicate_tol)
    elif lc.uniformity == "kde":
        uniformity = build_uniformity_loss("kde", kappa=lc.kde_kappa)
    return losses, uniformity


def build_schedules(cfg: RunConfig) -> Schedules:
    """Every per-step value of a run (lr, weight decay, momentum, temperatures, freezes) from its config."""
    tc, oc, lc = cfg.train, cfg.optim, cfg.loss
    return Schedules(
        total_steps=tc.total_steps,
        peak_lr=scaled_lr(oc.base_lr, tc.batch_size, oc.lr_scaling),
        min_lr=oc.min_lr,
        warmup_steps=oc.warmup_steps_in(tc.total_steps),
        weight_decay=oc.weight_decay,
        weight_decay_end=oc.weight_decay_end,
        momentum_teacher=oc.momentum_teacher,
        momentum_teacher_end=oc.momentum_teacher_end,
        teacher_temp=lc.teacher_temp,
        teacher_temp_warmup_start=lc.teacher_temp_warmup_start,
        teacher_temp_warmup_steps=lc.teacher_temp_warmup_steps,
        freeze_last_layer_steps=oc.freeze_last_layer_steps,
        freeze_backbone_steps=tc.freeze_backbone_steps,
        backbone_lr_ramp_steps=tc.backbone_lr_ramp_steps,
        gram_weight=lc.gram.weight,
        gram_start_step=lc.gram.start_step,
        gram_refresh_every_steps=lc.gram.refresh_every_steps,
    )


def _load_checkpoint(
    ctx: RunContext, cfg: RunConfig, checkpoint: Path | None, *, parts: StepParts, loader: Loader
) -> Progress:
    """Load ``checkpoint`` (if any) into the parts and the loader; returns the progress to continue from."""
    if checkpoint is None:
        return Progress()
    try:
        state = load_checkpoint(checkpoint, parts.checkpoint_parts())
    except CheckpointError as exc:
        saved = read_trainer_state(checkpoint)
        now = config_to_dict(phase_config(cfg, saved.get("phase", 0)))
        model = [c for c in config_changes(saved.get("config", {}), now) if c.startswith("model.")]
        if not model:
            raise
        raise CheckpointError(
            f"cannot resume from {checkpoint}: the model config differs from the checkpoint's "
            f"({'; '.join(model[:6])}); resume with the checkpoint's model settings, or start a "
            "new run in another train.output_dir"
        ) from exc
    check_resumed_teacher(state.get("distill_teacher"), parts.distill)
    step = state["step"]
    loader.load_state_dict(loader_state_for(state["loader_states"], ctx.rank, ctx.world))
    if not state["rng_restored"]:
        torch.manual_seed(cfg.train.seed + 1 + ctx.rank + 1_000_003 * step)
        log.warning(
            "checkpoint has no RNG state for rank %d (saved with %d processes): reseeded",
            ctx.rank,
            state.get("world_size"),
        )
    if state.get("world_size") != ctx.world:
        log.info("resharded: checkpoint saved with %s processes, resumed with %d", state.get("world_size"), ctx.world)
    # Checkpoints hold the config in effect for their weights (phases.py): compare with that phase's.
    changed = config_changes(state.get("config", {}), config_to_dict(phase_config(cfg, state.get("phase", 0))))
    if changed:
        log.warning("config differs from the checkpoint's in %d key(s): %s", len(changed), "; ".join(changed[:8]))
    return Progress(
        step=step,
        nonfinite_total=state.get("nonfinite_total", 0),
        collapse_best=state.get("collapse_best", {}),
        probe_best=state.get("probe_best", {}),
        checkpoint=checkpoint,
    )


def _throughput(ctx: RunContext, cfg: RunConfig, *, plan: CropPlan, student: SSLModel) -> Throughput:
    """Throughput/MFU for this phase's crops and batch."""
    mc = cfg.model
    flops = dinov2_train_flops_per_image(
        mc.backbone,
        mc.dino_head,
        mc.ibot_head_ or mc.dino_head,
        plan.global_px,
        plan.local_px,
        plan.n_global,
        plan.n_local,
        plan.mask_probability,
        plan.mask_ratio_mean,
        subset_drop_path=mc.backbone.drop_path_rate if mc.backbone.drop_path_rate > SUBSET_DROP_PATH_ABOVE else 0.0,
        trim_last_block=student.trim_last_block,
    )
    peak = peak_tflops(ctx.device, cfg.train.precision, cfg.log.peak_tflops)
    log.info("model: %.1fM student parameters; %s", sum(p.numel() for p in student.parameters()) / 1e6, flops.summary())
    return Throughput(cfg.train.batch_size, flops.total, peak * ctx.world if peak else None)
