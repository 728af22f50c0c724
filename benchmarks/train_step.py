"""Training-step speed of pathdino.train: images/s, share of time waiting for data, achieved TFLOP/s and MFU.

It runs the real training loop (``pathdino.train.loop.train``) for ``--warmup`` + ``--steps`` optimizer steps in a
temporary directory and reads the loop's own metrics for the measured steps (the warm-up window, which includes
torch.compile and allocator warm-up, is discarded). With several configurations (``--precision both``, ``--compile
both``) each runs in its own process, so none starts with another's warm allocator and caches. Not a test: it
prints figures.

    python benchmarks/train_step.py                                  # cpu_smoke preset, fp32 and bf16
    python benchmarks/train_step.py --preset vits14 --batch-size 16  # ViT-S/14 beside lightly-train's figures
    python benchmarks/train_step.py --preset vitl14 --batch-size 32 --precision bf16 --compile both   # on a GPU
    python benchmarks/train_step.py --preset cpu_smoke --data store  # real tile-store loading (bundled slide)

MFU: on GPUs against the card's nominal dense peak (pathdino.train.health.PEAK_TFLOPS, or --peak-tflops); on CPUs
against a large matrix product's measured throughput on this machine in the same precision (labelled so).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Quoted, not measured here: anchors (../shared/notes/anchors.md section 4), lightly-train 0.18 method="dinov2" on
# this 2-core CPU: ViT-S/14, batch 16, 2 x 224 + 8 x 98 crops, 65,536 prototypes.
LIGHTLY_TRAIN_VITS14_CPU = {"fp32": 0.86, "bf16": 1.34}


def matmul_tflops(dtype: torch.dtype, n: int = 1024, windows: int = 4, seconds: float = 0.5) -> float:
    """Dense matmul throughput of this CPU, best of a few short windows (the MFU reference on CPUs; on a shared
    machine other processes lower both this and the training step, so compare runs made under the same load)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0) / 1e12)
    return best


def tiny_store(path: Path, tile_px: int) -> Path:
    """A tile store of real H&E pixels from the bundled slide (64 tiles of ``tile_px``)."""
    import numpy as np
    import tiffslide

    from tiling.store import encode_tile
    from tiling.store_write import TileStoreWriter

    n_side = 8
    with tiffslide.TiffSlide(ROOT / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs") as slide:
        w, h = slide.dimensions
        side = min(n_side * tile_px, w, h)
        region = np.asarray(slide.read_region((0, 0), 0, (side, side)).convert("RGB"))
    per = side // tile_px
    sw = TileStoreWriter(path).begin_slide("cmu1", tile_px, encoding="jpeg")
    tiles = [
        encode_tile(np.ascontiguousarray(region[i * tile_px : (i + 1) * tile_px, j * tile_px : (j + 1) * tile_px]))
        for i in range(per)
        for j in range(per)
    ]
    sw.add(tiles, np.zeros((len(tiles), 2), np.int64), np.ones(len(tiles), np.float32))
    sw.commit({"source_path": "CMU-1-Small-Region.svs", "source_fingerprint": "benchmark"})
    return path


def run_one(
    preset: str,
    precision: str,
    compile_: bool,
    batch_size: int | None,
    steps: int,
    warmup: int,
    data: str,
    peak: float | None,
    extra: list[str],
    store_path: Path | None = None,
) -> dict:
    """Train ``warmup + steps`` steps; figures from the loop's metric window over the last ``steps`` steps.

    ``warmup`` is rounded up to a multiple of ``steps`` so that a logging window ends exactly where it does.
    """
    from pathdino.train.config import crop_plan, load_config
    from pathdino.train.loop import train

    warmup = -(-warmup // steps) * steps
    cfg_path = ROOT / "configs" / "train" / f"{preset}.yaml"
    with tempfile.TemporaryDirectory(prefix="pathdino-bench-") as tmp:
        overrides = [
            f"train.output_dir={tmp}/run",
            f"train.precision={precision}",
            f"train.compile={str(compile_).lower()}",
            f"train.total_steps={warmup + steps}",
            "optim.warmup_steps=0",
            f"log.every_steps={steps}",
            "log.trackers=[]",
            "train.checkpoint_every_steps=1000000000",
            "train.checkpoint_at_end=false",
            "log.collapse_after_steps=1000000000",
        ]
        if batch_size:
            overrides.append(f"train.batch_size={batch_size}")
        if peak:
            overrides.append(f"log.peak_tflops={peak}")
        if data == "synthetic":
            overrides.append("train.synthetic_data=true")
        else:
            if store_path is None:
                probe = load_config(cfg_path, overrides + extra)
                store_path = tiny_store(Path(tmp) / "tiles.zarr", max(64, crop_plan(probe).global_px))
            overrides += [f"data.stores=[{store_path}]", "data.num_workers=0"]
        cfg = load_config(cfg_path, overrides + extra)
        train(cfg)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "images_per_s" in r][-1]
    assert last["step"] == warmup + steps
    out = {k: last[k] for k in ("images_per_s", "data_wait_share", "tflops_per_s", "memory_mb", "loss")}
    # Loading excluded (as lightly_compare.py's "step" figure): the loop's wall time less its wait for batches.
    out["step_images_per_s"] = last["images_per_s"] / max(1.0 - last["data_wait_share"], 1e-9)
    out["flops_per_image"] = last["tflops_per_s"] * 1e12 / last["images_per_s"]
    out["batch_size"] = cfg.train.batch_size
    if "mfu" in last:
        out["mfu"] = last["mfu"]
    return out


def _run_isolated(args: argparse.Namespace, precision: str, compile_: bool) -> dict:
    """One configuration's row, from this script run for it alone in a child process."""
    with tempfile.TemporaryDirectory(prefix="pathdino-bench-") as tmp:
        out = Path(tmp) / "row.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--preset",
            args.preset,
            "--precision",
            precision,
            "--compile",
            "yes" if compile_ else "no",
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--data",
            args.data,
            "--json",
            str(out),
        ]
        for flag, value in (
            ("--batch-size", args.batch_size),
            ("--store", args.store),
            ("--peak-tflops", args.peak_tflops),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        proc = subprocess.run(cmd + list(args.overrides), capture_output=True, text=True)
        rows = json.loads(out.read_text()) if out.is_file() else []
    if not rows:
        return {
            "ok": False,
            "error": proc.stderr[-300:],
            "preset": args.preset,
            "precision": precision,
            "compile": compile_,
        }
    print(json.dumps(rows[0]), flush=True)
    return rows[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu_smoke", help="configs/train/<preset>.yaml (default cpu_smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="discarded optimizer steps before them")
    p.add_argument(
        "--data",
        choices=["synthetic", "store"],
        default="synthetic",
        help="synthetic pixels (model speed) or a tile store cut from the bundled slide (+ loading)",
    )
    p.add_argument("--store", type=Path, default=None, help="with --data store: this tile store instead")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table / CPU matmul)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and "train.cpu_flush_denormal=false" not in args.overrides:
        # As `python -m pathdino.train` has it: FTZ/DAZ before the intra-op thread pool starts (its threads inherit
        # the setting); the matmul reference below would start the pool before train() sets it.
        torch.set_flush_denormal(True)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    compiles = [False, True] if args.compile == "both" else [args.compile == "yes"]
    rows = []
    if len(precisions) * len(compiles) > 1:
        # Each configuration in a fresh process: in one process the later runs inherit a warm allocator and caches
        # (a second bf16 ViT-S/14 run measured 12% faster than the same configuration run first).
        rows = [_run_isolated(args, precision, compile_) for precision in precisions for compile_ in compiles]
        precisions = []
    for precision in precisions:
        peak, peak_note = args.peak_tflops, "given"
        if peak is None and not cuda:
            peak = matmul_tflops(torch.bfloat16 if precision == "bf16" else torch.float32)
            peak_note = "measured CPU matmul"
        elif peak is None:
            from pathdino.train.health import peak_tflops

            peak, peak_note = peak_tflops(torch.device("cuda"), precision), "nominal dense peak"
        for compile_ in compiles:
            t0 = time.perf_counter()
            try:
                r = run_one(
                    args.preset,
                    precision,
                    compile_,
                    args.batch_size,
                    args.steps,
                    args.warmup,
                    args.data,
                    peak,
                    args.overrides,
                    args.store,
                )
                r.update(ok=True)
            except Exception as exc:  # noqa: BLE001 - a failed configuration is a row, not the end of the table
                r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            r.update(
                preset=args.preset,
                precision=precision,
                compile=compile_,
                peak_tflops=peak,
                peak_note=peak_note,
                wall_s=time.perf_counter() - t0,
                device=device,
                data=args.data,
            )
            rows.append(r)
            print(json.dumps(r), flush=True)

    print(
        f"\npathdino.train step speed on {device} ({args.data} data; {args.warmup} warm-up + {args.steps} "
        f"measured steps)"
    )
    header = (
        f"{'preset':<10} {'precision':<9} {'compile':<7} {'batch':>5} {'img/s':>8} {'data wait':>9} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'memory MiB':>10}  MFU reference"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r["ok"]:
            print(f"{r['preset']:<10} {r['precision']:<9} {str(r['compile']):<7} FAILED: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        print(
            f"{r['preset']:<10} {r['precision']:<9} {str(r['compile']):<7} {r['batch_size']:>5} "
            f"{r['images_per_s']:>8.2f} {r['data_wait_share']:>9.1%} {r['tflops_per_s']:>8.3f} {mfu:>7} "
            f"{r['memory_mb']:>10.0f}  {r['peak_tflops'] or 0:.2f} TFLOP/s ({r['peak_note']})"
        )
    if args.preset == "vits14" and not cuda:
        print(
            "\nQuoted, not measured in this run (anchors, same 2-core CPU): lightly-train 0.18 DINOv2, ViT-S/14, "
            "batch 16, 2x224 + 8x98 crops, 65,536 prototypes: "
            f"{LIGHTLY_TRAIN_VITS14_CPU['fp32']} img/s fp32, {LIGHTLY_TRAIN_VITS14_CPU['bf16']} img/s bf16."
        )
        for r in rows:
            if r["ok"] and r["batch_size"] == 16:
                ref = LIGHTLY_TRAIN_VITS14_CPU[r["precision"]]
                print(
                    f"  ours {r['precision']}: {r['images_per_s']:.2f} img/s = {r['images_per_s'] / ref:.2f}x "
                    "the quoted figure (target >= 1.5x)"
                )
        print(
            "Side by side on this machine: run benchmarks/lightly_compare.py in a venv with lightly-train "
            "(see its docstring) right after this script."
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
