"""`pathdino tile`: schedule slides and their blocks over worker processes and write the tile store.

The parent plans slides in workers, farms each slide's blocks out to all workers (so one huge slide uses every
core), puts the results back in order, and writes whole shards. A slide becomes visible only when committed; a
slide that fails is recorded with its reason and traceback while the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import tempfile
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tiling.config import TilingConfig
from tiling.configio import to_dict
from tiling.errors import SlideError
from tiling.inputs import SlideInput
from tiling.store import now_iso
from tiling.store_write import SlideWriter, TileStoreWriter
from tiling.worker import BlockResult, SlidePlan, close_readers, fingerprint, plan_slide, tile_block

TILE_ORDER = "block-major"


@dataclass
class SlideOutcome:
    """What happened to one slide in this run."""

    slide_id: str
    source_path: str
    status: str  # "done" | "skipped" | "failed"
    n_tiles: int = 0
    n_candidates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    n_decode_failures: int = 0
    seconds: float = 0.0
    reason: str = ""


class _InlineExecutor(cf.Executor):
    """Runs tasks in the calling process (workers=1): the honest one-core figure, and easy to debug."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the scheduler turns it into a slide failure
            future.set_exception(exc)
        return future


@dataclass
class _SlideJob:
    plan: SlidePlan
    writer: SlideWriter
    started: float
    next_submit: int = 0
    next_write: int = 0
    results: dict[int, BlockResult] = field(default_factory=dict)
    kept_rows: list[np.ndarray] = field(default_factory=list)
    kept_cols: list[np.ndarray] = field(default_factory=list)
    rejected: dict[str, list[np.ndarray]] = field(default_factory=dict)
    n_decode_failures: int = 0
    n_tiles: int = 0
    pixel_source: str = ""
    fast_path_reason: str = ""
    decoder: str = ""


def _worker_ready() -> bool:
    """A no-op task: submitting it starts the worker processes (they import tiling.worker) right away."""
    return True


def _failure_record(slide: SlideInput, exc: BaseException) -> dict[str, Any]:
    return {"source_path": str(slide.path), "error_type": type(exc).__name__, "reason": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]}


def provenance(plan: SlidePlan, cfg: TilingConfig, job: _SlideJob) -> dict[str, Any]:
    """The slide group's attrs["pathdino"]: enough to know exactly how every tile was made."""
    from tiling import __version__

    g = plan.geometry
    return {
        "slide_id": plan.slide.slide_id, "source_slide_id": plan.slide.source_id or plan.slide.slide_id,
        "source_path": str(plan.slide.path.resolve()), "source_size_bytes": plan.size_bytes,
        "source_fingerprint": plan.fingerprint,
        "reader": plan.backend, "reader_version": plan.backend_version, "pixel_source": job.pixel_source,
        "fast_path_reason": job.fast_path_reason,
        "slide_mpp": g.slide_mpp, "slide_mpp_source": plan.slide_mpp_source,
        "level0_width": plan.level0_size[0], "level0_height": plan.level0_size[1],
        "target_mpp": g.target_mpp, "effective_mpp": g.effective_mpp, "mpp_tolerance": g.tolerance,
        "within_tolerance": g.within_tolerance, "read_level": g.read_level, "read_downsample": g.read_downsample,
        "read_mpp": g.read_mpp, "read_tile_px": g.read_tile_px, "scale": g.scale,
        "tile_px": g.tile_px, "overlap_px": g.overlap_px, "step_px": g.step_px,
        "level0_tile_px": g.level0_tile_px, "level0_step_px": g.level0_step_px,
        "grid_rows": plan.grid_rows, "grid_cols": plan.grid_cols, "tile_order": TILE_ORDER,
        "block_tiles": cfg.block_tiles, "tissue": to_dict(cfg.tissue), "pixel_qc": to_dict(cfg.pixel_qc),
        "thumbnail_mpp": plan.thumbnail_mpp, "encoding": cfg.encoding, "jpeg_quality": cfg.jpeg_quality, "jpeg_subsampling": cfg.jpeg_subsampling,
        "params_key": cfg.params_key(), "n_candidates": int(len(plan.rows)),
        "n_rejected": {k: int(sum(len(v) for v in vs)) for k, vs in job.rejected.items()},
        "n_decode_failures": job.n_decode_failures, "qc_image": f"qc/{plan.slide.slide_id}.png",
        "package_version": __version__, "created": now_iso(),
        "read_reduction": g.read_reduction, "decoder": job.decoder,
    }


def _is_up_to_date(store: TileStoreWriter, slide: SlideInput, cfg: TilingConfig) -> bool:
    done = store.completed_provenance(slide.slide_id)
    if not done:
        return False
    try:
        fp, size = fingerprint(slide.path)
    except OSError:
        return False
    return (done.get("source_fingerprint") == fp and done.get("source_size_bytes") == size
            and done.get("params_key") == cfg.params_key()
            and (slide.mpp_override is None or abs(done.get("slide_mpp", 0) - slide.mpp_override) < 1e-9))


def _write_qc_image(store: TileStoreWriter, plan: SlidePlan, job: _SlideJob) -> None:
    from tiling.qc_image import draw_qc_image

    scale = plan.geometry.slide_mpp / plan.thumbnail_mpp

    def boxes(rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
        if not rows:
            return np.zeros((0, 4))
        from tiling.geometry import tile_level0_xy

        xy = tile_level0_xy(plan.geometry, np.concatenate(rows), np.concatenate(cols)).astype(float) * scale
        side = plan.geometry.level0_tile_px * scale
        return np.column_stack([xy, xy + side])

    rej_rows = [plan.rows[idx] for idxs in job.rejected.values() for idx in idxs]
    rej_cols = [plan.cols[idx] for idxs in job.rejected.values() for idx in idxs]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qc.png"
        draw_qc_image(plan.thumbnail, plan.mask, boxes(job.kept_rows, job.kept_cols), path,
                      rejected_boxes=boxes(rej_rows, rej_cols))
        store.write_file(f"qc/{plan.slide.slide_id}.png", path.read_bytes())


def run_tiling(slides: list[SlideInput], out_url: str, cfg: TilingConfig, overwrite: bool = False,
               on_event: Callable[[str, dict[str, Any]], None] | None = None) -> list[SlideOutcome]:
    """Tile `slides` into the store at `out_url`; returns one outcome per slide (in input order).

    `on_event(kind, info)` receives "slide_start", "tiles" (info["n"] new tiles), "slide_end" for progress display.
    """
    emit = on_event or (lambda kind, info: None)
    store = TileStoreWriter(out_url)
    store.clean_stale_staging()
    outcomes: dict[str, SlideOutcome] = {}
    pending: list[SlideInput] = []
    for slide in slides:
        if not overwrite and _is_up_to_date(store, slide, cfg):
            done = store.completed_provenance(slide.slide_id) or {}
            outcomes[slide.slide_id] = SlideOutcome(slide.slide_id, str(slide.path), "skipped",
                                                    n_tiles=int(done.get("n_tiles", 0)))
            emit("slide_end", {"slide_id": slide.slide_id, "status": "skipped"})
        else:
            pending.append(slide)

    n_workers = cfg.n_workers if pending else 1  # nothing to do: no pool to start
    executor: cf.Executor = (_InlineExecutor() if n_workers == 1 else cf.ProcessPoolExecutor(
        n_workers, mp_context=multiprocessing.get_context("spawn")))
    plan_inline_next = n_workers > 1  # see fill()
    if n_workers > 1 and pending:
        for _ in range(n_workers):
            executor.submit(_worker_ready)
    max_in_flight = 2 * n_workers
    plans_ahead = max(1, n_workers // 2)
    futures: dict[cf.Future, tuple[str, str, int]] = {}  # future -> (kind, slide_id, block index)
    jobs: dict[str, _SlideJob] = {}
    queue = list(pending)
    by_id = {s.slide_id: s for s in pending}

    def fail(slide_id: str, exc: BaseException) -> None:
        job = jobs.pop(slide_id, None)
        if job is not None:
            job.writer.abort()
        store.record_failure(slide_id, _failure_record(by_id[slide_id], exc))
        outcomes[slide_id] = SlideOutcome(slide_id, str(by_id[slide_id].path), "failed",
                                          reason=f"{type(exc).__name__}: {exc}")
        emit("slide_end", {"slide_id": slide_id, "status": "failed"})

    def finish(job: _SlideJob) -> None:
        plan = job.plan
        sid = plan.slide.slide_id
        if not plan.blocks:
            job.pixel_source = "none (no tissue)"
        job.writer.commit(provenance(plan, cfg, job))
        jobs.pop(sid)
        if cfg.qc_images:
            try:
                _write_qc_image(store, plan, job)
            except Exception as exc:  # noqa: BLE001 - a QC picture is not worth losing the slide for
                emit("warning", {"slide_id": sid, "message": f"QC image not written: {exc}"})
        outcomes[sid] = SlideOutcome(
            sid, str(plan.slide.path), "done", n_tiles=job.n_tiles, n_candidates=len(plan.rows),
            rejected={k: int(sum(len(v) for v in vs)) for k, vs in job.rejected.items()},
            n_decode_failures=job.n_decode_failures, seconds=time.perf_counter() - job.started)
        emit("slide_end", {"slide_id": sid, "status": "done", "n_tiles": job.n_tiles})

    def fill() -> None:
        nonlocal plan_inline_next
        # Plans first (a few slides ahead), then blocks of the oldest slides, so slides finish in order and only a
        # bounded number of results wait in memory.
        n_plans = sum(1 for kind, _, _ in futures.values() if kind == "plan")
        while queue and n_plans < plans_ahead and len(jobs) + n_plans <= n_workers and len(futures) < max_in_flight:
            slide = queue.pop(0)
            emit("slide_start", {"slide_id": slide.slide_id})
            # The first slide is planned here while the workers start (spawning and importing takes ~1.5 s), so a
            # single huge slide does not wait for both one after the other.
            planner = _InlineExecutor() if plan_inline_next else executor
            plan_inline_next = False
            futures[planner.submit(plan_slide, slide, cfg)] = ("plan", slide.slide_id, -1)
            n_plans += 1
        for job in list(jobs.values()):
            plan = job.plan
            while job.next_submit < len(plan.blocks) and len(futures) < max_in_flight:
                start, stop = plan.blocks[job.next_submit]
                fut = executor.submit(tile_block, plan.slide.path, plan.backend, plan.geometry,
                                      plan.rows[start:stop], plan.cols[start:stop], cfg)
                futures[fut] = ("block", plan.slide.slide_id, job.next_submit)
                job.next_submit += 1

    def on_block(job: _SlideJob, index: int, result: BlockResult) -> None:
        job.results[index] = result
        plan = job.plan
        while job.next_write in job.results:
            res = job.results.pop(job.next_write)
            start, _ = plan.blocks[job.next_write]
            sel = start + res.kept
            job.writer.add(res.encoded, plan.level0_xy[sel], plan.tissue_fraction[sel])
            job.kept_rows.append(plan.rows[sel])
            job.kept_cols.append(plan.cols[sel])
            for reason, idxs in res.rejected.items():
                job.rejected.setdefault(reason, []).append(start + np.asarray(idxs, dtype=np.int64))
            job.n_decode_failures += res.n_decode_failures
            job.n_tiles += len(res.kept)
            job.pixel_source, job.fast_path_reason = res.pixel_source, res.fast_path_reason
            job.decoder = res.decoder
            job.next_write += 1
            emit("tiles", {"slide_id": plan.slide.slide_id, "n": len(res.kept)})
        if job.next_write == len(plan.blocks):
            finish(job)

    try:
        fill()
        while futures:
            done, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                kind, sid, index = futures.pop(fut)
                if sid in outcomes:  # the slide already failed; drop its remaining blocks
                    continue
                exc = fut.exception()
                if isinstance(exc, BrokenProcessPool):
                    raise exc  # the pool is gone for every slide, not just this one: handled below
                if exc is not None:
                    fail(sid, exc)
                    continue
                try:
                    if kind == "plan":
                        plan: SlidePlan = fut.result()
                        writer = store.begin_slide(sid, cfg.tile_px, cfg.encoding, cfg.tiles_per_shard,
                                                   cfg.tiles_per_chunk, {"jpeg_quality": cfg.jpeg_quality,
                                                                           "jpeg_subsampling": cfg.jpeg_subsampling})
                        jobs[sid] = _SlideJob(plan=plan, writer=writer, started=time.perf_counter())
                        emit("slide_planned", {"slide_id": sid, "n_candidates": len(plan.rows)})
                        if not plan.blocks:
                            finish(jobs[sid])
                    else:
                        on_block(jobs[sid], index, fut.result())
                except Exception as exc:  # noqa: BLE001 - store errors etc. fail the slide, not the run
                    fail(sid, exc)
            fill()
    except BrokenProcessPool as exc:
        # A worker died (killed, typically out of memory): nothing more can run in this pool. Committed slides are
        # kept; every other slide is recorded so that rerunning the same command resumes exactly there.
        broken = RuntimeError(f"a tiling worker process died ({exc}); slides already committed are kept: rerun "
                              "the same command to resume (with fewer --workers if memory ran out)")
        for sid in by_id:  # every slide of this run that is not done yet
            if sid not in outcomes:
                fail(sid, broken)
    finally:
        for job in list(jobs.values()):
            job.writer.abort()
        executor.shutdown(wait=True, cancel_futures=True)
        close_readers()
    return [outcomes[s.slide_id] for s in slides if s.slide_id in outcomes]


__all__ = ["run_tiling", "SlideOutcome", "SlideError", "provenance"]
