"""Archive-scale benchmark (issue 23): a 10,000-slide store, object-store requests, and many small slides vs hs2p.

Prints, in ONE run (name the CPU with the figures; compare only within a run):

(a) **Store scale.** Writes N tiny slide files (256 x 256 px TIFFs, distinct bytes), tiles one of them for real to
    get a provenance template, then commits N slides of 4 tiles each with the store writer (`TileStoreWriter`),
    each with its own file's fingerprint, so that `pathdino tile` finds them all done. At each checkpoint (1,000 and
    10,000 by default) it measures the time and peak RSS of: a commit (mean of the last 10% of commits, folds
    included, and the slowest one); `pathdino tile FOLDERS --out STORE` with nothing to do; `pathdino info` and
    `--json`; plain zarr opening the store and listing its slides; the trainer loader from `validate_stores` to its
    first batch; `pathdino embed`'s plan (store, slides, `plan_items`: everything before the encoder runs); and
    `pathdino tile --dry-run` over the N-file folders. Commands run as subprocesses, peak RSS from /usr/bin/time.
(b) **Object stores.** Copies the 1,000-slide store to fsspec's memory:// filesystem, counts every filesystem call
    (cat, ls, info, open, ...) while the trainer loader starts and reads one epoch, and prints them against the
    slides listed and the shards read.
(c) **Many small slides.** Generates a folder of small slides (1,000-5,000 tiles of 224 px at 0.5 µm/px at
    `--folder-scale 1`: 20x 0.5 µm/px mosaics, Aperio-like 40x pyramids, a few JPEG 2000, a few that fail) and
    tiles it with pathdino (this tree) and hs2p 6.1.0 (its own venv, as benchmarks/tiling.py), with one worker each
    and all cores (``--folder-workers``). Beside them: pathdino on the folder's 20x slides alone, and on large
    slides of each kind (20x and 40x ``--large-size``, JPEG 2000 ``--j2k-size``, ``--large-copies`` of each in
    one run; in-process, as benchmarks/tiling.py times them). Each folder rate is printed against the large 20x
    slides' and against large slides of the same mix of kinds; what is left below 1 is what a slide costs beyond
    its tiles. Then it itemises pathdino's per-slide cost: a cProfile of a one-worker run over
    ``--profile-slides`` of the slides (open, thumbnail+mask, planning, tiles, QC picture, commit, fingerprint,
    resume), for this tree and ``--baseline-pythonpath`` (e.g. a checkout of the previous commit).

    python benchmarks/archive.py [--slides 10000] [--checkpoints 1000,10000] [--folder-slides 200]
        [--folder-scale 1.0] [--folder-workers 1,2] [--skip-hs2p] [--large-size 40000] [--j2k-size 24000]
        [--large-copies 3] [--profile-slides 20] [--baseline-pythonpath DIR] [--skip-store] [--skip-requests]
        [--skip-folder] [--keep DIR]
        [--reuse]   (measure the stores a previous --keep run left, without writing them again)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This folder holds a script named like the `tiling` package: keep it off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
TILES_PER_SLIDE = 4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def timed(
    cmd: list[str], *, env: dict[str, str] | None = None, stdout=subprocess.DEVNULL, ok_codes: tuple[int, ...] = (0,)
) -> dict:
    """Wall seconds and peak RSS (GiB, the largest process of the command) of a subprocess."""
    t0 = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M %U %S", *cmd],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    seconds = time.perf_counter() - t0
    lines = result.stderr.strip().splitlines()
    if result.returncode not in ok_codes:
        print(f"  ! {' '.join(cmd[:4])} ... failed ({result.returncode}): {result.stderr[-1500:]}")
    try:
        rss_kib, user_s, sys_s = lines[-1].split()
        rss, cpu_s = int(rss_kib) / 2**20, float(user_s) + float(sys_s)
    except (IndexError, ValueError):
        rss, cpu_s = float("nan"), float("nan")
    return {
        "s": seconds,
        "rss_gib": rss,
        "cpu_s": cpu_s,  # user + system of the command and the children it waited for (its workers)
        "rc": result.returncode,
        "stdout": result.stdout if stdout else "",
    }


# ---------------------------------------------------------------------------------------------------------------
# (a) store scale


def write_tiny_slides(folder: Path, start: int, stop: int) -> list[Path]:
    """256 x 256 px uncompressed TIFFs at 0.5 µm/px, each with its own bytes (own fingerprint)."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    base = rng.integers(150, 230, (256, 256, 3), dtype=np.uint8)
    paths = []
    for i in range(start, stop):
        path = folder / f"slide-{i:05d}.tif"
        if not path.exists():
            image = base.copy()
            image[0, :8, 0] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
            tifffile.imwrite(path, image, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        paths.append(path)
    return paths


def provenance_template(work: Path, slide: Path) -> dict:
    """The provenance pathdino writes for one tiny slide at the default parameters (params_key and all)."""
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides
    from tiling.runner import run_tiling
    from tiling.store_write import TileStoreWriter

    url = work / "template.zarr"
    run_tiling(collect_slides([str(slide)]), str(url), TilingConfig(workers=1, qc_images=False))
    return TileStoreWriter(url).completed_provenance(slide.stem)


def sample_tiles(n: int) -> list[bytes]:
    import openslide

    from tiling.store import encode_tile

    with openslide.OpenSlide(str(SAMPLE)) as s:
        region = np.asarray(s.read_region((800, 1000), 0, (224 * n, 224)).convert("RGB"))
    return [encode_tile(np.ascontiguousarray(region[:, 224 * i : 224 * (i + 1)])) for i in range(n)]


def commit_slides(writer, paths: list[Path], template: dict, tiles: list[bytes]) -> list[float]:
    """Commit one 4-tile slide per path (its own fingerprint); returns each commit's seconds."""
    from tiling.fsio import now_iso
    from tiling.worker import fingerprint

    xy = np.arange(2 * len(tiles)).reshape(-1, 2) * 224
    seconds = []
    for path in paths:
        fp, size = fingerprint(path)
        sid = path.stem
        record = {
            **template,
            "slide_id": sid,
            "source_slide_id": sid,
            "source_path": str(path),
            "source_size_bytes": size,
            "source_fingerprint": fp,
            "created": now_iso(),
        }
        t0 = time.perf_counter()
        sw = writer.begin_slide(
            sid, 224, max_tiles=len(tiles), tile_attrs={"jpeg_quality": 90, "jpeg_subsampling": "420"}
        )
        sw.add(tiles, xy, np.ones(len(tiles), np.float32))
        sw.commit(record)
        seconds.append(time.perf_counter() - t0)
    return seconds


LOADER_CODE = """
import time, sys
t0 = time.perf_counter()
from pathdino.data import AugmentConfig, DataConfig, MaskConfig, build_train_loader
data = DataConfig(stores=(sys.argv[1],), num_workers=0)
aug = AugmentConfig(global_crop_px=112, local_crop_px=48, n_local_crops=2)
t1 = time.perf_counter()
loader = build_train_loader(data, aug, MaskConfig(), patch_size=16, batch_size_per_process=32, rank=0,
                            world_size=1, seed=0)
batch = next(iter(loader))
print(f"{time.perf_counter() - t1:.3f} {time.perf_counter() - t0:.3f}")
"""

EMBED_PLAN_CODE = """
import time, sys
t0 = time.perf_counter()
from pathdino.embed.runner import plan_items, assign
from tiling.store import TileStore
store = TileStore(sys.argv[1])
slides = {sid: store.slide(sid) for sid in store.slide_ids}
items = plan_items([(sid, s.n_tiles) for sid, s in slides.items()], 4096)
mine = assign(items, (0, 1))
print(f"{time.perf_counter() - t0:.3f} {len(mine)}")
"""

ZARR_CODE = """
import time, sys, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
import zarr
t1 = time.perf_counter()
root = zarr.open_group(sys.argv[1], mode="r")
ids = sorted(root["slides"].group_keys())
print(f"{time.perf_counter() - t1:.3f} {len(ids)}")
"""


def store_checkpoint(n: int, store: Path, folders: list[Path], commit_s: list[float], writer_rss: float) -> list:
    pd = [sys.executable, "-m", "pathdino.cli"]
    tail = commit_s[-max(1, len(commit_s) // 10) :]
    rows = [
        (
            "commit (mean of last 10%; slowest)",
            f"{1e3 * np.mean(tail):.1f} ms; {1e3 * max(tail):.0f} ms",
            f"{writer_rss:.2f}",
        )
    ]
    rerun = timed([*pd, "tile", *map(str, folders), "--out", str(store)])
    rows.append(("`pathdino tile` rerun, nothing to do", f"{rerun['s']:.1f} s", f"{rerun['rss_gib']:.2f}"))
    for flags in ([], ["--json"]):
        info = timed([*pd, "info", str(store), *flags])
        rows.append(
            (f"`pathdino info {' '.join(flags)}`".replace(" `", "`"), f"{info['s']:.2f} s", f"{info['rss_gib']:.2f}")
        )
    z = timed([sys.executable, "-c", ZARR_CODE, str(store)], stdout=subprocess.PIPE)
    inner, listed = (z["stdout"].split() + ["nan", "0"])[:2]
    rows.append(
        (f"plain zarr open + list ({listed} slides; import excluded)", f"{float(inner):.2f} s", f"{z['rss_gib']:.2f}")
    )
    lo = timed([sys.executable, "-c", LOADER_CODE, str(store)], stdout=subprocess.PIPE)
    first, whole = (lo["stdout"].split() + ["nan", "nan"])[:2]
    rows.append(
        (
            "trainer loader: catalog + plan + first batch (process incl. imports)",
            f"{float(first):.1f} s ({float(whole):.1f} s)",
            f"{lo['rss_gib']:.2f}",
        )
    )
    em = timed([sys.executable, "-c", EMBED_PLAN_CODE, str(store)], stdout=subprocess.PIPE)
    rows.append(
        (
            "`pathdino embed` plan (store, slides, items; incl. imports)",
            f"{float((em['stdout'].split() + ['nan'])[0]):.2f} s",
            f"{em['rss_gib']:.2f}",
        )
    )
    dry = timed([*pd, "tile", *map(str, folders), "--out", str(store.with_name("dry.zarr")), "--dry-run"])
    rows.append((f"`pathdino tile --dry-run` over {n:,} files", f"{dry['s']:.1f} s", f"{dry['rss_gib']:.2f}"))
    root_mb = (store / "zarr.json").stat().st_size / 1e6
    rows.append(("root zarr.json (the index)", f"{root_mb:.1f} MB", ""))
    return rows


def reuse_store_scale(work: Path, checkpoints: list[int]) -> Path:
    """Measure stores an earlier run of this script left in `work` (--keep): commands first, then 100 more commits
    into each store and one explicit fold (the store grows by 100 slides)."""
    import resource

    from tiling.store_write import TileStoreWriter

    stores = {checkpoints[0]: work / "archive-1000.zarr", checkpoints[-1]: work / "archive.zarr"}
    folders = sorted(work.glob("slides-*"))
    template = provenance_template(work, next(folders[0].glob("*.tif")))
    tiles = sample_tiles(TILES_PER_SLIDE)
    results = {}
    for k, (n, store) in enumerate(stores.items()):
        rows = store_checkpoint(n, store, folders[: k + 1], [float("nan")], float("nan"))
        extra = work / f"extra-{n}"
        extra.mkdir(exist_ok=True)
        paths = []
        for i, src in enumerate(sorted(folders[0].glob("*.tif"))[:100]):
            dst = extra / f"extra-{n}-{i:03d}.tif"
            if not dst.exists():
                shutil.copy(src, dst)
            paths.append(dst)
        writer = TileStoreWriter(store)
        commit_s = commit_slides(writer, paths, template, tiles)
        t0 = time.perf_counter()
        writer.fold_index()
        fold_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows[0] = (
            "commit (mean of 100; slowest) / fold of the journal",
            f"{1e3 * np.mean(commit_s):.1f} ms; {1e3 * max(commit_s):.0f} ms / {fold_s:.2f} s",
            f"{rss:.2f}",
        )
        results[n] = rows
    _print_store_table(results, checkpoints)
    return stores[checkpoints[0]]


def _print_store_table(results: dict, checkpoints: list[int]) -> None:
    print(
        f"\n| measure ({TILES_PER_SLIDE} tiles/slide) | "
        + " | ".join(f"{n:,} slides: time | peak RSS GiB" for n in results)
        + " |"
    )
    print("|---|" + "---|---|" * len(results))
    for i, row in enumerate(results[checkpoints[0]]):
        print(f"| {row[0]} | " + " | ".join(f"{results[n][i][1]} | {results[n][i][2]}" for n in results) + " |")


def run_store_scale(work: Path, n_slides: int, checkpoints: list[int]) -> Path:
    import resource

    from tiling.store_write import TileStoreWriter

    t0 = time.perf_counter()
    folders, paths = [], []
    previous = 0
    for k, stop in enumerate(checkpoints):
        folders.append(work / f"slides-{k}")
        paths.append(write_tiny_slides(folders[-1], previous, stop))
        previous = stop
    print(f"(a) wrote {previous:,} tiny slide files in {time.perf_counter() - t0:.0f} s")
    template = provenance_template(work, paths[0][0])
    tiles = sample_tiles(TILES_PER_SLIDE)
    store = work / "archive.zarr"
    writer = TileStoreWriter(store)
    results = {}
    commit_s: list[float] = []
    for k, stop in enumerate(checkpoints):
        t0 = time.perf_counter()
        commit_s += commit_slides(writer, paths[k], template, tiles)
        writer.fold_index()
        print(f"    committed up to {stop:,} slides ({time.perf_counter() - t0:.0f} s)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        results[stop] = store_checkpoint(stop, store, folders[: k + 1], commit_s, rss)
        if stop == 1000 or (k == 0 and stop < 1000):
            shutil.copytree(store, work / "archive-1000.zarr", dirs_exist_ok=True)
    _print_store_table(results, checkpoints)
    return work / "archive-1000.zarr"


# ---------------------------------------------------------------------------------------------------------------
# (b) requests against an object store


def count_requests(store: Path) -> None:
    """Copy the store to memory:// and count filesystem calls while the loader starts and reads one epoch."""
    import collections

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    fs = fsspec.filesystem("memory")
    fs.put(str(store), "/bench/archive.zarr", recursive=True)
    counts: collections.Counter = collections.Counter()
    paths: collections.Counter = collections.Counter()
    for name in ("cat_file", "_cat_file", "ls", "info", "_open", "exists", "isdir", "find", "pipe_file"):
        original = getattr(MemoryFileSystem, name, None)
        if original is None:
            continue

        def wrapped(self, path, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            paths[str(path).rsplit("/", 1)[-1] if "/c/" not in str(path) else "shard/chunk"] += 1
            return _original(self, path, *args, **kwargs)

        setattr(MemoryFileSystem, name, wrapped)

    from pathdino.data import AugmentConfig, DataConfig, MaskConfig, build_train_loader

    data = DataConfig(stores=("memory://bench/archive.zarr",), num_workers=0)
    aug = AugmentConfig(global_crop_px=112, local_crop_px=48, n_local_crops=2)
    loader = build_train_loader(
        data, aug, MaskConfig(), patch_size=16, batch_size_per_process=64, rank=0, world_size=1, seed=0
    )
    it = iter(loader)
    next(it)
    start = dict(counts)
    n_batches = 1
    for _ in it:
        n_batches += 1
        if n_batches >= loader.batches_per_epoch:
            break
    from tiling.store import TileStore

    n_slides = len(TileStore(str(store)).slide_ids)
    shards = -(-TILES_PER_SLIDE // 256)
    print(
        f"\n(b) memory:// store of {n_slides} slides ({shards} shard each): loader start (catalog, plan, first "
        f"batch): {sum(start.values())} calls {start}; one epoch ({n_batches} batches): "
        f"{sum(counts.values())} calls {dict(counts)}; most frequent objects: {paths.most_common(6)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# (c) many small slides


def _tiling_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiling_benchmark", Path(__file__).with_name("tiling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_small_folder(folder: Path, n_slides: int, scale: float) -> Path:
    """n small slides: 60% 20x mosaics, 25% Aperio-like 40x, 10% JPEG 2000 40x (at most 400 tiles: OpenJPEG
    encodes them slowly), 5% that fail."""
    tb = _tiling_benchmark()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_slides):
        kind = "fail" if i % 20 == 19 else "j2k" if i % 10 == 9 else "40x" if i % 4 == 3 else "20x"
        tiles = int(rng.integers(1000, 5001) * scale)
        tiles = min(tiles, 400) if kind == "j2k" else tiles
        # the mosaic is ~65% tissue: side for `tiles` kept 224-px tiles at 0.5 µm/px
        side_05 = int(224 * np.sqrt(tiles / 0.65))
        path = folder / f"{kind}-{i:03d}.svs"
        if path.exists():
            continue
        if kind == "fail":
            path.write_bytes(b"not a slide" * 100)
        elif kind == "20x":
            tb.write_mosaic(path, side_05, tb.MPP_20X)
        else:
            tb.write_mosaic(path, 2 * side_05, tb.MPP_40X, j2k=kind == "j2k")
    return folder


PROFILE_CODE = """
import cProfile, pstats, sys, json, time
from tiling.config import TilingConfig
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
slides = collect_slides([sys.argv[1]])
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
out = run_tiling(slides, sys.argv[2], TilingConfig(workers=1))
prof.disable()
wall = time.perf_counter() - t0
again = time.perf_counter()
run_tiling(slides, sys.argv[2], TilingConfig(workers=1))
rerun = time.perf_counter() - again
stats = pstats.Stats(prof).stats
groups = {"open": ["open_slide"], "thumbnail + tissue mask": ["read_thumbnail", "tissue_mask", "detect_tissue",
          "thumbnail"], "plan (all)": ["plan_slide"], "tiles (decode, QC, encode)": ["tile_block"],
          "QC picture": ["write_qc_image", "qc_image_jpeg"], "store: begin + commit": ["begin_slide", "commit"],
          "fingerprint": ["fingerprint"], "resume check": ["_up_to_date", "completed_provenance"],
          "record failure": ["record_failure"], "fold index": ["fold_index"]}
res = {}
for group, names in groups.items():
    best = 0.0
    for (file, line, fn), (cc, nc, tt, ct, callers) in stats.items():
        if fn in names and ("tiling" in file):
            best = max(best, ct)
    res[group] = best
n_ok = sum(o.status in ("done", "empty") for o in out)
print(json.dumps({"wall": wall, "rerun": rerun, "n_slides": len(out), "n_ok": n_ok,
                  "tiles": sum(o.n_tiles for o in out), "groups": res}))
"""


def _link_folder(folder: Path, paths: list[Path]) -> Path:
    """A folder of symlinks to some of the generated slides (a subset to tile or profile on its own)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in paths:
        (folder / path.name).symlink_to(path)
    return folder


def _large_slide_rates(tb, work: Path, size: int, j2k_size: int, workers: int, copies: int) -> dict[str, dict]:
    """pathdino on large slides of each kind in the folder, in-process as benchmarks/tiling.py times them: "20x" the
    JPEG mosaic read as is; "40x" the same file declared 0.2527 µm/px (level 0 read at 1/2, as the folder's
    Aperio-like 40x slides); "j2k" a JPEG 2000 40x mosaic. Each run tiles ``copies`` hard links to the one file
    (as many slides), so that starting the pool (~1.5 s) does not weigh on a run of a few seconds more than it does
    on the folder's minutes."""
    jpeg, j2k = work / f"large-20x-{size}.svs", work / f"large-j2k-{j2k_size}.svs"
    for path, side, mpp, is_j2k in ((jpeg, size, tb.MPP_20X, False), (j2k, j2k_size, tb.MPP_40X, True)):
        if not path.exists():
            part = path.with_suffix(".part.svs")
            tb.write_mosaic(part, side, mpp, j2k=is_j2k)
            part.rename(path)
    cases = {"20x": (jpeg, tb.MPP_20X), "40x": (jpeg, tb.MPP_40X), "j2k": (j2k, None)}
    rates = {}
    for kind, (path, mpp) in cases.items():
        links = _link_folder(work / f"large-{kind}-links", [])
        for i in range(copies):
            (links / f"large-{kind}-{i}.svs").hardlink_to(path)  # symlinks to one file are tiled once
        slides = tb.collect_slides([str(links)], slide_mpp=mpp)
        rates[kind] = tb.run_pathdino(slides, work / f"large-{kind}.zarr", workers)
    return rates


def _tiles_by_kind(url: Path) -> dict[str, int]:
    """Tiles per kind of slide in a folder store (slide ids are ``<kind>-<index>``)."""
    from tiling.store import TileStore

    counts: dict[str, int] = {}
    try:
        store = TileStore(url)
    except Exception:  # noqa: BLE001 - a failed run: nothing
        return counts
    for sid in store.slide_ids:
        kind = sid.split("-", 1)[0]
        counts[kind] = counts.get(kind, 0) + store.n_tiles(sid)
    return counts


def run_folder(
    work: Path,
    n_slides: int,
    scale: float,
    baseline: str | None,
    *,
    workers_list: list[int],
    hs2p: bool = True,
    large_size: int = 40_000,
    j2k_size: int = 24_000,
    large_copies: int = 3,
    profile_slides: int = 20,
) -> None:
    folder = make_small_folder(work / "small", n_slides, scale)
    tb = _tiling_benchmark()
    pd = [sys.executable, "-m", "pathdino.cli", "tile"]
    trees = [("this tree", str(REPO))] + ([("baseline", baseline)] if baseline else [])
    slides = sorted(folder.glob("*.svs"))
    only_20x = _link_folder(work / "small-20x-only", [p for p in slides if p.name.startswith("20x-")])
    print(f"\n(c) {n_slides} small slides (scale {scale}) in {folder}; load average {os.getloadavg()[0]:.2f}")
    rows, ratios = [], []
    for workers in workers_list:
        large = _large_slide_rates(tb, work, large_size, j2k_size, workers, large_copies)
        for kind, res in large.items():
            rows.append(
                (
                    f"pathdino, {large_copies} large {kind} slides",
                    workers,
                    res["tiles"],
                    res["seconds"],
                    res["rss_gib"],
                    res["busy"],
                )
            )
        for label, tree in trees[:1]:  # a baseline is profiled below, not timed here (minutes per folder run)
            for name, source in (("the folder", folder), ("its 20x slides only", only_20x)):
                out = work / f"small-{label.replace(' ', '')}-{name.split()[-1]}-{workers}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(str(out) + ".pathdino", ignore_errors=True)
                # exit 1: some slides failed, as the folder's "fail" slides must
                r = timed(
                    [*pd, str(source), "--out", str(out), "-j", str(workers)], env={"PYTHONPATH": tree}, ok_codes=(0, 1)
                )
                by_kind = _tiles_by_kind(out)
                n_tiles = sum(by_kind.values())
                busy = r["cpu_s"] / r["s"] / workers
                rows.append((f"pathdino ({label}), {name}", workers, n_tiles, r["s"], r["rss_gib"], busy))
                rate = n_tiles / r["s"]
                # the seconds these tiles would take at the large slides' rates, kind by kind: what is left of
                # the ratio is what a slide costs beyond its tiles
                as_large_s = sum(n / large[kind]["rate"] for kind, n in by_kind.items() if kind in large)
                ratios.append(
                    (
                        f"pathdino ({label}), {name}, {workers} workers: against the large 20x slide",
                        rate / large["20x"]["rate"],
                    )
                )
                ratios.append(
                    (
                        f"pathdino ({label}), {name}, {workers} workers: against large slides of its own mix "
                        f"({', '.join(f'{n:,} {k}' for k, n in sorted(by_kind.items()))} tiles)",
                        as_large_s / r["s"],
                    )
                )
        hs = _hs2p_folder(tb, folder, work / f"hs2p-{workers}", workers) if hs2p else None
        if hs:
            rows.append(
                ("hs2p 6.1.0, the folder", workers, hs["tiles"], hs["seconds"], hs["rss_gib"], hs["busy"] / workers)
            )
            ours = next(r for r in rows if r[0] == "pathdino (this tree), the folder" and r[1] == workers)
            ratios.append(
                (f"pathdino / hs2p, the folder, {workers} workers", (ours[2] / ours[3]) / (hs["tiles"] / hs["seconds"]))
            )
    print("\n| tool | workers | tiles | seconds | tiles/s | CPU busy | peak RSS GiB |\n|---|---|---|---|---|---|---|")
    for tool, workers, n_tiles, s, rss, busy in rows:
        print(f"| {tool} | {workers} | {n_tiles:,} | {s:.1f} | {n_tiles / s:,.0f} | {busy:.0%} | {rss:.2f} |")
    print("\nratios of tiles/s (the large slides: this tree, on as many workers):")
    for name, value in ratios:
        print(f"  {name}: {value:.2f}")
    # the per-slide cProfile: a subset of the folder, every kind, one worker (it runs all slides inline)
    by_index = sorted(slides, key=lambda p: p.stem.rsplit("-", 1)[-1])  # the first n generated: kinds mixed
    folder = _link_folder(work / "small-profiled", by_index[:profile_slides])
    for label, tree in trees:
        out = work / f"profile-{label.replace(' ', '')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(str(out) + ".pathdino", ignore_errors=True)
        r = timed(
            [sys.executable, "-c", PROFILE_CODE, str(folder), str(out)],
            stdout=subprocess.PIPE,
            env={"PYTHONPATH": tree},
        )
        try:
            prof = json.loads(r["stdout"].strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(f"profile ({label}) failed")
            continue
        n = prof["n_slides"]
        per = {k: 1e3 * v / n for k, v in prof["groups"].items()}
        print(
            f"\nper-slide cost, one worker, cProfile ({label}): {n} slides, {prof['tiles']:,} tiles in "
            f"{prof['wall']:.1f} s (profiled); rerun with nothing to do {prof['rerun']:.2f} s"
        )
        tile_ms = per["tiles (decode, QC, encode)"] or float("nan")
        print("| part | ms per slide | share of the tile time |\n|---|---|---|")
        for k, v in per.items():
            print(f"| {k} | {v:.1f} | {v / tile_ms:.1%} |")


def _store_tiles(url: Path) -> int:
    from tiling.store import TileStore

    try:
        store = TileStore(url)
    except Exception:  # noqa: BLE001 - a failed run: report 0
        return 0
    return sum(store.n_tiles(s) for s in store.slide_ids)


def _hs2p_folder(tb, folder: Path, out: Path, workers: int) -> dict | None:
    """hs2p 6.1.0 over the whole folder (benchmarks/tiling.py's invocation, with a CSV of every slide)."""
    import csv

    if not tb.HS2P_PYTHON.exists():
        print(f"hs2p: skipped ({tb.HS2P_PYTHON} not found)")
        return None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with open(out / "slides.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sample_id", "image_path"])
        for p in sorted(folder.glob("*.svs")):
            w.writerow([p.stem, str(p)])
    config = subprocess.run(
        [
            str(tb.HS2P_PYTHON),
            "-c",
            "import hs2p, pathlib; print(pathlib.Path(hs2p.__file__).parent / 'configs' / 'default.yaml')",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    cmd = [
        str(tb.HS2P_PYTHON),
        "-m",
        "hs2p",
        config.stdout.strip(),
        "--skip-datetime",
        "--output-dir",
        str(out / "run"),
        f"csv={out / 'slides.csv'}",
        "save_tiles=true",
        f"speed.num_workers={workers}",
        "tiling.params.requested_tile_size_px=224",
        "tiling.params.requested_spacing_um=0.5",
    ]
    r = timed(cmd)
    try:
        with open(out / "run" / "process_list.csv") as fh:
            n_tiles = sum(int(row["num_tiles"] or 0) for row in csv.DictReader(fh))
    except (OSError, ValueError, KeyError) as exc:
        print(f"hs2p: no process list ({exc})")
        return None
    return {"tiles": n_tiles, "seconds": r["s"], "rss_gib": r["rss_gib"], "busy": r["cpu_s"] / r["s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=10000)
    parser.add_argument("--checkpoints", default="1000,10000")
    parser.add_argument("--folder-slides", type=int, default=200)
    parser.add_argument("--folder-scale", type=float, default=1.0, help="tiles per small slide x this")
    parser.add_argument(
        "--folder-workers", default=f"1,{os.cpu_count() or 1}", help="worker counts for the folder runs, e.g. 2"
    )
    parser.add_argument("--skip-hs2p", action="store_true", help="the folder without hs2p beside it")
    parser.add_argument("--large-size", type=int, default=40_000, help="side (px) of the large 20x reference slide")
    parser.add_argument("--j2k-size", type=int, default=24_000, help="side (px) of the large JPEG 2000 40x slide")
    parser.add_argument("--large-copies", type=int, default=3, help="links to each large slide tiled in one run")
    parser.add_argument("--profile-slides", type=int, default=20, help="slides of the folder in the cProfile")
    parser.add_argument("--baseline-pythonpath", default=None, help="another checkout to run next to this one")
    parser.add_argument("--skip-store", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="measure the stores a --keep run left in --keep")
    parser.add_argument("--skip-requests", action="store_true")
    parser.add_argument("--skip-folder", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.slides} | {args.slides})
    print(f"CPU: {cpu_name()}; python {platform.python_version()}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="pathdino-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        small_store = None
        if args.reuse and not args.skip_store:
            small_store = reuse_store_scale(work, checkpoints)
        elif not args.skip_store:
            small_store = run_store_scale(work, args.slides, checkpoints)
        if not args.skip_requests and small_store is not None:
            count_requests(small_store)
        if not args.skip_folder:
            run_folder(
                work,
                args.folder_slides,
                args.folder_scale,
                args.baseline_pythonpath,
                workers_list=[int(w) for w in args.folder_workers.split(",")],
                hs2p=not args.skip_hs2p,
                large_size=args.large_size,
                j2k_size=args.j2k_size,
                large_copies=args.large_copies,
                profile_slides=args.profile_slides,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
