"""Tiling benchmark: pathdino vs hs2p per core, against the decode+encode bound, on generated real-tissue slides.

Generates (never commits) pyramids by mirroring the bundled sample slide's pixels (256-px source tiles, levels
1/4/16/64 as top-level IFDs, Aperio descriptions) and prints, in ONE run, for each case:
  - pathdino end-to-end tiles/s with one worker (in-process: one core), peak RSS of the process tree;
  - hs2p 6.1.0 on the same slide, one worker, 224 px at 0.5 µm/px, tiles saved (run from a separate venv; skipped
    with a message when that venv is absent), alternating with pathdino when --repeats > 1;
  - the decode+encode bound measured in the same run: the source tiles under the kept tiles fetched as raw bytes
    and decoded once each by the run's decoder (simplejpeg or tifffile/imagecodecs; full, or reduced by the codec
    for virtual levels), plus one JPEG q90 encode per kept tile; and pathdino / bound;
Cases: "20x" (JPEG mosaic at 0.499 µm/px, level 0 read as is), "40x" (the same file declared 0.2527 µm/px, as an
Aperio 40x scan: level 0 at 1/2 is a virtual level), "j2k-40x" (an Aperio 33003 JPEG 2000 mosaic at 0.2527 µm/px).
Then: all cores on the 20x slide, a mixed 16-slide folder (small, big, 40x, failing) with all cores (tiles/s, CPU
busy share, peak RSS), and the PSNR of reduced decoding against the area mean of the same pixels.

    python benchmarks/tiling.py [--size 40000] [--j2k-size 8000] [--repeats 1] [--hs2p-python PATH]
                                [--cases 20x,40x,j2k-40x] [--no-folder] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file is named like the `tiling` package: keep its folder off the import path so `import tiling` finds the
# package, not this script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import openslide  # noqa: E402
import psutil  # noqa: E402
import tifffile  # noqa: E402

from tiling.config import TilingConfig  # noqa: E402
from tiling.inputs import SlideInput, collect_slides  # noqa: E402
from tiling.runner import run_tiling  # noqa: E402
from tiling.store import TileStore, encode_tile  # noqa: E402
from tiling.tile_decode import TileDecoder, area_mean  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SOURCE_TILE = 256
HS2P_PYTHON = Path(os.environ.get("PATHDINO_HS2P_PYTHON", "/work/.venv-hs2p/bin/python"))
MPP_20X, MPP_40X = 0.499, 0.2527


def _mirror_index(n: int, period: int) -> np.ndarray:
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def _ycbcr(tile: np.ndarray) -> np.ndarray:
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
    return np.clip(np.rint(tile.astype(np.float32) @ m.T + np.array([0, 128, 128], np.float32)), 0, 255).astype(
        np.uint8
    )


def write_mosaic(path: Path, size: int, mpp: float, j2k: bool = False) -> None:
    """A size x size pyramid (downsamples 1, 4, 16, 64) mirroring the sample slide, written tile by tile: JPEG q90,
    or Aperio JPEG 2000 with YCbCr samples (compression 33003)."""
    with openslide.OpenSlide(str(SAMPLE)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for ds in (1, 4, 16, 64):
            level_src = (
                src
                if ds == 1
                else src[: src.shape[0] // ds * ds, : src.shape[1] // ds * ds]
                .reshape(src.shape[0] // ds, ds, src.shape[1] // ds, ds, 3)
                .mean(axis=(1, 3))
                .astype(np.uint8)
            )
            h = w = max(size // ds, 1)
            ys, xs = _mirror_index(h, level_src.shape[0]), _mirror_index(w, level_src.shape[1])

            def tiles(h=h, w=w, ys=ys, xs=xs, level_src=level_src):  # bound now: the writer consumes it in this pass
                for ty in range(0, h, SOURCE_TILE):
                    for tx in range(0, w, SOURCE_TILE):
                        tile = np.full((SOURCE_TILE, SOURCE_TILE, 3), 255, np.uint8)
                        yy, xx = ys[ty : ty + SOURCE_TILE], xs[tx : tx + SOURCE_TILE]
                        tile[: len(yy), : len(xx)] = level_src[yy[:, None], xx[None, :]]
                        yield _ycbcr(tile) if j2k else tile

            codec = "J2K/YUV16 Q=70" if j2k else "JPEG Q=90"
            desc = (
                f"Aperio Image Library pathdino-benchmark\r\n{w}x{h} [0,0 {w}x{h}] ({SOURCE_TILE}x{SOURCE_TILE}) "
                f"{codec}|AppMag = {40 if mpp < 0.4 else 20}|MPP = {mpp * ds}"
            )
            options = (
                dict(compression=33003, compressionargs={"level": 80})
                if j2k
                else dict(compression="jpeg", compressionargs={"level": 90})
            )
            tw.write(
                tiles(),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(SOURCE_TILE, SOURCE_TILE),
                photometric="rgb",
                description=desc,
                metadata=None,
                subfiletype=0,
                **options,
            )


class PeakMemory:
    """Samples the RSS of this process and all its children every 20 ms; `peak_bytes` is the largest sum.

    The sampling itself costs ~8% of a core (psutil walks /proc for the children); `cpu_s`, its own CPU time, is
    subtracted from the CPU time of the runs it watches, which would otherwise include it (both tools alike).
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self.cpu_s = time.thread_time()
            time.sleep(0.02)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_pathdino(slides: list[SlideInput], url: Path, workers: int) -> dict:
    shutil.rmtree(url, ignore_errors=True)
    cfg = TilingConfig(workers=workers, qc_images=True)
    with PeakMemory() as mem:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        outcomes = run_tiling(slides, str(url), cfg)
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0 - mem.cpu_s
    n_tiles = sum(o.n_tiles for o in outcomes)
    return {
        "tiles": n_tiles,
        "seconds": elapsed,
        "rate": n_tiles / elapsed,
        "rss_gib": mem.peak_bytes / 2**30,
        "busy": cpu / (elapsed * workers),
        "failed": sum(o.status == "failed" for o in outcomes),
        "cpu_rate": n_tiles / cpu,
    }


def run_hs2p(slide: Path, mpp: float | None, out: Path) -> dict | None:
    """hs2p 6.1.0 in its own venv: one worker, 224 px at 0.5 µm/px, tiles saved; None when it is not installed."""
    if not HS2P_PYTHON.exists():
        return None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = [{"sample_id": slide.stem, "image_path": str(slide)}]
    if mpp is not None:
        rows[0]["spacing_at_level_0"] = mpp
    with open(out / "slides.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = subprocess.run(
        [
            str(HS2P_PYTHON),
            "-c",
            "import hs2p, pathlib; print(pathlib.Path(hs2p.__file__).parent / 'configs' / 'default.yaml')",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cmd = [
        str(HS2P_PYTHON),
        "-m",
        "hs2p",
        config.stdout.strip(),
        "--skip-datetime",
        "--output-dir",
        str(out / "run"),
        f"csv={out / 'slides.csv'}",
        "save_tiles=true",
        "speed.num_workers=1",
        "tiling.params.requested_tile_size_px=224",
        "tiling.params.requested_spacing_um=0.5",
    ]
    with PeakMemory() as mem:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0 - mem.cpu_s
    if result.returncode:
        print(f"hs2p failed ({result.returncode}): {result.stderr[-2000:]}")
        return None
    with open(out / "run" / "process_list.csv") as fh:
        n_tiles = sum(int(r["num_tiles"] or 0) for r in csv.DictReader(fh))
    return {
        "tiles": n_tiles,
        "seconds": elapsed,
        "rate": n_tiles / elapsed,
        "rss_gib": mem.peak_bytes / 2**30,
        "cpu_rate": n_tiles / cpu,
    }


def _source_tiles(slide_path: Path, store_url: Path, slide_id: str):
    """(tiff, page, [(index, raw bytes)] of the source tiles under the kept tiles (sorted), store attrs, slide)."""
    slide = TileStore(str(store_url)).slide(slide_id)
    attrs = slide.attrs
    coords, side = slide.coords / attrs["read_downsample"], attrs["read_tile_px"]
    needed: set[int] = set()
    tif = tifffile.TiffFile(slide_path)
    page = tif.pages[attrs["read_level"]]
    across = -(-page.imagewidth // page.tilewidth)
    for x, y in coords:
        for ty in range(int(y // page.tilelength), int((y + side - 1) // page.tilelength) + 1):
            for tx in range(int(x // page.tilewidth), int((x + side - 1) // page.tilewidth) + 1):
                needed.add(ty * across + tx)
    fh = tif.filehandle
    raw = []
    for index in sorted(needed):
        fh.seek(page.dataoffsets[index])
        raw.append((index, fh.read(page.databytecounts[index])))
    return tif, page, raw, attrs, slide


def decode_encode_bound(slide_path: Path, store_url: Path, slide_id: str) -> dict:
    """Decode each source tile under the kept tiles once, with the decoder the run used (simplejpeg where it was
    adopted, else tifffile/imagecodecs; reduced while decoding for virtual levels), and encode each kept tile once.
    Also times imagecodecs' full decode, the reference of earlier rounds."""
    import imagecodecs

    tif, page, raw, attrs, slide = _source_tiles(slide_path, store_url, slide_id)
    decoder = TileDecoder(page)
    decoder.adopt_simplejpeg([(data, index) for index, data in raw[:3]])
    reduction = int(attrs.get("read_reduction", 1))
    reduced = reduction > 1 and ("DCT" in attrs.get("decoder", "") or "OpenJPEG" in attrs.get("decoder", ""))
    reference = imagecodecs.jpeg8_decode if decoder.reduced_kind == "jpeg-dct" else imagecodecs.jpeg2k_decode
    tables = page.jpegtables

    def timed(fn) -> float:
        t0 = time.process_time()
        for index, data in raw:
            fn(data, index)
        return time.process_time() - t0

    reference_s = timed(lambda d, i: reference(d, tables=tables) if tables else reference(d))
    full_s = timed(decoder.decode)
    reduced_s = (
        timed(lambda d, i: decoder.decode_reduced(d, reduction))
        if reduction > 1 and decoder.reduced_kind
        else float("nan")
    )
    tiles = slide.read_tiles(0, min(slide.n_tiles, 2000))
    t0 = time.process_time()
    for tile in tiles:
        encode_tile(tile, "jpeg", jpeg_quality=90, jpeg_subsampling="420")
    encode_per_tile = (time.process_time() - t0) / max(len(tiles), 1)
    tif.close()
    decode_s = reduced_s if reduced else full_s
    n = slide.n_tiles
    return {
        "n_source": len(raw),
        "full_decode_per_s": len(raw) / full_s,
        "reduced_decode_per_s": len(raw) / reduced_s,
        "reference_decode_per_s": len(raw) / reference_s,
        "decoder": decoder.describe(reduction, reduced),
        "encode_per_s": 1 / encode_per_tile,
        "bound": n / (decode_s + n * encode_per_tile),
        "reduced": reduced,
    }


def reduced_quality(slide_path: Path, reduction: int = 2, n: int = 64) -> tuple[float, float]:
    """PSNR (dB) of tiles reduced while decoding vs the area mean of the same tiles' full decode; and mean |diff|."""
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        decoder = TileDecoder(page)
        fh = tif.filehandle
        picks = []
        for index in ((i * 7919) % len(page.dataoffsets) for i in range(n)):
            fh.seek(page.dataoffsets[index])
            picks.append((fh.read(page.databytecounts[index]), index))
        decoder.adopt_simplejpeg(picks[:3])  # as the run decodes
        errors, absdiff = [], []
        for data, index in picks:
            ours = decoder.decode_reduced(data, reduction).astype(np.float64)
            reference = area_mean(decoder.decode(data, index), reduction).astype(np.float64)
            errors.append(((ours - reference) ** 2).mean())
            absdiff.append(np.abs(ours - reference).mean())
    return 10 * np.log10(255**2 / float(np.mean(errors))), float(np.mean(absdiff))


def make_folder(folder: Path, scale: float) -> list[SlideInput]:
    """16 slides: 12 JPEG mosaics of mixed sizes (20x and 40x), 2 JPEG 2000, 2 that fail (unopenable, too coarse)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 14000, 16000]
    for i, size in enumerate(sizes):
        path = folder / f"s{i:02d}-{size}.svs"
        if not path.exists():
            write_mosaic(path, int(size * scale), MPP_40X if i % 3 == 2 else MPP_20X)
    for i, size in enumerate((2000, 4000)):
        path = folder / f"j{i}-{size}.svs"
        if not path.exists():
            write_mosaic(path, int(size * scale), MPP_40X, j2k=True)
    (folder / "f0-unopenable.svs").write_bytes(b"not a slide" * 100)
    coarse = folder / "f1-coarse.svs"
    if not coarse.exists():
        write_mosaic(coarse, int(3000 * scale), 2.0)  # 2 µm/px: coarser than 0.5, fails cleanly
    return collect_slides([str(folder)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40_000, help="level-0 side of the JPEG mosaic, px")
    parser.add_argument("--j2k-size", type=int, default=8_000, help="level-0 side of the JPEG 2000 mosaic, px")
    parser.add_argument("--cases", default="20x,40x,j2k-40x")
    parser.add_argument("--repeats", type=int, default=1, help="pathdino/hs2p pairs per case, alternating")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="the 'all cores' runs")
    parser.add_argument("--no-folder", action="store_true", help="skip the 16-slide folder")
    parser.add_argument("--folder-scale", type=float, default=1.0, help="scale the folder's slide sizes")
    parser.add_argument("--keep", type=Path, help="keep the generated slides and stores here")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="pathdino-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = [c for c in args.cases.split(",") if c]
    jpeg_path, j2k_path = work / "mosaic.svs", work / "mosaic-j2k.svs"
    for path, size, j2k, wanted in [
        (jpeg_path, args.size, False, {"20x", "40x"}),
        (j2k_path, args.j2k_size, True, {"j2k-40x"}),
    ]:
        if wanted & set(cases) and not path.exists():
            t = time.perf_counter()
            write_mosaic(path, size, MPP_20X if not j2k else MPP_40X, j2k=j2k)
            print(
                f"generated {path.name}: {size}x{size} ({path.stat().st_size / 1e9:.2f} GB) in "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores available, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    if not HS2P_PYTHON.exists():
        print(
            f"hs2p: skipped ({HS2P_PYTHON} not found; install with `python -m venv /work/.venv-hs2p && "
            f"/work/.venv-hs2p/bin/pip install 'hs2p[openslide]==6.1.0'` or set PATHDINO_HS2P_PYTHON)"
        )

    spec = {"20x": (jpeg_path, MPP_20X), "40x": (jpeg_path, MPP_40X), "j2k-40x": (j2k_path, None)}
    rows = []
    for case in cases:
        path, mpp = spec[case]
        slides = collect_slides([str(path)], slide_mpp=mpp)
        ours, peer = [], []
        for r in range(args.repeats):
            order = ("pathdino", "hs2p") if r % 2 == 0 else ("hs2p", "pathdino")
            for who in order:
                if who == "pathdino":
                    ours.append(run_pathdino(slides, work / f"{case}-1w.zarr", 1))
                else:
                    result = run_hs2p(path, mpp, work / f"hs2p-{case}")
                    if result:
                        peer.append(result)
        bound = decode_encode_bound(path, work / f"{case}-1w.zarr", slides[0].slide_id)
        attrs = TileStore(str(work / f"{case}-1w.zarr")).slide(slides[0].slide_id).attrs
        rows.append((case, ours, peer, bound, attrs))
        print(f"... {case} done", flush=True)

    print(
        "\n| case | pathdino tiles/s (1 core) | hs2p 6.1.0 tiles/s (1 worker) | ratio | tiles kept (pathdino / hs2p) "
        "| decode+encode bound /s | pathdino / bound | peak RSS GiB (pathdino / hs2p) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case, ours, peer, bound, _ in rows:
        our_rate = np.mean([o["rate"] for o in ours])
        peer_rate = np.mean([p["rate"] for p in peer]) if peer else float("nan")
        peer_tiles = peer[0]["tiles"] if peer else "-"
        peer_rss = f"{max(p['rss_gib'] for p in peer):.2f}" if peer else "-"
        print(
            f"| {case} | {our_rate:,.0f} | {peer_rate:,.0f} | {our_rate / peer_rate:.2f}x | {ours[0]['tiles']:,} / "
            f"{peer_tiles} | {bound['bound']:,.0f} | {our_rate / bound['bound']:.2f} | "
            f"{max(o['rss_gib'] for o in ours):.2f} / {peer_rss} |"
        )
    # On a shared machine wall-clock rates move with other users' load; CPU-time rates (tiles per CPU-second of the
    # process tree) do not, and the bound is measured in CPU time too.
    print("\nper CPU-second (robust to other load on the machine):")
    print("| case | pathdino tiles/CPU-s | hs2p tiles/CPU-s | ratio | pathdino / bound |")
    print("|---|---|---|---|---|")
    for case, ours, peer, bound, _ in rows:
        our_cpu = np.mean([o["cpu_rate"] for o in ours])
        peer_cpu = np.mean([p["cpu_rate"] for p in peer]) if peer else float("nan")
        print(
            f"| {case} | {our_cpu:,.0f} | {peer_cpu:,.0f} | {our_cpu / peer_cpu:.2f}x | "
            f"{our_cpu / bound['bound']:.2f} |"
        )
    if HS2P_PYTHON.exists():
        t0 = time.perf_counter()
        subprocess.run([str(HS2P_PYTHON), "-c", "import hs2p.__main__"], check=True)
        print(
            f"hs2p's figures are whole commands and include its start-up (interpreter and imports: "
            f"{time.perf_counter() - t0:.2f} s here); pathdino's are `run_tiling` in this process."
        )
    print()
    for case, ours, peer, bound, attrs in rows:
        runs = ", ".join(f"{o['rate']:,.0f}" for o in ours)
        peer_runs = ", ".join(f"{p['rate']:,.0f}" for p in peer) or "-"
        print(
            f"{case}: read level {attrs['read_level']} at 1/{attrs.get('read_reduction', 1)}, scale "
            f"{attrs['scale']:.4g}, effective {attrs['effective_mpp']:.4f} µm/px; decoder: {attrs.get('decoder')}"
        )
        print(
            f"    runs: pathdino {runs}; hs2p {peer_runs} tiles/s. {bound['n_source']:,} source tiles decoded by "
            f"{bound['decoder']}: full {bound['full_decode_per_s']:,.0f}/s, reduced "
            f"{bound['reduced_decode_per_s']:,.0f}/s (imagecodecs full: {bound['reference_decode_per_s']:,.0f}/s); "
            f"encode {bound['encode_per_s']:,.0f} tiles/s; bound uses the "
            f"{'reduced' if bound['reduced'] else 'full'} decode"
        )

    if "20x" in cases and args.workers > 1:
        slides = collect_slides([str(jpeg_path)], slide_mpp=MPP_20X)
        res = run_pathdino(slides, work / "20x-all.zarr", args.workers)
        one = np.mean([o["rate"] for o in rows[cases.index("20x")][1]])
        print(
            f"\n20x, {args.workers} workers on one slide: {res['rate']:,.0f} tiles/s "
            f"({res['rate'] / args.workers:,.0f} per core, {res['rate'] / one:.2f}x one worker), "
            f"CPU busy {res['busy']:.0%}, peak RSS {res['rss_gib']:.2f} GiB"
        )
    if "40x" in cases or "20x" in cases:
        print(
            "reduced JPEG decoding (1/2) vs area mean of the same pixels: PSNR %.1f dB, mean |diff| %.2f"
            % reduced_quality(jpeg_path)
        )
    if "j2k-40x" in cases:
        print(
            "reduced JPEG 2000 decoding (1/2) vs area mean of the same pixels: PSNR %.1f dB, mean |diff| %.2f"
            % reduced_quality(j2k_path)
        )
    if not args.no_folder:
        t = time.perf_counter()
        slides = make_folder(work / "folder", args.folder_scale)
        print(f"\nfolder: {len(slides)} slides generated in {time.perf_counter() - t:.0f} s")
        res = run_pathdino(slides, work / "folder.zarr", args.workers)
        print(
            f"folder, {args.workers} workers: {res['tiles']:,} tiles in {res['seconds']:.1f} s = {res['rate']:,.0f} "
            f"tiles/s ({res['rate'] / args.workers:,.0f} per core), CPU busy {res['busy']:.0%} of "
            f"{args.workers} cores, {res['failed']} slides failed (as intended: 2), "
            f"peak RSS {res['rss_gib']:.2f} GiB"
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
