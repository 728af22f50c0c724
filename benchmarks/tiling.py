"""Tiling throughput on one large real-tissue slide: end to end vs the source-decode ceiling, and peak memory.

Generates (never commits) a ~40k x 40k pyramid by mirroring the bundled sample slide's pixels into a tiled JPEG
TIFF (256-px q90 tiles, levels as top-level IFDs, 0.5 µm/px), tiles it at 0.5 µm/px / 224 px with 1 worker and
with all cores, and prints in one run:
  - end-to-end tiles/s (decoded, checked, encoded, written) and per core;
  - the decode ceiling: the source tiles under the kept tiles, fetched as raw bytes and decoded once each;
  - peak resident memory of the whole process tree.

    python benchmarks/tiling.py [--size 40000] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file is named like the `tiling` package: keep its folder off the import path so `import tiling` finds the
# package, not this script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import openslide
import psutil
import tifffile

from tiling.config import TilingConfig  # noqa: E402
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import TileStore

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SOURCE_TILE = 256


def _mirror_index(n: int, period: int, offset: int = 0) -> np.ndarray:
    i = (np.arange(n) + offset) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def write_mosaic(path: Path, size: int, mpp: float = 0.5) -> None:
    """A size x size pyramid (downsamples 1, 4, 16, 64) mirroring the sample slide, written tile by tile."""
    with openslide.OpenSlide(str(SAMPLE)) as s:
        src = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for level, ds in enumerate((1, 4, 16, 64)):
            level_src = src if ds == 1 else src[: src.shape[0] // ds * ds, : src.shape[1] // ds * ds].reshape(
                src.shape[0] // ds, ds, src.shape[1] // ds, ds, 3).mean(axis=(1, 3)).astype(np.uint8)
            h = w = size // ds
            ys = _mirror_index(h, level_src.shape[0])
            xs = _mirror_index(w, level_src.shape[1])

            def tiles():
                for ty in range(0, h, SOURCE_TILE):
                    for tx in range(0, w, SOURCE_TILE):
                        tile = np.full((SOURCE_TILE, SOURCE_TILE, 3), 255, np.uint8)
                        yy, xx = ys[ty:ty + SOURCE_TILE], xs[tx:tx + SOURCE_TILE]
                        tile[: len(yy), : len(xx)] = level_src[yy[:, None], xx[None, :]]
                        yield tile

            desc = f"Aperio Image Library pathdino-benchmark\r\n{w}x{h} [0,0 {w}x{h}] ({SOURCE_TILE}x{SOURCE_TILE}) " \
                   f"JPEG Q=90|AppMag = 20|MPP = {mpp * ds}"
            tw.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(SOURCE_TILE, SOURCE_TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, description=desc, metadata=None,
                     subfiletype=0)


class PeakMemory:
    """Samples the RSS of this process and all its children every 20 ms; `peak_bytes` is the largest sum."""

    def __init__(self) -> None:
        self.peak_bytes = 0
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
            time.sleep(0.02)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def decode_ceiling(slide_path: Path, store_url: str, slide_id: str) -> tuple[float, int]:
    """Decode, once each, the source tiles under the kept tiles, from raw bytes; returns (224-px tiles/s, n)."""
    import imagecodecs

    slide = TileStore(store_url).slide(slide_id)
    attrs = slide.attrs
    coords = slide.coords / attrs["read_downsample"]
    side = attrs["read_tile_px"]
    needed: set[tuple[int, int]] = set()
    for x, y in coords:
        for ty in range(int(y // SOURCE_TILE), int((y + side - 1) // SOURCE_TILE) + 1):
            for tx in range(int(x // SOURCE_TILE), int((x + side - 1) // SOURCE_TILE) + 1):
                needed.add((ty, tx))
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[attrs["read_level"]]
        tiles_across = -(-page.imagewidth // SOURCE_TILE)
        order = sorted(ty * tiles_across + tx for ty, tx in needed)
        fh = tif.filehandle
        raw = []
        for index in order:
            fh.seek(page.dataoffsets[index])
            raw.append(fh.read(page.databytecounts[index]))
        tables = page.jpegtables
        start = time.perf_counter()
        for data in raw:
            imagecodecs.jpeg8_decode(data, tables=tables)
        elapsed = time.perf_counter() - start
    equivalent = len(raw) * SOURCE_TILE * SOURCE_TILE / (224 * 224)
    return equivalent / elapsed, len(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40_000, help="level-0 side in pixels")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="the 'all cores' run")
    parser.add_argument("--keep", type=Path, help="keep the generated slide and stores here")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="pathdino-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide_path = work / "mosaic.svs"
    if not slide_path.exists():
        t = time.perf_counter()
        write_mosaic(slide_path, args.size)
        print(f"generated {args.size}x{args.size} mosaic ({slide_path.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t:.0f} s")
    slides = collect_slides([str(slide_path)])
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} logical cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; python {platform.python_version()}")

    rows = []
    for workers in sorted({1, args.workers}):
        url = str(work / f"tiles-{workers}w.zarr")
        shutil.rmtree(url, ignore_errors=True)
        cfg = TilingConfig(workers=workers, qc_images=True)
        with PeakMemory() as mem:
            t = time.perf_counter()
            outcome = run_tiling(slides, url, cfg)[0]
            elapsed = time.perf_counter() - t
        assert outcome.status == "done", outcome.reason
        rate = outcome.n_tiles / elapsed
        rows.append((workers, outcome.n_tiles, elapsed, rate, rate / workers, mem.peak_bytes / 2**30))
    ceiling, n_source = decode_ceiling(slide_path, str(work / "tiles-1w.zarr"), slides[0].slide_id)

    print(f"\nslide: {args.size}x{args.size} px at 0.5 µm/px, 256-px JPEG q90 source tiles; "
          f"tiles: 224 px at 0.5 µm/px")
    print(f"{'workers':>7} {'tiles':>8} {'seconds':>8} {'tiles/s':>9} {'per core':>9} {'peak RSS GiB':>13}")
    for w, n, s, r, per_core, peak in rows:
        print(f"{w:>7} {n:>8,} {s:>8.1f} {r:>9,.0f} {per_core:>9,.0f} {peak:>13.2f}")
    single = rows[0][3]
    print(f"\ndecode ceiling (raw source tiles under kept tiles, {n_source:,} decoded once each, one core): "
          f"{ceiling:,.0f} 224-px tiles/s")
    print(f"end to end / ceiling (1 worker): {single / ceiling:.2f}")
    if len(rows) > 1:
        print(f"scaling {rows[-1][0]} workers vs 1: {rows[-1][3] / single:.2f}x")
    print("quoted from anchors (same kind of machine): hs2p 6.1.0 ~495 tiles/s with pixels saved, one core per slide")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
