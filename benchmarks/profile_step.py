"""Where the training step's time goes: torch.profiler over real ``pathdino.train`` steps, ops by self CPU time.

    python benchmarks/profile_step.py --preset vits14 --batch-size 16 --precision fp32
    python benchmarks/profile_step.py --preset vits14 --batch-size 16 --precision bf16 --rows 40

Runs the real loop on synthetic pixels; the first ``--skip`` optimizer steps (allocator warm-up, torch.compile) are
not recorded, the next ``--steps`` are. Prints the top ops by self CPU time, and the share of the recorded time
spent in matrix products (``addmm``/``mm``/``bmm``/attention kernels) against everything else. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATMUL_OPS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::convolution_backward",
    "aten::mkldnn_convolution",
    "aten::baddbmm",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vits14")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip", type=int, default=1, help="optimizer steps not recorded (default 1)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps recorded (default 1)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--by-shape", action="store_true", help="also list ops grouped by input shapes and dtypes")
    p.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = p.parse_args()

    import pathdino.train.loop as loop
    from pathdino.train.config import load_config

    with tempfile.TemporaryDirectory(prefix="pathdino-profile-") as tmp:
        cfg = load_config(
            ROOT / "configs" / "train" / f"{args.preset}.yaml",
            [
                f"train.output_dir={tmp}/run",
                f"train.precision={args.precision}",
                f"train.compile={str(args.compile).lower()}",
                f"train.total_steps={args.skip + args.steps}",
                f"train.batch_size={args.batch_size}",
                "train.synthetic_data=true",
                "optim.warmup_steps=0",
                "log.every_steps=1000000",
                "log.trackers=[]",
                "train.checkpoint_every_steps=1000000000",
                "train.checkpoint_at_end=false",
                "log.collapse_after_steps=1000000000",
                *args.overrides,
            ],
        )
        with profile(
            activities=[ProfilerActivity.CPU],
            record_shapes=args.by_shape,
            schedule=schedule(wait=args.skip, warmup=0, active=args.steps),
        ) as prof:
            original = loop.apply_update

            def apply_and_tick(*a, **k):
                original(*a, **k)
                prof.step()

            loop.apply_update = apply_and_tick
            try:
                loop.train(cfg)
            finally:
                loop.apply_update = original
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(
        f"recorded {total / 1e6:.2f} s self CPU time over {args.steps} step(s); matrix products "
        f"{matmul / max(total, 1):.1%}, everything else {1 - matmul / max(total, 1):.1%} "
        f"({args.precision}, {torch.get_num_threads()} threads)"
    )
    if args.by_shape:
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=28, max_shapes_column_width=90
            )
        )
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
