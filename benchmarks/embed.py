"""Embedding throughput: end-to-end `embed_store` tiles/s vs model-forward-only tiles/s, in the same run, for one
process and for N processes (`pathdino embed --shard i/N` started at once into one output).

    python benchmarks/embed.py                                   # ViT-S/14 sizes (untrained), 224-px tiles
    python benchmarks/embed.py --processes 2                     # also 2 shard processes (threads split)
    python benchmarks/embed.py --arch vit_large --tiles 20000 --batch-size 512 --workers 8     # a GPU
    python benchmarks/embed.py --encoder runs/enc --store tiles.zarr

End to end = read shards, decode (DataLoader workers), host->device, normalise, forward, copy back, write Zarr.
Forward only = the same normalise + forward on a batch already on the device. The target is end-to-end >= 0.9x
forward-only (decoding fully hidden behind the model). Without --store, a store is built by tiling the bundled
sample slide once and repeating its encoded tiles over several slides (decoding cost is that of real tiles).
Prints the machine; not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# `python benchmarks/embed.py` puts benchmarks/ first on sys.path, where benchmarks/tiling.py would shadow the
# `tiling` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores available, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def build_store(url: str, tile_px: int, n_tiles: int, tiles_per_slide: int) -> str:
    """Tile the sample slide once, then write slides that cycle through its encoded tiles."""
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides
    from tiling.runner import run_tiling
    from tiling.store import TileStore
    from tiling.store_write import TileStoreWriter

    seed_url = url + ".seed"
    run_tiling(collect_slides([str(SAMPLE)]), seed_url, TilingConfig(workers=1, tile_px=tile_px, qc_images=False))
    seed = TileStore(seed_url)
    src = seed.slide(seed.slide_ids[0])
    encoded, coords = src.read_encoded(0, src.n_tiles), src.coords
    writer = TileStoreWriter(url)
    for s, start in enumerate(range(0, n_tiles, tiles_per_slide)):
        n = min(tiles_per_slide, n_tiles - start)
        idx = np.arange(start, start + n) % len(encoded)
        slide = writer.begin_slide(f"bench-{s:04d}", tile_px)
        slide.add([encoded[i] for i in idx], coords[idx], np.ones(n, np.float32))
        slide.commit({**src.attrs, "slide_id": f"bench-{s:04d}", "source_fingerprint": f"bench-{s}"})
    shutil.rmtree(seed_url, ignore_errors=True)
    return url


def forward_only(
    encoder: Path, n_tiles: int, batch_size: int, device: torch.device, bf16: bool, tile_px: int, mean_patch: bool
) -> float:
    """tiles/s of normalise + forward on uint8 batches already on the device (no decoding, no transfer)."""
    from pathdino import load_encoder
    from pathdino.embed import encode_tokens

    model, transform = load_encoder(encoder, device=str(device))
    batch = torch.randint(0, 256, (batch_size, tile_px, tile_px, 3), dtype=torch.uint8, device=device)
    n_batches = max(1, round(n_tiles / batch_size))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cls, _ = encode_tokens(model, transform.batch(batch), mean_patch)
        return cls.float().sum()

    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels, allocator
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n_batches * batch_size / (time.perf_counter() - t0)


def _forward_worker(
    encoder: str,
    n_tiles: int,
    batch_size: int,
    device: str,
    bf16: bool,
    tile_px: int,
    mean_patch: bool,
    threads: int,
    start,
    results,
) -> None:
    torch.set_num_threads(threads)
    start.wait()
    results.put(forward_only(Path(encoder), n_tiles, batch_size, torch.device(device), bf16, tile_px, mean_patch))


def multi(args, store: str, encoder: Path, work: Path, n_store: int, device: torch.device, bf16: bool) -> None:
    """N shard processes at once: forward-only (N processes, summed) and end to end (wall clock of the slowest,
    and per-process loop times), threads and decoding workers split between them."""
    import multiprocessing as mp
    import re
    import subprocess

    n = args.processes
    threads = max(1, torch.get_num_threads() // n)
    workers = max(0, args.workers // n)
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_forward_worker,
            args=(
                str(encoder),
                min(n_store, args.tiles) // n,
                args.batch_size,
                str(device),
                bf16,
                args.tile_px,
                args.mean_patch,
                threads,
                start,
                results,
            ),
        )
        for _ in range(n)
    ]
    for proc in procs:
        proc.start()
    time.sleep(3.0)  # let every process import torch and build the model before the clock starts
    start.set()
    fwd = sum(results.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = work / f"emb-{n}"
    cmd = [
        sys.executable,
        "-m",
        "pathdino.embed",
        store,
        "--encoder",
        str(encoder),
        "--out",
        str(out),
        "--batch-size",
        str(args.batch_size),
        "-j",
        str(workers),
        "--precision",
        args.precision,
        "--part-tiles",
        str(args.part_tiles),
        "--no-progress",
    ] + (["--device", args.device] if args.device else [])
    t0 = time.perf_counter()
    runs = [
        subprocess.Popen(
            cmd + ["--shard", f"{i}/{n}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(n)
    ]
    texts = [r.communicate()[0] for r in runs]
    wall = time.perf_counter() - t0
    loops = [re.search(r"embedded \d+ slide\(s\), (\d+) tiles in ([\d.]+) s", t) for t in texts]
    if not all(loops):
        print("multi-process run failed:\n" + "\n".join(texts))
        return
    tiles = sum(int(m[1]) for m in loops)
    slowest = max(float(m[2]) for m in loops)
    print(f"{n} processes, forward only : {fwd:10.1f} tiles/s (sum of {n}, {threads} thread(s) each)")
    print(
        f"{n} processes, end to end   : {tiles / slowest:10.1f} tiles/s ({tiles} tiles, slowest loop "
        f"{slowest:.1f} s, {workers} decoding worker(s) each); {tiles / wall:.1f} tiles/s by wall clock "
        f"including process start ({wall:.1f} s)"
    )
    print(f"{n} processes, ratio e2e / fwd-only: {tiles / slowest / fwd:.2f}")


def main() -> None:
    from pathdino.models.backbone import ARCHS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="an existing tile store (default: built from the sample slide)")
    p.add_argument("--encoder", help="an exported encoder (default: an untrained one of --arch's sizes)")
    p.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="sizes of the untrained encoder")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--tiles", type=int, default=512, help="tiles in the built store (and forward-only tiles)")
    p.add_argument("--tiles-per-slide", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--mean-patch", action="store_true")
    p.add_argument("--processes", type=int, default=2, help="also run this many shard processes (1: skip)")
    p.add_argument("--part-tiles", type=int, default=16384)
    args = p.parse_args()

    from pathdino.embed import EmbedOptions, embed_store
    from pathdino.export import export_untrained_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    print("machine:", machine())
    work = Path(tempfile.mkdtemp(prefix="pathdino-bench-embed-"))
    try:
        store = args.store or build_store(str(work / "tiles.zarr"), args.tile_px, args.tiles, args.tiles_per_slide)
        if args.encoder:
            encoder = Path(args.encoder)
        else:
            dim, depth, heads, _ = ARCHS[args.arch]
            encoder = export_untrained_encoder(
                work / "encoder", tile_px=args.tile_px, embed_dim=dim, depth=depth, num_heads=heads
            ).out_dir
        from tiling.store import TileStore

        n_store = sum(e.n_tiles for e in TileStore(store).entries.values())
        print(
            f"encoder: {encoder} ({args.arch if not args.encoder else 'given'}), store: {n_store} tiles of "
            f"{args.tile_px} px, batch {args.batch_size}, {args.workers} decoding workers, {device}, "
            f"{'bf16 autocast' if bf16 else 'fp32'}"
        )

        def fwd_only() -> float:
            return forward_only(
                encoder, min(n_store, args.tiles), args.batch_size, device, bf16, args.tile_px, args.mean_patch
            )

        # Forward-only before and after the end-to-end run: on a shared machine the load drifts; the mean of the
        # two brackets the end-to-end measurement.
        fwd_before = fwd_only()
        report = embed_store(
            store,
            encoder,
            work / "emb",
            EmbedOptions(
                batch_size=args.batch_size,
                num_workers=args.workers,
                device=str(device),
                precision=args.precision,
                mean_patch=args.mean_patch,
                progress=False,
                part_tiles=args.part_tiles,
            ),
        )
        fwd_after = fwd_only()
        fwd = (fwd_before + fwd_after) / 2
        steady = (report.n_tiles - args.batch_size) / max(report.seconds - report.startup_s, 1e-9)
        print(f"forward only          : {fwd:10.1f} tiles/s (before {fwd_before:.1f}, after {fwd_after:.1f})")
        print(
            f"end to end            : {report.tiles_per_s:10.1f} tiles/s ({report.n_tiles} tiles in "
            f"{report.seconds:.1f} s, of which {report.startup_s:.1f} s before the first batch)"
        )
        print(f"end to end, steady    : {steady:10.1f} tiles/s (after the first batch)")
        print(
            f"ratio e2e / fwd-only  : {report.tiles_per_s / fwd:.2f} overall, {steady / fwd:.2f} steady (target >= 0.9)"
        )
        if args.processes > 1:
            multi(args, store, encoder, work, n_store, device, bf16)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
