"""Training-step speed of lightly-train's DINOv2 (``method="dinov2"``), to set beside ``benchmarks/train_step.py``.

It trains lightly-train 0.18 on a small folder of real H&E tiles for ``--warmup`` + ``--steps`` optimizer steps in
fp32 and bf16 on the CPU, times the steps after the warm-up, and prints images/s. Run pathdino's side with
``python benchmarks/train_step.py --preset vits14 --batch-size 16 --precision both`` on the same machine, one after
the other (never at the same time: both use every core).

This script does not import pathdino, so it runs in a separate environment that holds lightly-train (which pins its
own lightning/pydantic versions; keep it out of pathdino's environment). One way, reusing the installed torch:

    python -m venv --system-site-packages /tmp/ltvenv
    /tmp/ltvenv/bin/pip install "lightly-train==0.18.*"
    /tmp/ltvenv/bin/python benchmarks/lightly_compare.py                     # fp32 and bf16, batch 16
    /tmp/ltvenv/bin/python benchmarks/lightly_compare.py --images my_tiles/  # your own 224-px tiles

Tiles: by default cut from the bundled slide ``pathdino/sample_data/CMU-1-Small-Region.svs`` (openslide or
tiffslide, whichever imports), the most tissue-rich 224-px windows first; ``--images DIR`` uses a folder instead.

Settings, matched to ``configs/train/vits14.yaml`` where lightly-train lets them be set:
``dinov2/vits14-notpretrained`` (ViT-S/14, 4 registers, random init: nothing is downloaded), 2 x 224 + 8 x 98
crops, 65,536 prototypes, head 384 -> 2048 -> 256 -> 65,536 shared by DINO and iBOT, iBOT on half the global crops
with 10-50 % of patches masked, KoLeo weight 0.1, softmax centering, AdamW, clip 3.0, teacher EMA.

What is timed: a lightning Callback stamps each batch's start (after the batch is loaded) and the end of the
method's own ``on_train_batch_end`` (where lightly-train updates the teacher). ``step`` figures cover forward,
backward, optimizer step and teacher update, with loading excluded (as pathdino's ``--data synthetic`` default
measures); ``wall`` figures add the loading of each batch, done in the main process (``num_workers=0``) so that no
worker process competes with the step for the cores. The timer joins lightly-train's own callbacks through a
wrapper of its private ``train_helpers.get_trainer`` (checked against 0.18); its checkpoint and export-during-
training callbacks are switched off (they run after the last step anyway); the exported model is written as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# lightly-train reports usage over the network by default; this machine may have none, and the benchmark
# should not depend on it.
os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = ROOT / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
MODEL = "dinov2/vits14-notpretrained"
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}

# DINOv2 settings of configs/train/vits14.yaml, in lightly-train's method_args names (set explicitly, not left to
# lightly-train's defaults, so that a change of defaults cannot change what is compared).
METHOD_ARGS = {
    "ibot_separate_head": False,
    "hidden_dim": 2048,
    "dino_bottleneck_dim": 256,
    "ibot_bottleneck_dim": 256,
    "output_dim": 65536,
    "batch_norm": False,
    "dino_loss_weight": 1.0,
    "ibot_loss_weight": 1.0,
    "koleo_loss_weight": 0.1,
    "center_method": "softmax",
    "center_momentum": 0.9,
    "student_temp": 0.1,
    "teacher_temp_start": 0.04,
    "teacher_temp_end": 0.07,
    "mask_ratio_min": 0.1,
    "mask_ratio_max": 0.5,
    "mask_probability": 0.5,
    "layerwise_decay": 0.9,
    "patch_embed_lr_multiplier": 0.2,
    "gradient_clip_val": 3.0,
}
TRANSFORM_ARGS = {"image_size": (224, 224), "local_view": {"num_views": 8, "view_size": (98, 98)}}


def machine_name() -> str:
    """CPU model, core count and torch threads (or the GPU's name), for the table's heading."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def open_slide(path: Path):
    """An openslide-like reader of ``path`` (openslide first, tiffslide otherwise)."""
    try:
        import openslide

        return openslide.OpenSlide(str(path))
    except ImportError:
        pass
    try:
        import tiffslide

        return tiffslide.TiffSlide(path)
    except ImportError:
        sys.exit(
            f"reading {path} needs openslide-python (+ openslide-bin) or tiffslide in this environment; "
            "install one, or pass --images DIR with 224-px tiles"
        )


def cut_tiles(slide_path: Path, out_dir: Path, n_tiles: int, tile_px: int = 224) -> list[Path]:
    """Write the ``n_tiles`` most tissue-rich ``tile_px`` windows (half-tile stride) of level 0 as PNGs."""
    import numpy as np

    if not slide_path.is_file():
        sys.exit(f"slide {slide_path} not found; pass --slide PATH or --images DIR")
    slide = open_slide(slide_path)
    try:
        w, h = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    finally:
        slide.close()
    stride = tile_px // 2
    windows = [(y, x) for y in range(0, h - tile_px + 1, stride) for x in range(0, w - tile_px + 1, stride)]
    # Tissue is darker and more saturated than glass; rank windows by the share of non-white pixels.
    tissue = [float((region[y : y + tile_px, x : x + tile_px].min(axis=2) < 200).mean()) for y, x in windows]
    order = sorted(range(len(windows)), key=lambda i: -tissue[i])
    if n_tiles > len(order):
        sys.exit(
            f"{slide_path} yields {len(order)} tiles of {tile_px} px, fewer than the {n_tiles} needed; "
            "lower --steps/--batch-size or pass --images DIR"
        )
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, i in enumerate(order[:n_tiles]):
        y, x = windows[i]
        path = out_dir / f"tile_{rank:04d}_y{y}_x{x}.png"
        Image.fromarray(np.ascontiguousarray(region[y : y + tile_px, x : x + tile_px])).save(path)
        paths.append(path)
    return paths


def make_timer(batch_size: int):
    """A lightning Callback that records, per batch, its start and the end of the method's teacher update."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.batch_size = batch_size

        def on_train_start(self, trainer, pl_module) -> None:
            # Lightning calls the module's on_train_batch_end after every callback's, and lightly-train updates
            # the teacher there: wrap it so the step's end is stamped after the teacher update.
            inner = pl_module.on_train_batch_end

            def on_train_batch_end(*args, **kwargs):
                inner(*args, **kwargs)
                self.ends.append(time.perf_counter())

            pl_module.on_train_batch_end = on_train_batch_end

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            n = len(batch["views"][0])
            if n != self.batch_size:
                raise RuntimeError(f"batch {batch_idx} holds {n} images, expected {self.batch_size}")
            self.starts.append(time.perf_counter())

    return StepTimer()


@contextlib.contextmanager
def extra_callback(callback):
    """Add ``callback`` to the Trainer that lightly-train builds.

    ``train(trainer_args={"callbacks": ...})`` cannot carry it (lightly-train serialises its config to JSON and
    the key would replace its own callbacks), so wrap the private helper that builds the Trainer for the duration.
    """
    from lightly_train._commands import train_helpers

    inner = train_helpers.get_trainer

    def get_trainer(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
        return inner(*args, **kwargs)

    train_helpers.get_trainer = get_trainer
    try:
        yield
    finally:
        train_helpers.get_trainer = inner


def run_one(
    images: Path, out_dir: Path, precision: str, batch_size: int, steps: int, warmup: int, drop_path: float = 0.3
) -> dict:
    """Train ``warmup + steps`` steps with lightly-train; figures over the last ``steps``."""
    import lightly_train

    timer = make_timer(batch_size)
    train = getattr(lightly_train, "pretrain", None) or lightly_train.train
    t0 = time.perf_counter()
    with warnings.catch_warnings(), extra_callback(timer):
        warnings.simplefilter("ignore")
        train(
            out=str(out_dir),
            data=str(images),
            model=MODEL,
            # configs/train/vits14.yaml's stochastic depth (lightly's vits14 default is 0.1); above 0.1 both sides
            # run each residual branch on the kept samples only (dinov2's drop_add_residual_stochastic_depth).
            model_args={"drop_path_rate": drop_path, "drop_path_uniform": True},
            method="dinov2",
            method_args=METHOD_ARGS,
            transform_args=TRANSFORM_ARGS,
            epochs=1,
            batch_size=batch_size,
            num_workers=0,
            devices=1,
            accelerator="gpu" if torch.cuda.is_available() else "cpu",
            precision=PRECISIONS[precision],
            overwrite=True,
            loggers={"jsonl": None, "tensorboard": None, "mlflow": None, "wandb": None},
            # No loggers, so no LR monitor; a checkpoint of 2 x 22M-parameter heads + AdamW state is not measured.
            callbacks={"model_checkpoint": None, "model_export": None, "learning_rate_monitor": None},
            trainer_args={"max_steps": warmup + steps, "enable_checkpointing": False},
        )
    total_s = time.perf_counter() - t0
    n = warmup + steps
    if len(timer.starts) != n or len(timer.ends) != n:
        raise RuntimeError(
            f"expected {n} timed steps, got {len(timer.starts)} starts / {len(timer.ends)} ends "
            f"(does {images} hold at least {n * batch_size} images?)"
        )
    step_s = [timer.ends[k] - timer.starts[k] for k in range(warmup, n)]
    load_s = [timer.starts[k] - timer.ends[k - 1] for k in range(warmup, n)]
    return {
        "precision": precision,
        "step_images_per_s": batch_size * steps / sum(step_s),
        "wall_images_per_s": batch_size * steps / (sum(step_s) + sum(load_s)),
        "step_s": step_s,
        "load_s": load_s,
        "warmup_step_s": timer.ends[0] - timer.starts[0],
        "total_s": total_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="discarded optimizer steps before them (default 1)")
    p.add_argument(
        "--images", type=Path, default=None, help="folder of 224-px images (default: tiles cut from --slide)"
    )
    p.add_argument("--slide", type=Path, default=SAMPLE_SLIDE, help="slide to cut tiles from (default: bundled)")
    p.add_argument("--drop-path", type=float, default=0.3, help="student drop path, uniform (vits14 preset: 0.3)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step builds the optimizer state)")

    import lightly_train

    device = machine_name()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lightly-compare-") as tmp:
        images = args.images
        if images is None:
            images = Path(tmp) / "tiles"
            cut_tiles(args.slide, images, args.batch_size * (args.warmup + args.steps))
        elif not images.is_dir():
            p.error(f"--images {images} is not a folder")
        for precision in precisions:
            try:
                r = run_one(
                    images,
                    Path(tmp) / f"run_{precision}",
                    precision,
                    args.batch_size,
                    args.steps,
                    args.warmup,
                    args.drop_path,
                )
                r["ok"] = True
            except Exception as exc:  # noqa: BLE001 - a failed precision is a row, not the end of the table
                r = {"precision": precision, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(r)
            print(r, flush=True)

    print(
        f"\nlightly-train {lightly_train.__version__} method=dinov2 {MODEL}, batch {args.batch_size}, "
        f"2x224 + 8x98 crops, {METHOD_ARGS['output_dim']:,} prototypes, torch {torch.__version__}"
    )
    print(f"device: {device}; {args.steps} measured steps after {args.warmup} warm-up")
    print(f"{'precision':<10}{'step img/s':>12}{'wall img/s':>12}{'s/step':>9}{'load s/step':>13}{'warm-up s':>11}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['precision']:<10}  FAILED: {r['error']}")
            continue
        print(
            f"{r['precision']:<10}{r['step_images_per_s']:>12.2f}{r['wall_images_per_s']:>12.2f}"
            f"{statistics.mean(r['step_s']):>9.1f}{statistics.mean(r['load_s']):>13.2f}"
            f"{r['warmup_step_s']:>11.1f}"
        )
    print("step: forward+backward+optimizer+teacher update, loading excluded; wall: + main-process loading")
    if args.json:
        import json

        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
