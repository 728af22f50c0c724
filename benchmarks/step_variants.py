"""A/B of training-step variants inside one process: the same run, variants alternated step by step.

    python benchmarks/step_variants.py --precision fp32 --variants full,trim,trim+malloc --rounds 3

Builds the real run once (``configs/train/<preset>.yaml``, synthetic pixels, batch 16) and times
``training_step`` + ``reduce_step`` + ``apply_update`` per variant, alternating A B C A B C so that load from other
processes falls on every variant alike (the point on a shared machine). Variants:

* ``full``: every token through the last block; ``trim``: the last block trimmed to the tokens the objective reads
  (``SSLModel.trim_last_block``, the trainer's default);
* ``+malloc``: glibc keeps freed memory and never mmaps large blocks (``train.cpu_reuse_freed_memory``); without
  it glibc's defaults are restored.
* ``+sdpa``: student and teacher attention through ``F.scaled_dot_product_attention``; ``+tsdpa``: the teacher's
  only (no backward there); ``+plain``: timm's plain q·kᵀ-softmax attention in both; none of them: what the
  trainer picks for the precision (plain attention for bf16 on CPU, SDPA otherwise).

FTZ (``train.cpu_flush_denormal``) is a process setting inherited by threads at their start, so it cannot be
toggled here; compare it with ``train_step.py ... train.cpu_flush_denormal=false`` runs instead. Each variant's
first step after a switch is discarded. Prints img/s per round. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vits14")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--variants", default="full,trim,trim+malloc")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import contextlib

    import torch

    from pathdino.models.backbone import set_fused_attention
    from pathdino.train.config import load_config
    from pathdino.train.context import open_context
    from pathdino.train.host import _DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD, _M_MMAP_MAX, _M_TRIM_THRESHOLD, _glibc
    from pathdino.train.run import start_phase
    from pathdino.train.step import apply_update, reduce_step, training_step

    libc = _glibc()
    variants = args.variants.split(",")
    if any("malloc" in v for v in variants) and libc is None:
        p.error("+malloc variants need glibc")

    def set_malloc(reuse: bool) -> None:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 0 if reuse else _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1 if reuse else _DEFAULT_TRIM_THRESHOLD)

    with tempfile.TemporaryDirectory(prefix="pathdino-variants-") as tmp, contextlib.ExitStack() as cleanup:
        cfg = load_config(
            ROOT / "configs" / "train" / f"{args.preset}.yaml",
            [
                f"train.output_dir={tmp}/run",
                f"train.precision={args.precision}",
                "train.total_steps=1000",
                f"train.batch_size={args.batch_size}",
                "train.synthetic_data=true",
                "optim.warmup_steps=0",
                "log.trackers=[]",
                "train.cpu_reuse_freed_memory=false",
            ],
        )
        ctx = open_context(cfg.train, cfg.log.trackers, cleanup)  # its CPU settings are undone when the block ends
        phase, _ = start_phase(ctx, cfg, resume=None, loader=None)
        parts = phase.parts
        default_fused = bool(getattr(parts.student.backbone.backbone.blocks[0].attn, "fused_attn", False))
        batches = iter(phase.loader)
        parts.model.train()
        values = phase.schedules.at(0)

        def step() -> float:
            batch = next(batches).to(ctx.device)
            t0 = time.perf_counter()
            out = training_step(parts, batch, values, sync=True)
            reduced = reduce_step(parts, out.terms, out, values=values, with_health=False, stop_flag=False)
            apply_update(parts, [out], values=values, finite=reduced.finite)
            return time.perf_counter() - t0

        step()
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                parts.student.trim_last_block = parts.teacher.trim_last_block = v.startswith("trim")
                set_malloc("malloc" in v)
                fused = (default_fused or "+sdpa" in v) and "+plain" not in v
                set_fused_attention(parts.student, fused)
                set_fused_attention(parts.teacher, fused or "+tsdpa" in v)
                step()  # the first step after a switch settles the allocator
                seconds[v].append(step())
                print(f"{v}: {args.batch_size / seconds[v][-1]:.3f} img/s", flush=True)
        set_malloc(False)
    print(
        f"\n{args.preset}, batch {args.batch_size}, {args.precision}, {torch.get_num_threads()} threads; "
        "img/s per round"
    )
    for v in variants:
        print(f"{v:<14} " + " ".join(f"{args.batch_size / t:.3f}" for t in seconds[v]))


if __name__ == "__main__":
    main()
