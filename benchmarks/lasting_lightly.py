"""lightly-train's DINOv2 beside ``benchmarks/lasting.py``: probe curves at 100, 200 and 500 steps (issue 25).

Each run trains lightly-train 0.18 (``method="dinov2"``) on PNG files of exactly the tiles of the tile store that
``benchmarks/lasting.py`` trains pathdino on, with the ``small`` preset's settings (``configs/train/small.yaml``, read
here and turned into lightly-train's arguments) and the schedules stretched to the run: N optimizer steps, lr warm-up
``--warmup-fraction`` x N, lr and weight decay cosine to N, teacher momentum 0.99 -> 1 over N. A lightning callback
saves the teacher backbone before the first step and every N / 10 steps; after the run, each saved teacher embeds the
labelled probe set of ``benchmarks/small_probe_set.py`` exactly as pathdino's in-training probe does (the probe
images through ``TileTransform``: resized to the global crop size, the crops' normalisation; the CLS token after the
final norm, every token through every block), and pathdino's ``knn_evaluate`` (k = 20) and
``linear_probe_evaluate`` score the features with the arguments of ``pathdino/train/probe.py``. So the numbers sit
beside ``benchmarks/lasting.py``'s. Runs go one after the other under ``nice -n 10`` on one thread.

The script runs in two environments: pathdino's (this command: tiles, probe inputs, scoring, tables) and
lightly-train's venv (the training, started by this script as a subprocess with ``--lightly-python``). The venv:

    python -m venv --system-site-packages /work/venvs/lightly        # reuses the installed torch
    /work/venvs/lightly/bin/pip install "lightly-train==0.18.*"

    python benchmarks/lasting_lightly.py --out /tmp/lasting_lightly --store /tmp/lasting/tiles.zarr \\
        --probe /tmp/lasting/probe_cmu1/labels.csv --lightly-python /work/venvs/lightly/bin/python \\
        --steps 100 200 500 --seeds 0
    python benchmarks/lasting_lightly.py --out /tmp/lasting_lightly --report     # the tables of what ran
    # the issue-25 runs at small.yaml's values before 2026-12-07 (it has base lr 0.006 and KoLeo 0.01 now):
    python benchmarks/lasting_lightly.py --out /tmp/lasting_lightly --steps 100 200 500 --seeds 0 \\
        --set optim.base_lr=0.03 --set loss.uniformity_weight=0.1

(``--store`` and ``--probe`` are made by ``python benchmarks/lasting.py --out /tmp/lasting``, or by hand as its
docstring says.) Per run, ``<out>/runs/<tag>_n<N>_s<seed>/`` (``--tag``, default lightly) holds ``settings.json``
(every argument given to lightly-train), ``dynamics.jsonl`` (per step: lightly's logged losses, lr, weight decay,
teacher momentum and temperature as the method used them, pre-clip gradient norms, teacher target entropies, teacher
CLS rank/std, centre norm, wall seconds), ``features.safetensors`` (probe features per probed step),
``metrics.jsonl`` (probe scores and the dynamics, one record per step, as pathdino's ``metrics.jsonl``) and
``done.json``.

Matched to small.yaml: ViT 4 blocks x 192, 3 heads, patch 14, MLP ratio 4, 4 registers, LayerScale 0.1, drop path 0
(lightly's ``DinoVisionTransformer`` built here and passed as the model); 2 x 112 px global crops (scale 0.32-1) and
2 x 56 px local crops (0.05-0.32), aspect 3/4-4/3; flips h 0.5 / v 0.5 and a 90-degree rotation with p 0.5 (with the
two flips: the 8 rotations/reflections uniformly, as pathdino's rot90 + flips); colour jitter p 0.8 with 0.2 / 0.2 /
0.1 / 0.05, grayscale 0.2, blur p 1.0 / 0.1 on the global crops and 0.5 on the local ones (sigma 0.1-2), no
solarisation; ImageNet normalisation; head 192 -> 512 -> 512 -> 128 -> 256 prototypes (weight-normed, trainable
gain), one head for DINO and iBOT; iBOT on half the global crops, 10-50 % of patches; softmax centering, centre
momentum 0.9, student temperature 0.1, teacher temperature 0.04 constant; KoLeo (small.yaml's weight) on the global
CLS; AdamW (0.9, 0.999), small.yaml's base lr per 1,024 images sqrt-scaled, min lr 1e-6, warm-up 0.2 x N; weight
decay 0.04 -> 0.4 cosine (none on biases, norms, LayerScale); layer-wise lr decay 1.0, patch-embed lr x 0.2; last
layer never frozen; gradient clip 3.0; teacher momentum 0.99 -> 1 cosine; batch 32; fp32; seed.

Not matched (lightly-train 0.18 does not expose them): lightly's DINOv2 ViT adds a position embedding to the CLS
token (dinov2's layout), pathdino's timm ViT with registers gives CLS and registers none (timm's dinov2-reg layout);
at init lightly's CLS is nearly the same for every image (seed 0, on the probe set: CLS rank 8.8, per-dimension std
0.017; pathdino's init: 24 and 0.038; every weight has the same init law, and zeroing lightly's CLS position gives
25.1 and 0.042). The clip is on the global norm of every trainable parameter (pathdino clips each module, backbone
and head, to 3.0 on its own); the lr warm-up starts at lr / W on step 1 (pathdino: 0); the momentum of the k-th
teacher update is the cosine at k (pathdino: one step earlier); colour jitter is albumentations' (clamped after each
operation; pathdino's fused affine map) and the blur kernel follows sigma (pathdino: 9 px); rotation goes through
cv2 (exact at 90 degrees); data order: lightly shuffles the PNGs each epoch into 6 full batches of 32 (221 tiles,
the last 29 of each epoch dropped), pathdino streams the store through a 256-tile shuffle buffer; weights start from
another random stream (same init laws); lightly's iBOT head ignores ``ibot_bottleneck_dim`` (shared head anyway).
Name the CPU with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# lightly-train reports usage over the network by default; this benchmark must not depend on a network.
os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "train" / "small.yaml"
DYNAMICS = (
    "teacher_entropy",
    "teacher_usage_entropy",
    "embedding_rank",
    "embedding_std",
    "center_norm_dino",
    "dino_global",
    "koleo",
    "grad_norm_backbone",
    "grad_norm_head",
    "lr",
    "weight_decay",
    "momentum",
    "teacher_temp",
)
LOSS_KEYS = {  # lightly's logged names -> ours
    "train_loss": "loss",
    "train_loss/dino_global_loss": "dino_global",
    "train_loss/dino_local_loss": "dino_local",
    "train_loss/ibot_loss": "ibot",
    "train_loss/koleo_loss": "koleo",
}


# ---------------------------------------------------------------- pathdino's environment: inputs and settings


def write_pngs(store: Path, folder: Path) -> int:
    """Every tile of every slide of ``store`` as a PNG in ``folder`` (once); returns the number of tiles."""
    from PIL import Image

    from tiling.store import TileStore

    tiles = TileStore(store)
    n = sum(tiles.n_tiles(sid) for sid in tiles.slide_ids)
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return n
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for sid in tiles.slide_ids:
        slide = tiles.slide(sid)
        for start, stop in slide.shard_ranges():
            for i, tile in enumerate(slide.read_tiles(start, stop), start=start):
                Image.fromarray(tile).save(tmp / f"{sid}_{i:06d}.png")
    tmp.rename(folder)
    return n


def write_probe_inputs(probe_csv: Path, file: Path, cfg) -> None:
    """The probe set as the teacher's input, made by pathdino's own probe (TrainingProbe: same images, order,
    split, resize and normalisation), with the labels and the number of fit images, as one safetensors file."""
    import torch
    from safetensors.torch import save_file

    from pathdino.train.probe import ProbeConfig, TrainingProbe

    if file.is_file():
        return
    a = cfg.augment
    probe = TrainingProbe(
        ProbeConfig(data=str(probe_csv)),
        img_px=a.global_crop_px,
        mean=a.mean,
        std=a.std,
        device=torch.device("cpu"),
    )
    meta = {"n_fit": str(probe.n_fit), "n_classes": str(probe.n_classes), "knn_k": str(probe.cfg.knn_k)}
    tensors = {"inputs": probe.inputs(probe.images).contiguous(), "labels": probe.labels.contiguous()}
    save_file(tensors, str(file.with_suffix(".tmp")), metadata=meta)
    file.with_suffix(".tmp").rename(file)


def lightly_settings(cfg, *, steps: int, seed: int, warmup_fraction: float) -> dict:
    """small.yaml (``cfg``, a pathdino RunConfig) as lightly-train's arguments, schedules stretched to ``steps``."""
    a, m, loss, opt, head, bb = cfg.augment, cfg.masks, cfg.loss, cfg.optim, cfg.model.dino_head, cfg.model.backbone
    if loss.uniformity != "koleo" or loss.targets != "centering" or cfg.model.ibot_separate_head:
        raise SystemExit("lightly-train's DINOv2 here is KoLeo + softmax centering + one shared head")
    if head.n_layers != 3 or loss.teacher_temp_warmup_start > loss.teacher_temp:
        raise SystemExit("lightly-train's head has 3 layers and its teacher temperature can only rise")
    blur = {"sigmas": list(a.blur_sigma), "blur_limit": 0}
    jitter = {"prob": a.color_jitter_p, "strength": 1.0, "brightness": a.brightness, "contrast": a.contrast}
    jitter.update(saturation=a.saturation, hue=a.hue)
    ratio = {"min_ratio": a.crop_aspect[0], "max_ratio": a.crop_aspect[1]}
    return {
        "steps": steps,
        "seed": seed,
        "batch_size": cfg.train.batch_size,
        "precision": "32-true" if cfg.train.precision == "fp32" else "bf16-mixed",
        "model": {
            "img_size": a.global_crop_px,
            "patch_size": bb.patch_size,
            "embed_dim": bb.embed_dim_,
            "depth": bb.depth_,
            "num_heads": bb.num_heads_,
            "mlp_ratio": bb.mlp_ratio,
            "qkv_bias": bb.qkv_bias,
            "ffn_layer": bb.ffn,
            "num_register_tokens": bb.num_register_tokens,
            "init_values": bb.layerscale_init,
            "drop_path_rate": bb.drop_path_rate,
            "drop_path_uniform": True,
            "interpolate_antialias": True,  # as lightly's vits14_reg4 config
            "interpolate_offset": 0.0,
        },
        "method_args": {
            "ibot_separate_head": False,
            "hidden_dim": head.hidden_dim,
            "dino_bottleneck_dim": head.bottleneck_dim,
            "ibot_bottleneck_dim": head.bottleneck_dim,
            "output_dim": head.n_prototypes,
            "batch_norm": False,
            "student_freeze_last_layer_steps": opt.freeze_last_layer_steps,
            "dino_loss_weight": loss.dino_weight,
            "ibot_loss_weight": loss.ibot_weight,
            "koleo_loss_weight": loss.uniformity_weight,
            "center_method": "softmax",
            "center_momentum": loss.center_momentum,
            "momentum_start": opt.momentum_teacher,
            "momentum_end": opt.momentum_teacher_end,
            "student_temp": loss.student_temp,
            "teacher_temp_start": loss.teacher_temp_warmup_start,
            "teacher_temp_end": loss.teacher_temp,
            "teacher_temp_warmup_steps": loss.teacher_temp_warmup_steps,
            "mask_ratio_min": m.mask_ratio[0],
            "mask_ratio_max": m.mask_ratio[1],
            "mask_probability": m.mask_probability,
            "min_lr": opt.min_lr,
            "warmup_steps": round(warmup_fraction * steps),
            "layerwise_decay": opt.layerwise_decay,
            "patch_embed_lr_multiplier": opt.patch_embed_lr_mult,
            "lr_scale_method": opt.lr_scaling,
            "reference_batch_size": 1024,
            "weight_decay_start": opt.weight_decay,
            "weight_decay_end": opt.weight_decay_end,
            "gradient_clip_val": opt.clip_grad,
        },
        "optim_args": {"lr": opt.base_lr, "betas": list(opt.betas), "weight_decay": opt.weight_decay},
        "transform_args": {
            "image_size": [a.global_crop_px, a.global_crop_px],
            "random_resize": {"min_scale": a.global_crop_scale[0], "max_scale": a.global_crop_scale[1], **ratio},
            "random_flip": {"horizontal_prob": a.hflip_p, "vertical_prob": a.vflip_p},
            # With both flips at 0.5, a 90-degree turn with p 0.5 gives the 8 symmetries of the square uniformly,
            # as pathdino's rot90 (k in 0..3) + flips; lightly's Rotate cannot draw multiples of 90 otherwise.
            "random_rotation": {"prob": 0.5, "degrees": [90, 90]} if a.rot90 else None,
            "color_jitter": jitter,
            "random_gray_scale": a.grayscale_p,
            "gaussian_blur": {"prob": a.blur_p_global[0], **blur},
            "solarize": {"prob": a.solarize_p_global[0], "threshold": 0.5} if a.solarize_p_global[0] else None,
            "global_view_1": {
                "gaussian_blur": {"prob": a.blur_p_global[1], **blur},
                "solarize": {"prob": a.solarize_p_global[1], "threshold": 0.5} if a.solarize_p_global[1] else None,
            },
            "local_view": {
                "num_views": a.n_local_crops,
                "view_size": [a.local_crop_px, a.local_crop_px],
                "random_resize": {"min_scale": a.local_crop_scale[0], "max_scale": a.local_crop_scale[1], **ratio},
                "gaussian_blur": {"prob": a.blur_p_local, **blur},
            },
            "normalize": {"mean": list(a.mean), "std": list(a.std)},
        },
    }


# ---------------------------------------------------------------- lightly-train's venv: the training


def build_backbone(model_kwargs: dict):
    """lightly-train's DINOv2 ViT (its ``vit_small`` builder fixes width and depth, so the class is built here)."""
    from functools import partial

    from lightly_train._models.dinov2_vit.dinov2_vit_src.layers.attention import MemEffAttention
    from lightly_train._models.dinov2_vit.dinov2_vit_src.layers.block import Block
    from lightly_train._models.dinov2_vit.dinov2_vit_src.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(block_fn=partial(Block, attn_class=MemEffAttention), **model_kwargs)


def _entropy(probs):
    p = probs.float()
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def _rank(x) -> float:
    import torch

    x = torch.nn.functional.normalize(x.float(), dim=-1)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def make_recorder(run_dir: Path, *, every: int):
    """A lightning Callback: saves the teacher backbone at step 0 and every ``every`` steps (after the teacher
    update) and writes one dynamics record per step to ``dynamics.jsonl``."""
    import pytorch_lightning as pl
    import torch
    from lightly.utils.scheduler import cosine_schedule
    from safetensors.torch import save_file

    teachers = run_dir / "teachers"
    teachers.mkdir(exist_ok=True)

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict = {}
            self.sink = open(run_dir / "dynamics.jsonl", "w")

        def save_teacher(self, pl_module, step: int) -> None:
            state = pl_module.teacher_embedding_model.wrapped_model.get_model().state_dict()
            save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(teachers / f"{step}.st"))

        def on_train_start(self, trainer, pl_module) -> None:
            self.save_teacher(pl_module, 0)
            self.t_last = time.perf_counter()
            # Lightning calls the module's on_train_batch_end (the teacher update) after every callback's: wrap it
            # so that the record and the saved teacher come after the update, as pathdino's step does.
            inner_end = pl_module.on_train_batch_end

            def on_train_batch_end(*args, **kwargs):
                inner_end(*args, **kwargs)
                self.after_step(trainer, pl_module)

            pl_module.on_train_batch_end = on_train_batch_end
            wrapped = pl_module.teacher_embedding_model.wrapped_model
            inner_fwd, inner_soft = wrapped.forward_features, pl_module.dino_loss.softmax_center_teacher

            def forward_features(*args, **kwargs):
                out = inner_fwd(*args, **kwargs)
                self.seen["teacher_cls"] = out["cls_token"].detach()
                return out

            def softmax_center_teacher(teacher_output, teacher_temp):
                out = inner_soft(teacher_output, teacher_temp)
                self.seen.update(teacher_targets=out.detach(), teacher_temp=float(teacher_temp))
                return out

            wrapped.forward_features = forward_features
            pl_module.dino_loss.softmax_center_teacher = softmax_center_teacher

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            # Before clipping and before the scheduler steps: the gradient norms and the lr of this step.
            def norm(module) -> float:
                grads = [p.grad.detach().norm() for p in module.parameters() if p.grad is not None]
                return float(torch.stack(grads).norm()) if grads else float("nan")

            self.seen["grad_norm_backbone"] = norm(pl_module.student_embedding_model)
            self.seen["grad_norm_head"] = norm(pl_module.student_head)
            self.seen["lr"] = max(g["lr"] for g in optimizer.param_groups)

        def after_step(self, trainer, pl_module) -> None:
            step, seen = trainer.global_step, self.seen
            now = time.perf_counter()
            rec = {"step": step, "step_s": now - self.t_last}
            self.t_last = now
            metrics = trainer.callback_metrics
            rec.update({ours: float(metrics[k]) for k, ours in LOSS_KEYS.items() if k in metrics})
            groups = trainer.optimizers[0].param_groups
            rec["weight_decay"] = max(g["weight_decay"] for g in groups)
            rec["lr"] = seen.get("lr")
            args = pl_module.method_args
            # The method's own formula and arguments for the momentum of the update it just made.
            rec["momentum"] = cosine_schedule(
                step=step,
                max_steps=trainer.estimated_stepping_batches,
                start_value=args.momentum_start,
                end_value=args.momentum_end,
            )
            rec["teacher_temp"] = seen.get("teacher_temp")
            for key in ("grad_norm_backbone", "grad_norm_head"):
                rec[key] = seen.get(key)
            if "teacher_targets" in seen:
                t = seen["teacher_targets"].flatten(0, -2)
                rec["teacher_entropy"] = _entropy(t)
                rec["teacher_usage_entropy"] = _entropy(t.mean(0, keepdim=True))
            if "teacher_cls" in seen:
                cls = seen["teacher_cls"]
                rec["embedding_rank"] = _rank(cls)
                rec["embedding_std"] = float(torch.nn.functional.normalize(cls.float(), dim=-1).std(0).mean())
            rec["center_norm_dino"] = float(pl_module.dino_loss.center.norm())
            self.sink.write(json.dumps(rec) + "\n")
            self.sink.flush()
            self.seen = {}
            if step % every == 0:
                self.save_teacher(pl_module, step)

    return Recorder()


def _with_callback(callback):
    """Add ``callback`` to the Trainer lightly-train builds (its ``callbacks`` argument takes only its own names),
    by wrapping its private ``train_helpers.get_trainer`` (checked against 0.18)."""
    from lightly_train._commands import train_helpers

    inner = train_helpers.get_trainer

    def get_trainer(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
        return inner(*args, **kwargs)

    train_helpers.get_trainer = get_trainer


def train_one(run_dir: Path, *, images: Path, probe_inputs: Path) -> None:
    """One lightly-train run from ``run_dir/settings.json``; then the probe features of every saved teacher."""
    import lightly_train
    import torch

    torch.set_num_threads(1)
    s = json.loads((run_dir / "settings.json").read_text())
    steps, batch = s["steps"], s["batch_size"]
    torch.manual_seed(s["seed"])
    backbone = build_backbone(s["model"])
    n_images = len(list(images.glob("*.png")))
    batches_per_epoch = n_images // batch  # lightly's loader drops the last partial batch
    recorder = make_recorder(run_dir, every=max(1, steps // 10))
    _with_callback(recorder)
    t0 = time.perf_counter()
    lightly_train.pretrain(
        out=str(run_dir / "lightly"),
        data=str(images),
        model=backbone,
        method="dinov2",
        method_args=s["method_args"],
        optim="adamw",
        optim_args=s["optim_args"],
        transform_args=s["transform_args"],
        epochs=math.ceil(steps / batches_per_epoch),  # max_steps stops at N; the schedules end at N
        batch_size=batch,
        num_workers=0,
        devices=1,
        accelerator="cpu",
        precision=s["precision"],
        seed=s["seed"],
        overwrite=True,
        loggers={"jsonl": None, "tensorboard": None, "mlflow": None, "wandb": None},
        callbacks={"model_checkpoint": None, "model_export": None, "learning_rate_monitor": None},
        trainer_args={"max_steps": steps, "enable_checkpointing": False, "log_every_n_steps": 1},
    )
    train_s = time.perf_counter() - t0
    recorder.sink.close()
    embed_teachers(run_dir, s["model"], probe_inputs)
    (run_dir / "trained.json").write_text(json.dumps({"train_s": train_s, "torch_threads": torch.get_num_threads()}))


def embed_teachers(run_dir: Path, model_kwargs: dict, probe_inputs: Path) -> None:
    """CLS after the final norm (every token, every block) of each saved teacher on the probe inputs, fp32."""
    import torch
    from safetensors.torch import load_file, save_file

    x = load_file(str(probe_inputs))["inputs"]
    feats = {}
    for file in sorted((run_dir / "teachers").glob("*.st"), key=lambda f: int(f.stem)):
        model = build_backbone(model_kwargs)
        model.load_state_dict(load_file(str(file)))
        model.eval()
        with torch.no_grad():
            out = [model.forward_features(x[i : i + 64])["x_norm_clstoken"] for i in range(0, len(x), 64)]
        feats[f"step_{int(file.stem)}"] = torch.cat(out).float().contiguous()
    save_file(feats, str(run_dir / "features.safetensors"))


# ---------------------------------------------------------------- pathdino's environment: runs, scores, tables


def score(run_dir: Path, probe_inputs: Path) -> list[dict]:
    """kNN and linear probe of each probed step's features, with pathdino's functions and probe.py's arguments."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pathdino.eval.knn import knn_evaluate
    from pathdino.eval.linear import linear_probe_evaluate

    # One thread, as the training: two threads on a busy 2-core machine made the L-BFGS fits ~40x slower.
    torch.set_num_threads(1)
    with safe_open(str(probe_inputs), "pt") as f:
        meta = f.metadata()
    labels = load_file(str(probe_inputs))["labels"]
    n_fit, n_classes, k = int(meta["n_fit"]), int(meta["n_classes"]), int(meta["knn_k"])
    y_fit, y_score = labels[:n_fit], labels[n_fit:]
    folds = max(2, min(3, int(torch.bincount(y_fit).min())))
    out = []
    feats = load_file(str(run_dir / "features.safetensors"))
    for name in sorted(feats, key=lambda n: int(n.split("_")[1])):
        f = feats[name]
        knn = knn_evaluate(f[:n_fit], y_fit, f[n_fit:], y_score, n_classes=n_classes, ks=(k,))["by_k"][str(k)]
        lin = linear_probe_evaluate(f[:n_fit], y_fit, f[n_fit:], y_score, n_classes=n_classes, cv_folds=folds)
        out.append(
            {
                "step": int(name.split("_")[1]),
                "probe_knn_accuracy": knn["accuracy"],
                "probe_knn_balanced_accuracy": knn["balanced_accuracy"],
                "probe_linear_accuracy": lin["test"]["accuracy"],
                "probe_linear_balanced_accuracy": lin["test"]["balanced_accuracy"],
            }
        )
    return out


def run_one(out: Path, *, tag: str, lightly_python: str, settings: dict, images: Path, probe_inputs: Path) -> Path:
    """Train (lightly's venv, subprocess), score (here) and write metrics.jsonl + done.json; skips a done run."""
    import shutil

    run_dir = out / "runs" / f"{tag}_n{settings['steps']}_s{settings['seed']}"
    if (run_dir / "done.json").is_file():
        return run_dir
    if run_dir.exists():  # an interrupted run starts again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "settings.json").write_text(json.dumps(settings, indent=1))
    cmd = ["nice", "-n", "10", lightly_python, str(Path(__file__).resolve()), "--train-one", str(run_dir)]
    cmd += ["--images", str(images), "--probe-inputs", str(probe_inputs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ""}
    print(" ".join(cmd), flush=True)
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    probes = {r["step"]: r for r in score(run_dir, probe_inputs)}
    dynamics = [json.loads(line) for line in (run_dir / "dynamics.jsonl").read_text().splitlines()]
    records = [probes.pop(0)] if 0 in probes else []
    for rec in dynamics:
        records.append({**rec, **probes.pop(rec["step"], {})})
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    trained = json.loads((run_dir / "trained.json").read_text())
    step_s = [r["step_s"] for r in dynamics[1:]]  # the first step also builds the optimizer state
    done = {**trained, "steps": len(dynamics), "median_step_s": statistics.median(step_s) if step_s else None}
    (run_dir / "done.json").write_text(json.dumps(done))
    return run_dir


def report(out: Path) -> None:
    """Per run length: probe per seed and mean (``benchmarks/lasting.py``'s table printer, so both trainers' tables
    have one layout), the drop of the last probe below the run's best, wall seconds per step, and the dynamics at
    fractions of the run."""
    import importlib.util

    # by its path: putting benchmarks/ on sys.path would let its tiling.py shadow the tiling package
    spec = importlib.util.spec_from_file_location("lasting", Path(__file__).resolve().parent / "lasting.py")
    lasting = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lasting)
    _fmt, collect_runs, print_tables = lasting._fmt, lasting.collect_runs, lasting.print_tables

    runs = collect_runs(out)
    walls = {}
    for tag, steps in runs:
        seeds = sorted(runs[(tag, steps)])
        done = [json.loads((out / "runs" / f"{tag}_n{steps}_s{s}" / "done.json").read_text()) for s in seeds]
        wall = [d["median_step_s"] for d in done if d.get("median_step_s") is not None]
        walls[(tag, steps)] = f"median wall s/step (incl. loading), per seed: {_fmt(wall)}"
    print_tables(runs, DYNAMICS, walls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="working folder (PNG tiles, probe inputs, runs)")
    parser.add_argument("--store", type=Path, default=Path("/tmp/lasting/tiles.zarr"), help="the training store")
    parser.add_argument("--probe", type=Path, default=Path("/tmp/lasting/probe_cmu1/labels.csv"))
    parser.add_argument("--lightly-python", default="/work/venvs/lightly/bin/python", help="lightly-train's venv")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--tag", default="lightly", help="name of this setting in the run folders and tables")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pathdino config override on top of small.yaml, turned into lightly's arguments (repeatable)",
    )
    parser.add_argument("--report", action="store_true", help="only print the tables of the finished runs")
    parser.add_argument("--train-one", type=Path, metavar="RUN_DIR", help=argparse.SUPPRESS)  # in lightly's venv
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_one is not None:
        train_one(args.train_one, images=args.images, probe_inputs=args.probe_inputs)
        return
    if args.out is None:
        parser.error("--out is required")
    sys.path.insert(0, str(ROOT))  # ahead of benchmarks/, whose tiling.py would shadow the tiling package
    if not args.report:
        from pathdino.train.config import load_config

        cfg = load_config(PRESET, [f"data.stores=[{args.store}]", *args.overrides])
        (args.out / "runs").mkdir(parents=True, exist_ok=True)
        images, probe_inputs = args.out / "tiles_png", args.out / "probe_inputs.safetensors"
        print(f"{write_pngs(args.store, images)} tiles as PNG in {images}", flush=True)
        write_probe_inputs(args.probe, probe_inputs, cfg)
        for seed in args.seeds:  # seeds outermost: a cut-short sweep still has every length for the first seeds
            for steps in args.steps:
                settings = lightly_settings(cfg, steps=steps, seed=seed, warmup_fraction=args.warmup_fraction)
                run_one(
                    args.out,
                    tag=args.tag,
                    lightly_python=args.lightly_python,
                    settings=settings,
                    images=images,
                    probe_inputs=probe_inputs,
                )
    report(args.out)


if __name__ == "__main__":
    main()
