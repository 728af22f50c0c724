"""pathdino vs lightly-train, alternately (A B A B) on the same tiles and settings: img/s ratio and MFU.

One command prints everything the speed goals ask for:

    python benchmarks/side_by_side.py --lightly-python /work/.venv-lightly/bin/python       # fp32 and bf16
    python benchmarks/side_by_side.py --precision fp32 --rounds 3 --lightly-python ...
    python benchmarks/side_by_side.py --precision bf16 --compile --warmup 2 --lightly-python ...   # compiled blocks

Each round runs pathdino (``benchmarks/train_step.py``, the real loop) and then lightly-train 0.18
(``benchmarks/lightly_compare.py``, in its own environment: see that file's docstring for the venv), each in a fresh
process, per precision. Both train ViT-S/14 reg4 from scratch, batch 16, 2 x 224 + 8 x 98 crops, 65,536 prototypes
with one head for DINO and iBOT, KoLeo 0.1, drop path 0.3 uniform (``configs/train/vits14.yaml``), on the same
224-px tiles cut from the bundled slide (PNG files for lightly-train, a tile store of the same pixels for pathdino),
loading in the main process. Compared: "step" images/s with loading excluded (forward, backward, optimizer, teacher
update) from both; MFU = FLOPs per image x img/s over a large matmul's throughput measured on this CPU in the same
precision just before each pathdino run, FLOPs by pathdino.models.flops as each side computes them: pathdino's
trimmed last block (queries for the tokens the objective reads only) for pathdino, the full forward of every crop
for lightly-train. The img/s ratio is the like-for-like comparison; the MFUs say how close each is to the matmul bound.

Alternating and taking the ratio within each round is what makes figures from a shared machine usable: load from
other jobs hits both sides of a round about equally. Name the CPU with the figures (printed below).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def make_tiles(folder: Path, store: Path, n_tiles: int) -> None:
    """The most tissue-rich 224-px windows of the bundled slide as PNGs, and a tile store of the same pixels."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    from lightly_compare import SAMPLE_SLIDE, cut_tiles

    from tiling.store import encode_tile
    from tiling.store_write import TileStoreWriter

    paths = cut_tiles(SAMPLE_SLIDE, folder, n_tiles)
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    # JPEG, as pathdino tile stores hold: the pixels differ from the PNGs by JPEG rounding only.
    sw = TileStoreWriter(store).begin_slide("cmu1", 224, encoding="jpeg")
    sw.add(
        [encode_tile(np.ascontiguousarray(t)) for t in tiles],
        np.zeros((len(tiles), 2), np.int64),
        np.ones(len(tiles), np.float32),
    )
    sw.commit({"source_path": "CMU-1-Small-Region.svs", "source_fingerprint": "side_by_side"})


def untrimmed_flops_per_image(batch: int) -> float:
    """The step's FLOPs per image with every crop's full forward (no last-block trim): what lightly-train computes
    for this model and these crops, so its MFU is taken on this count; pathdino's on what pathdino computes."""
    sys.path.insert(0, str(ROOT))
    from pathdino.models import dinov2_train_flops_per_image
    from pathdino.models.backbone import SUBSET_DROP_PATH_ABOVE
    from pathdino.train.config import crop_plan, load_config

    cfg = load_config(ROOT / "configs" / "train" / "vits14.yaml", [f"train.batch_size={batch}"])
    plan, mc = crop_plan(cfg), cfg.model
    rate = mc.backbone.drop_path_rate
    return dinov2_train_flops_per_image(
        mc.backbone,
        mc.dino_head,
        mc.ibot_head or mc.dino_head,
        plan.global_px,
        plan.local_px,
        plan.n_global,
        plan.n_local,
        plan.mask_probability,
        plan.mask_ratio_mean,
        subset_drop_path=rate if rate > SUBSET_DROP_PATH_ABOVE else 0.0,
        trim_last_block=False,
    ).total


def run_pathdino(
    store: Path, precision: str, steps: int, warmup: int, batch: int, out: Path, compile_: bool = False
) -> dict:
    cmd = [
        sys.executable,
        str(BENCH / "train_step.py"),
        "--preset",
        "vits14",
        "--batch-size",
        str(batch),
        "--precision",
        precision,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--data",
        "store",
        "--store",
        str(store),
        "--json",
        str(out),
        "--compile",
        "yes" if compile_ else "no",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if proc.returncode or not rows or not rows[0].get("ok"):
        return {"ok": False, "error": (rows[0].get("error") if rows else proc.stderr[-800:])}
    return rows[0]


def run_lightly(python: str, images: Path, precision: str, steps: int, warmup: int, batch: int, out: Path) -> dict:
    cmd = [
        python,
        str(BENCH / "lightly_compare.py"),
        "--precision",
        precision,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--batch-size",
        str(batch),
        "--images",
        str(images),
        "--json",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # keep pathdino out of its environment
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    rows = json.loads(out.read_text()) if out.is_file() else []
    if proc.returncode or not rows or not rows[0].get("ok"):
        return {"ok": False, "error": (rows[0].get("error") if rows else proc.stderr[-800:])}
    return rows[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--lightly-python",
        default=os.environ.get("LIGHTLY_PYTHON", "/work/.venv-lightly/bin/python"),
        help="python of the environment holding lightly-train 0.18",
    )
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds per precision (default 2)")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per run (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="discarded steps before them (default 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--compile",
        action="store_true",
        help="pathdino with train.compile=true (each ViT block through torch.compile; use --warmup 2: "
        "the first steps compile)",
    )
    args = p.parse_args()
    if not Path(args.lightly_python).is_file():
        p.error(f"--lightly-python {args.lightly_python} not found; create the venv (benchmarks/lightly_compare.py)")

    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    results: dict[str, list[tuple[dict, dict]]] = {pr: [] for pr in precisions}
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        tmp = Path(tmp)
        make_tiles(tmp / "tiles", tmp / "tiles.zarr", args.batch_size * (args.warmup + args.steps))
        for rnd in range(args.rounds):
            for precision in precisions:
                a = run_pathdino(
                    tmp / "tiles.zarr",
                    precision,
                    args.steps,
                    args.warmup,
                    args.batch_size,
                    tmp / f"a_{rnd}_{precision}.json",
                    args.compile,
                )
                b = run_lightly(
                    args.lightly_python,
                    tmp / "tiles",
                    precision,
                    args.steps,
                    args.warmup,
                    args.batch_size,
                    tmp / f"b_{rnd}_{precision}.json",
                )
                results[precision].append((a, b))
                print(json.dumps({"round": rnd + 1, "precision": precision, "pathdino": a, "lightly": b}), flush=True)

    full_flops = untrimmed_flops_per_image(args.batch_size)
    done = [a for rows in results.values() for a, _ in rows if a.get("ok")]
    flags = cpu_flags()
    bf16_native = "avx512_bf16" in flags or "amx_bf16" in flags
    print(
        f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; native bf16: "
        f"{'avx512_bf16' if 'avx512_bf16' in flags else ''}{' amx_bf16' if 'amx_bf16' in flags else ''}"
        f"{'' if bf16_native else 'none'}; load average at the end {os.getloadavg()[0]:.1f}"
    )
    print(
        f"ViT-S/14 reg4, batch {args.batch_size}, 2x224 + 8x98, 65,536 prototypes, drop path 0.3; "
        f"{args.warmup} warm-up + {args.steps} measured steps per run; alternating pathdino (A"
        f"{', train.compile=true' if args.compile else ''}) / lightly-train (B)"
    )
    header = (
        f"{'precision':<9} {'round':>5} {'A img/s':>8} {'B img/s':>8} {'A/B':>6} {'A MFU':>7} {'B MFU':>7} "
        f"{'matmul TFLOP/s':>15}"
    )
    print(header)
    print("-" * len(header))
    for precision, rows in results.items():
        ratios = []
        for i, (a, b) in enumerate(rows, 1):
            if not (a.get("ok") and b.get("ok")):
                print(
                    f"{precision:<9} {i:>5}  FAILED: pathdino {a.get('error', 'ok')} | lightly {b.get('error', 'ok')}"
                )
                continue
            ai, bi = a["step_images_per_s"], b["step_images_per_s"]
            peak = a["peak_tflops"]
            ratios.append(ai / bi)
            print(
                f"{precision:<9} {i:>5} {ai:>8.3f} {bi:>8.3f} {ai / bi:>5.2f}x "
                f"{ai * a['flops_per_image'] / 1e12 / peak:>7.1%} {bi * full_flops / 1e12 / peak:>7.1%} "
                f"{peak:>15.3f}"
            )
        if ratios:
            print(
                f"{precision:<9} {'mean':>5} {'':>8} {'':>8} {statistics.mean(ratios):>5.2f}x  (target >= 1.3x, "
                "MFU >= 75%)"
            )
    print(
        "img/s: loading excluded on both sides. MFU = FLOPs/img x img/s / the measured matmul throughput (before "
        "each pathdino run), FLOPs counted as each side computes them (subset drop path on both): pathdino "
        f"{done[0]['flops_per_image'] / 1e9 if done else float('nan'):.1f} GFLOPs/img (its last block trimmed to "
        f"the tokens the objective reads), lightly-train {full_flops / 1e9:.1f} GFLOPs/img (full forward of every "
        "crop). The img/s ratio is the like-for-like figure."
    )


if __name__ == "__main__":
    main()
