"""Slide encoder scaling: time and peak memory of one forward (and forward+backward) of the LongNet slide encoder
at 10k-200k tiles, for the small and GigaPath-sized presets, dilated vs dense attention.

    nice -n 10 python benchmarks/slide_encoder.py                        # the CPU table (fp32), several minutes
    python benchmarks/slide_encoder.py --presets small --sizes 25000,50000 --passes forward
    python benchmarks/slide_encoder.py --check                           # a GPU: bf16, correctness + timings

Every case runs in a fresh process (peak memory = that process's peak RSS on CPU, max_memory_allocated on GPU).
"dense" is the same model with one segment covering the slide and dilation 1 (softmax over all tiles), run only
where it fits (--dense-max-tiles); skipped cases are printed as such. ``--blocks K`` times K blocks of a preset
instead of all (the blocks are identical, so a full model costs depth/K times as much); the GigaPath-sized preset
runs one block by default on a CPU. Targets (figures, not tests): dilated time grows <= 2.3x per doubling from
25k to 200k tiles; a 100k-tile slide runs forward+backward with the small preset within 24 GiB.
Slides are synthetic: a square-ish grid with 30% holes, random tile embeddings. Prints the machine; not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

SIZES = (10_000, 25_000, 50_000, 100_000, 200_000)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}, "
        f"load average {load:.2f}"
    )


def synthetic_slide(n_tiles: int, in_dim: int, *, seed: int = 0):
    """n_tiles tiles on a square-ish grid with 30% of its cells empty, in scrambled order."""
    g = torch.Generator().manual_seed(seed)
    side = int((n_tiles / 0.7) ** 0.5) + 1
    cells = torch.randperm(side * side, generator=g)[:n_tiles]
    grid = torch.stack([cells % side, cells // side], 1)
    return torch.randn(n_tiles, in_dim, generator=g), grid


def build(preset: str, *, mode: str, blocks: int | None, grad_checkpointing: bool, backend: str = "torch"):
    from pathdino.slide import SlideEncoder, slide_encoder_preset

    cfg = slide_encoder_preset(preset)
    if blocks:
        cfg = dataclasses.replace(cfg, depth=blocks)
    if mode == "dense":
        cfg = dataclasses.replace(cfg, segment_lengths=(1 << 30,), dilation_ratios=(1,))
    return SlideEncoder(cfg, grad_checkpointing=grad_checkpointing, attention_backend=backend), cfg


def run_case(args) -> dict:
    """One case in this process: build, one warm-up at 1/10 size, then the timed pass."""
    device = "cuda" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, cfg = build(
        args.preset,
        mode=args.mode,
        blocks=args.blocks,
        grad_checkpointing=args.pass_ == "backward",
        backend=args.backend,
    )
    model = model.to(device)
    backward = args.pass_ == "backward"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emb, grid = synthetic_slide(args.size, cfg.in_dim)
    emb, grid = emb.to(device), grid.to(device)

    def once(n):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(backward):
            out = model(emb[:n], grid[:n])
            if backward:
                (out.cls.float().sum() + out.tiles.float().mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    once(max(64, args.size // 10))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, start_cpu = time.perf_counter(), time.process_time()
    once(args.size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "preset": args.preset,
        "mode": args.mode,
        "pass": args.pass_,
        "size": args.size,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load": os.getloadavg()[0],
        "peak_gib": peak,
        "base_gib": base_rss,
        "depth": cfg.depth,
        "dtype": args.dtype,
        "device": device,
    }


def _subprocess(case: dict, extra: list[str], timeout_s: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        "--preset",
        case["preset"],
        "--mode",
        case["mode"],
        "--pass",
        case["pass"],
        "--size",
        str(case["size"]),
        *extra,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**case, "skipped": f"over --timeout {timeout_s:.0f} s"}
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {**case, "skipped": f"failed (exit {done.returncode}: {tail[:120]})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fits(case: dict, args) -> str | None:
    limit = args.dense_max_tiles.get(case["preset"], 0) if case["mode"] == "dense" else 10**9
    if case["size"] > limit:
        return f"dense skipped above {limit} tiles (quadratic time)"
    if case["pass"] == "backward" and case["size"] > args.backward_max_tiles.get(case["preset"], 10**9):
        return f"forward+backward skipped above {args.backward_max_tiles[case['preset']]} tiles (memory)"
    return None


def _row(r: dict, previous: dict | None) -> str:
    what = f"| {r['preset']} | {r['mode']} | {r['pass']} | {r['size']:,} |"
    if "skipped" in r:
        return f"{what} - | - | - | - | {r['skipped']} |"
    growth = ""
    if previous and "seconds" in previous and previous["size"] * 2 == r["size"]:
        growth = f"{r['cpu_seconds'] / previous['cpu_seconds']:.2f}x"
    return (
        f"{what} {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {growth} | {r['peak_gib']:.2f} | "
        f"blocks={r['depth']} {r['dtype']}, load {r['load']:.1f} |"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,gigapath")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--modes", default="dilated,dense")
    p.add_argument("--passes", default="forward,backward")
    p.add_argument("--blocks", type=int, default=None, help="blocks to time (default: all; gigapath on CPU: 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case before it is skipped")
    p.add_argument("--check", action="store_true", help="GPU mode: bf16 on cuda, a correctness check first")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--pass", dest="pass_", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="torch", help="attention backend: torch | xformers | auto (--check: auto)")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args)))
        return
    gpu = args.check and torch.cuda.is_available()
    if args.check and not gpu:
        sys.exit("--check needs a CUDA GPU")
    print(f"# slide encoder scaling on {machine()}")
    if gpu:
        check_correctness()
    args.dense_max_tiles = {"small": 200_000, "gigapath": 100_000} if gpu else {"small": 25_000, "gigapath": 25_000}
    args.backward_max_tiles = {} if gpu else {"gigapath": 50_000}
    print("| preset | attention | pass | tiles | wall s | CPU s | CPU s x per doubling | peak GiB | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        blocks = args.blocks or (1 if preset == "gigapath" and not gpu else None)
        extra = [
            *(["--blocks", str(blocks)] if blocks else []),
            *(["--device", "cuda", "--dtype", "bf16"] if gpu else []),
            "--backend",
            "auto" if gpu and args.backend == "torch" else args.backend,
        ]
        for mode in args.modes.split(","):
            for pass_ in args.passes.split(","):
                previous = None
                for size in map(int, args.sizes.split(",")):
                    case = {"preset": preset, "mode": mode, "pass": pass_, "size": size}
                    why = _fits(case, args)
                    result = {**case, "skipped": why} if why else _subprocess(case, extra, args.timeout)
                    print(_row(result, previous), flush=True)
                    previous = result


def check_correctness() -> None:
    """GPU: bf16 against fp32 on a 3-slide packed batch (torch path), and the xformers path against the torch path
    (outputs and gradients) when xformers is importable."""
    from pathdino.slide import SlideEncoder, SlideEncoderConfig
    from pathdino.slide.attention_xformers import xformers_importable

    cfg = SlideEncoderConfig(
        in_dim=64, embed_dim=128, depth=2, num_heads=8, segment_lengths=(256, 1024), dilation_ratios=(1, 4)
    )
    lengths = [3000, 700, 1]
    emb = synthetic_slide(sum(lengths), 64)[0].cuda()
    grids = torch.cat([synthetic_slide(n, 64, seed=i)[1] for i, n in enumerate(lengths)]).cuda()
    torch.manual_seed(0)
    model = SlideEncoder(cfg).cuda().eval()
    with torch.no_grad():
        ref = model(emb, grids, lengths)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(emb, grids, lengths)
    err = (low.tiles.float() - ref.tiles).abs().max().item()
    print(f"# check: torch path, bf16 vs fp32 max |diff| on contextualised tiles {err:.3g} (LayerNormed: ~1)")
    if not xformers_importable():
        print("# check: xformers not installed: the xformers path was not checked")
        return
    outs = {}
    for backend in ("torch", "xformers"):
        torch.manual_seed(0)
        m = SlideEncoder(cfg, attention_backend=backend).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(emb, grids, lengths)
            (out.cls.float().square().sum() + out.tiles.float().mean()).backward()
        outs[backend] = (out.tiles.float(), [p.grad.float() for p in m.parameters()])
    diff = (outs["xformers"][0] - outs["torch"][0]).abs().max().item()
    grad = max(
        ((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(outs["xformers"][1], outs["torch"][1])
    )
    verdict = "OK" if diff < 0.1 and grad < 0.05 else "MISMATCH: keep attention_backend='torch'"
    print(
        f"# check: xformers vs torch path (bf16): tiles max |diff| {diff:.3g}, worst relative gradient "
        f"difference {grad:.3g}: {verdict}"
    )


if __name__ == "__main__":
    main()
