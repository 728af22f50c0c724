"""Slide-pretraining throughput: optimizer steps of masked autoencoding on synthetic slides, one process.

    python benchmarks/slide_pretrain.py                         # small preset, fp32, 4096-tile packs, on CPU
    python benchmarks/slide_pretrain.py --preset gigapath --precision bf16 --tiles-per-slide 16384 --steps 20

Writes an embeddings store of ``--slides`` synthetic slides (square grids of ``--tiles-per-slide`` tiles of width
``--dim``), trains ``--steps`` steps (``train.packs_per_step=1``, one slide per pack) and prints tiles/s and
seconds per step after the first ``--warmup`` steps, with peak memory. Print the CPU/GPU with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# `python benchmarks/slide_pretrain.py` puts benchmarks/ first on sys.path, where benchmarks/tiling.py would shadow
# the tiling package; tests/ holds the synthetic-store writer (slide_fixtures).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=["small", "gigapath"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tiles-per-slide", type=int, default=4096)
    p.add_argument("--dim", type=int, default=384, help="tile embedding width")
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    from slide_fixtures import ENCODER, STRIDE_PX, write_store

    from pathdino.slide.loop import train
    from pathdino.slide.train_config import load_pretrain_config

    root = Path(tempfile.mkdtemp(prefix="slide-bench-"))
    side = int(np.ceil(np.sqrt(args.tiles_per_slide)))
    rng = np.random.default_rng(0)
    cells = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(-1, 2)
    coords = (cells[: args.tiles_per_slide] * STRIDE_PX).astype(np.int64)
    slides = {
        f"s{i}": (rng.normal(size=(len(coords), args.dim)).astype(np.float32), coords) for i in range(args.slides)
    }
    store = write_store(root / "emb", slides, encoder={**ENCODER, "embed_dim": args.dim})
    config = Path(__file__).resolve().parents[1] / "configs" / "slide" / f"{args.preset}.yaml"
    n = args.tiles_per_slide
    cfg = load_pretrain_config(
        config,
        [
            f"data.embeddings=[{store}]",
            f"train.output_dir={root / 'run'}",
            f"train.total_steps={args.steps}",
            f"data.max_tokens_per_slide={n}",
            f"data.tokens_per_pack={n}",
            "data.num_workers=0",
            "data.cache_slides=true",
            "train.packs_per_step=1",
            f"train.precision={args.precision}",
            "train.checkpoint_at_end=false",
            f"train.checkpoint_every_steps={args.steps}",
            "log.every_steps=1",
            "log.trackers=[]",
            "optim.warmup_steps=1",
        ],
    )
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r][args.warmup :]
    per_step = [1.0 / r["steps_per_s"] for r in steps]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(
        f"slide pretraining, preset {args.preset}, {args.precision}, {n} tiles per step (dim {args.dim}), "
        f"{torch.get_num_threads()} threads, {device}"
    )
    print(
        f"  {np.median(per_step):.2f} s/step (median of {len(per_step)}), "
        f"{n / np.median(per_step):.0f} tiles/s; peak memory {max(r['memory_mb'] for r in steps):.0f} MiB; "
        f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}; run {wall:.1f} s"
    )


if __name__ == "__main__":
    main()
