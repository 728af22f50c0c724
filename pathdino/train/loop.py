"""The DINOv2 training loop: one function, read top to bottom.

``train(cfg)`` sets up the processes (accelerate), the student/teacher pair, the objective, the optimizer, the data
and the resume point, then runs optimizer steps: teacher forward -> student forward -> DINO + iBOT + KoLeo/KDE
-> backward -> NaN/inf check (all processes agree) -> clip -> AdamW -> EMA teacher -> teacher centers -> log ->
checkpoint. Schedules are functions of the optimizer step (``schedules.py``); parameter groups carry their
multipliers (``param_groups.py``); checkpoints are full-state and atomic (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate.utils import DistributedType
from torch import nn

from pathdino.losses import DINOLoss, IBOTPatchLoss, build_uniformity_loss
from pathdino.models import dinov2_train_flops_per_image, load_init_checkpoint
from pathdino.models.backbone import set_fused_attention
from pathdino.train.checkpoint import load_checkpoint, save_checkpoint
from pathdino.train.config import RunConfig, config_to_dict, crop_plan, per_process_batch, validate_config
from pathdino.train.distributed import (
    all_reduce_sum_,
    check_launch,
    gradient_sync,
    make_accelerator,
    shard_fsdp2,
)
from pathdino.train.health import (
    CollapseMonitor,
    MetricLogger,
    NonFiniteGuard,
    Throughput,
    effective_rank,
    entropy,
    memory_mb,
    peak_tflops,
)
from pathdino.train.model import build_student_teacher, ema_update_
from pathdino.train.param_groups import apply_schedule, drop_frozen_grads, param_groups
from pathdino.train.probe import build_probe, probe_metrics
from pathdino.train.runtime import (
    build_loader,
    config_changes,
    flat_config,
    gather_loader_states,
    install_stop_handlers,
    loader_state_for,
    restore_stop_handlers,
    resume_point,
    setup_logging,
    trackers,
    truncate_metrics,
)
from pathdino.train.schedules import Schedules, scaled_lr
from tiling.configio import ConfigError

log = logging.getLogger("pathdino.train")

LOSS_TERMS = ("loss", "dino_global", "dino_local", "ibot", "uniformity", "masked_tokens")
HEALTH_TERMS = ("teacher_entropy", "teacher_usage_entropy", "student_entropy", "embedding_rank")


def train(cfg: RunConfig, resume: bool | str | None = None, loader: Any = None) -> dict[str, Any]:
    """Train (or resume) as ``cfg`` says; every process of the launch calls this. Returns a summary.

    ``resume``: None/False starts fresh (error if the output directory already holds checkpoints); True resumes
    from the newest checkpoint there (fresh start if none); a path resumes from that checkpoint. ``loader``
    replaces the tile-store loader (anything with the ``TrainLoader`` contract), e.g. for tests.
    """
    tc, oc, lc = cfg.train, cfg.optim, cfg.loss
    out_dir = Path(tc.output_dir)

    # ---- processes ------------------------------------------------------------------------------------------
    accelerator = make_accelerator(tc.precision, str(out_dir), trackers(cfg.log.trackers))
    check_launch(accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    is_main = accelerator.is_main_process
    setup_logging(is_main)
    validate_config(cfg, world, check_stores=loader is None)
    batch_per_process = per_process_batch(cfg, world)
    plan = crop_plan(cfg)
    # On CPU accelerate turns an FSDP config into plain MULTI_CPU but leaves ACCELERATE_USE_FSDP set.
    accelerate_fsdp = (accelerator.distributed_type == DistributedType.FSDP
                       or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true")
    if tc.parallel == "ddp" and accelerate_fsdp:
        raise ConfigError("train.parallel=ddp, but accelerate was launched with an FSDP config: use "
                          "train.parallel=auto (or fsdp2), or launch with configs/accelerate/multi_gpu.yaml")
    use_fsdp = tc.parallel == "fsdp2" or (tc.parallel == "auto" and accelerate_fsdp)
    if use_fsdp and world == 1:
        log.info("train.parallel=fsdp2 with one process: nothing to shard, running unsharded")
        use_fsdp = False
    resume_from = resume_point(out_dir, resume)
    log.info("%d process(es) on %s, %d images per step (%d per process x %d micro-steps), %s%s",
             world, device, tc.batch_size, batch_per_process, tc.grad_accum_steps,
             "FSDP2" if use_fsdp else "DDP" if world > 1 else "single process",
             f", resuming from {resume_from}" if resume_from else "")

    # ---- student, teacher, objective --------------------------------------------------------------------------
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    mc = cfg.model
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
        for block in [*student.backbone.backbone.blocks, *teacher.backbone.backbone.blocks]:
            # In place (parameter names and checkpoints stay the same); one static graph each for the teacher's
            # and the student's global crops and the student's local crops, shared by all blocks.
            block.compile(dynamic=False)
    if use_fsdp:
        shard_fsdp2(student, tc.precision, tc.fsdp_reshard_after_forward)
        shard_fsdp2(teacher, tc.precision, tc.fsdp_reshard_after_forward)
        model = student
    else:
        model = accelerator.prepare_model(student) if world > 1 else student  # DDP across processes
    optimizer = torch.optim.AdamW(
        param_groups(student.named_parameters(), mc.backbone.depth_, oc.layerwise_decay, oc.patch_embed_lr_mult,
                     oc.decay_tokens),
        lr=0.0, betas=tuple(oc.betas), weight_decay=0.0,
        fused=True if device.type == "cuda" and not use_fsdp else None)  # one kernel per step on GPU
    clip_modules = {"backbone": student.backbone, "dino_head": student.dino_head}
    if student.ibot_head is not None:
        clip_modules["ibot_head"] = student.ibot_head
    schedules = Schedules(
        total_steps=tc.total_steps, peak_lr=scaled_lr(oc.base_lr, tc.batch_size, oc.lr_scaling),
        min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, weight_decay=oc.weight_decay,
        weight_decay_end=oc.weight_decay_end, momentum_teacher=oc.momentum_teacher,
        momentum_teacher_end=oc.momentum_teacher_end, teacher_temp=lc.teacher_temp,
        teacher_temp_warmup_start=lc.teacher_temp_warmup_start,
        teacher_temp_warmup_steps=lc.teacher_temp_warmup_steps, freeze_last_layer_steps=oc.freeze_last_layer_steps)

    # ---- data -------------------------------------------------------------------------------------------------
    if loader is None:
        loader = build_loader(cfg, plan, batch_per_process, rank, world, device)

    # ---- resume -------------------------------------------------------------------------------------------------
    step, nonfinite_total, collapse_best = 0, 0, {}
    # Drop path etc. differ between processes; numpy / python RNGs are seeded too for libraries that use them.
    torch.manual_seed(tc.seed + 1 + rank)
    np.random.seed((tc.seed + 1 + rank) % 2**32)
    random.seed(tc.seed + 1 + rank)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, teacher, losses, optimizer)
        step, nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        collapse_best = state.get("collapse_best", {})
        loader.load_state_dict(loader_state_for(state["loader_states"], rank, world))
        if not state["rng_restored"]:
            torch.manual_seed(tc.seed + 1 + rank + 1_000_003 * step)
            log.warning("checkpoint has no RNG state for rank %d (saved with %d processes): reseeded",
                        rank, state.get("world_size"))
        if state.get("world_size") != world:
            log.info("resharded: checkpoint saved with %s processes, resumed with %d", state.get("world_size"), world)
        changed = config_changes(state.get("config", {}), config_to_dict(cfg))
        if changed:
            log.warning("config differs from the checkpoint's in %d key(s): %s", len(changed), "; ".join(changed[:8]))
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        truncate_metrics(out_dir / "metrics.jsonl", step)
    accelerator.wait_for_everyone()
    metrics = MetricLogger(out_dir / "metrics.jsonl", accelerator, enabled=is_main)
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(cfg.log.project_name, config=flat_config(config_to_dict(cfg)))
    metrics.write({"event": "resume" if resume_from else "start", "step": step, "world_size": world,
                   "checkpoint": str(resume_from) if resume_from else None}, step, to_trackers=False)

    # ---- health -------------------------------------------------------------------------------------------------
    flops = dinov2_train_flops_per_image(
        mc.backbone, mc.dino_head, ibot_head_cfg or mc.dino_head, plan.global_px, plan.local_px, plan.n_global,
        plan.n_local, plan.mask_probability, plan.mask_ratio_mean)
    peak = peak_tflops(device, tc.precision, cfg.log.peak_tflops)
    log.info("model: %.1fM student parameters; %s", sum(p.numel() for p in student.parameters()) / 1e6,
             flops.summary())
    throughput = Throughput(tc.batch_size, flops.total, peak * world if peak else None)
    guard = NonFiniteGuard(tc.max_nonfinite_steps, total=nonfinite_total)
    collapse = CollapseMonitor(cfg.log.collapse_after_steps, cfg.log.collapse_drop_fraction,
                               mc.dino_head.n_prototypes)
    collapse.best.update(collapse_best)
    probe = build_probe(cfg, device)
    # The student's outputs are slices of one head pass; nothing modifies them in place, which is what FSDP2's
    # "returned a view tensor" warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    stop_requested = install_stop_handlers()

    # ---- the loop ---------------------------------------------------------------------------------------------
    stop_at = tc.stop_at_step or tc.total_steps
    last_checkpoint = str(resume_from) if resume_from else None
    data_iter = iter(loader)
    model.train()
    teacher.eval()
    stopped_early = False
    try:
        if step == 0 and (probed := probe_metrics(probe, step, teacher)):  # the initial teacher: probes' baseline
            metrics.write({"step": 0, **probed}, 0)
        while step < stop_at:
            values = schedules.at(step)
            apply_schedule(optimizer, values)
            log_now = (step + 1) % cfg.log.every_steps == 0 or step + 1 == stop_at
            sums = torch.zeros(len(LOSS_TERMS), device=device)
            center_inputs = []
            for micro in range(tc.grad_accum_steps):
                t0 = time.perf_counter()
                batch = next(data_iter).to(device)
                throughput.add_data_wait(time.perf_counter() - t0)
                n_global = batch.n_global
                # The one host sync of the micro-step: where the masked patches are (teacher, student, iBOT).
                mask_idx = batch.masks.flatten().nonzero().squeeze(1)
                token_weights = (1.0 / batch.masks.sum(dim=1).clamp_min(1).float()).index_select(
                    0, torch.div(mask_idx, batch.masks.shape[1], rounding_mode="floor"))
                with gradient_sync(model, enabled=micro == tc.grad_accum_steps - 1):
                    with autocast:
                        with torch.no_grad():
                            t_out = teacher(batch.global_crops, None, batch.masks, teacher=True,
                                            mask_indices=mask_idx)
                            # Centers are updated only after the step is known to be finite (below).
                            dino_t = losses["dino"].teacher_targets(t_out["global_cls_logits"], values.teacher_temp,
                                                                    update_center=False)
                            ibot_t = losses["ibot"].teacher_targets(t_out["masked_patch_logits"],
                                                                    values.teacher_temp, update_center=False)
                        s_out = model(batch.global_crops, batch.local_crops, batch.masks, mask_indices=mask_idx)
                        dino_global, dino_local = losses["dino"].forward_terms(
                            s_out["global_cls_logits"], s_out["local_cls_logits"], dino_t, n_global)
                        ibot = losses["ibot"](s_out["masked_patch_logits"], ibot_t, batch.masks, n_global,
                                              token_weights=token_weights)
                        reg = (uniformity(s_out["global_cls"], n_chunks=n_global) if uniformity is not None
                               else dino_global.new_zeros(()))
                        loss = (lc.dino_weight * (dino_global + dino_local) + lc.ibot_weight * ibot
                                + lc.uniformity_weight * reg)
                    (loss / tc.grad_accum_steps).backward()
                n_masked = float(mask_idx.shape[0])
                terms = torch.stack([loss.detach(), dino_global.detach(), dino_local.detach(), ibot.detach(),
                                     reg.detach().float(), loss.new_tensor(n_masked)])
                sums += terms.float() / tc.grad_accum_steps
                if lc.targets == "centering":
                    center_inputs.append((t_out["global_cls_logits"].detach(), t_out["masked_patch_logits"].detach()))

            drop_frozen_grads(optimizer, values, oc.freeze_last_layer)
            grad_norms = _clip_gradients(clip_modules, oc.clip_grad)
            grad_norm = torch.stack(list(grad_norms.values())).float().square().sum().sqrt()
            health = torch.zeros(0, device=device)
            if log_now:
                with torch.no_grad():
                    student_probs = F.softmax(s_out["global_cls_logits"].detach().float() / lc.student_temp, dim=-1)
                    health = torch.tensor([
                        entropy(dino_t).item(), entropy(dino_t.float().mean(dim=0, keepdim=True)).item(),
                        entropy(student_probs).item(), effective_rank(t_out["global_cls"]),
                    ], device=device)
            bad = (~torch.isfinite(sums[0]) | ~torch.isfinite(grad_norm)).float()
            # One collective per step: loss terms, the finite flag, a stop request and health figures.
            packed = all_reduce_sum_(torch.cat([sums, bad.view(1), sums.new_tensor([float(stop_requested())]),
                                                health.float()]))
            # Grad norms are identical on every process (taken after the gradient all-reduce): not reduced.
            norm_values = torch.stack([grad_norm, *grad_norms.values()]).float()
            flat = torch.cat([packed, norm_values]).tolist()  # the step's one device -> host transfer
            values_all, norm_list = flat[:packed.numel()], flat[packed.numel():]
            finite = values_all[len(LOSS_TERMS)] == 0
            if finite:
                optimizer.step()
                ema_update_(teacher, student, values.momentum)
                for cls_logits, patch_logits in center_inputs:
                    losses["dino"].targets.update_center(cls_logits)
                    losses["ibot"].targets.update_center(patch_logits)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            throughput.step_done()

            record: dict[str, Any] = {"step": step}
            record.update({k: v / world for k, v in zip(LOSS_TERMS, values_all)})
            record.update(lr=values.lr, weight_decay=values.weight_decay, momentum=values.momentum,
                          teacher_temp=values.teacher_temp, last_layer_frozen=values.last_layer_frozen,
                          grad_norm=norm_list[0], skipped=not finite, nonfinite_total=guard.total + (not finite))
            record.update({f"grad_norm_{k}": v for k, v in zip(grad_norms, norm_list[1:])})
            if log_now:
                offset = len(LOSS_TERMS) + 2
                record.update({k: values_all[offset + i] / world for i, k in enumerate(HEALTH_TERMS)})
                record["center_norm_dino"] = losses["dino"].targets.center.norm().item()
                record["center_norm_ibot"] = losses["ibot"].targets.center.norm().item()
                per_process = step * batch_per_process * tc.grad_accum_steps  # samples_per_epoch is per process
                record["epoch"] = per_process / max(getattr(loader, "samples_per_epoch", 0) or 1, 1)
                record.update(throughput.summary())
                record["memory_mb"] = memory_mb(device)
                record.update({f"data_{k}": v for k, v in getattr(loader, "stats", {}).items()})
                record["collapse_warning"] = collapse.check(step, record)
                log.info("step %d/%d loss %.4f (dino %.4f + %.4f, ibot %.4f, %s %.4f) lr %.2e %.1f img/s%s",
                         step, tc.total_steps, record["loss"], record["dino_global"], record["dino_local"],
                         record["ibot"], lc.uniformity, record["uniformity"], values.lr, record["images_per_s"],
                         f" MFU {record['mfu']:.1%}" if "mfu" in record else "")
            record.update(probe_metrics(probe, step, teacher))
            metrics.write(record, step)
            guard.update(finite, step, last_checkpoint)  # raises after too many non-finite steps in a row

            stop_now = values_all[len(LOSS_TERMS) + 1] > 0
            if step % tc.checkpoint_every_steps == 0 or (step == stop_at and tc.checkpoint_at_end) or stop_now:
                trainer_state = {
                    "world_size": world, "batch_size": tc.batch_size, "nonfinite_total": guard.total,
                    "collapse_best": collapse.best, "loader_states": gather_loader_states(loader, world),
                    "config": config_to_dict(cfg),
                }
                path = save_checkpoint(out_dir, step, model, teacher, losses, optimizer, trainer_state,
                                       tc.keep_checkpoints)
                last_checkpoint = str(path)
                metrics.write({"event": "checkpoint", "step": step, "path": last_checkpoint}, step,
                              to_trackers=False)
                log.info("checkpoint %s", path)
            if stop_now:
                log.warning("stop requested by a signal: stopped after step %d with a checkpoint", step)
                stopped_early = True
                break
    except BaseException:
        with contextlib.suppress(Exception):
            accelerator.end_training()  # flush the trackers before the error propagates
        raise
    finally:
        restore_stop_handlers()
        metrics.close()
        if hasattr(loader, "close"):
            loader.close()  # stop data workers now rather than at garbage collection

    done = step >= tc.total_steps
    if is_main:
        event = {"event": "done" if done else "stopped", "step": step, "checkpoint": last_checkpoint,
                 "nonfinite_total": guard.total}
        with open(out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
        if done:
            tmp = out_dir / "done.json.tmp"
            tmp.write_text(json.dumps(event))
            os.replace(tmp, out_dir / "done.json")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "checkpoint": last_checkpoint, "nonfinite_total": guard.total, "done": done,
            "stopped_early": stopped_early}


# ---- helpers (no training logic below) -------------------------------------------------------------------------

def _clip_gradients(modules: dict[str, nn.Module], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each module's gradients to ``max_norm`` separately (as DINOv2); returns the norms before clipping."""
    norms = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            norms[name] = torch.zeros((), device=next(module.parameters()).device)
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norms
