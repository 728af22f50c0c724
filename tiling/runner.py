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
from tiling.fsio import now_iso
from tiling.pool import SpillingProcessPool
from tiling.store import qc_image_key
from tiling.store_write import SlideWriter, TileStoreWriter
from tiling.worker import BlockResult, SlidePlan, close_readers, fingerprint, plan_slide, tile_block

TILE_ORDER = "block-major"


@dataclass
class SlideOutcome:
    """What happened to one slide in this run."""

    slide_id: str
    source_path: str
    status: str  # "done" | "empty" (committed with 0 tiles) | "skipped" (already complete) | "failed"
    n_tiles: int = 0
    n_candidates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    n_decode_failures: int = 0
    seconds: float = 0.0
    reason: str = ""  # why it failed or gave no tiles
    already_complete: bool = False  # committed by an earlier run (an "empty" slide can be both)


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
        "thumbnail_mpp": plan.thumbnail_mpp, "encoding": cfg.encoding, "jpeg_quality": cfg.jpeg_quality,
        "jpeg_subsampling": cfg.jpeg_subsampling,
        "params_key": cfg.params_key(), "n_candidates": int(len(plan.rows)),
        "n_rejected": {k: int(sum(len(v) for v in vs)) for k, vs in job.rejected.items()},
        "n_decode_failures": job.n_decode_failures, "qc_image": qc_image_key(plan.slide.slide_id),
        "package_version": __version__, "created": now_iso(),
        "read_reduction": g.read_reduction, "decoder": job.decoder,
    }


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
        path = Path(tmp) / "qc.jpg"
        draw_qc_image(plan.thumbnail, plan.mask, boxes(job.kept_rows, job.kept_cols), path=path,
                      rejected_boxes=boxes(rej_rows, rej_cols))
        store.write_file(qc_image_key(plan.slide.slide_id), path.read_bytes())


def run_tiling(slides: list[SlideInput], out_url: str, cfg: TilingConfig, overwrite: bool = False,
               on_event: Callable[[str, dict[str, Any]], None] | None = None) -> list[SlideOutcome]:
    """Tile `slides` into the store at `out_url`; returns one outcome per slide (in input order).

    `on_event(kind, info)` receives "slide_start", "slide_planned", "tiles" (info["n"] new tiles), "slide_end" and
    "warning" for progress display.
    """
    run = _TilingRun(TileStoreWriter(out_url), cfg, on_event or (lambda kind, info: None))
    run.run(slides, overwrite=overwrite)
    return [run.outcomes[s.slide_id] for s in slides if s.slide_id in run.outcomes]


class _TilingRun:
    """One `run_tiling` call: which slides wait, are planned, are being tiled, and how each ended.

    Plans go first (a few slides ahead), then blocks of the oldest slides, so slides finish in order and only a
    bounded number of block results wait in memory.
    """

    def __init__(self, store: TileStoreWriter, cfg: TilingConfig, emit: Callable[[str, dict[str, Any]], None]):
        self.store, self.cfg, self.emit = store, cfg, emit
        self.outcomes: dict[str, SlideOutcome] = {}
        self.queue: list[SlideInput] = []  # slides still to plan
        self.by_id: dict[str, SlideInput] = {}  # every slide this run tiles
        # slide id -> (fingerprint, size) where resuming needed it here; plan_slide computes the others, so each
        # slide file is fingerprinted once
        self.sources: dict[str, tuple[str, int]] = {}
        self.jobs: dict[str, _SlideJob] = {}  # planned slides whose blocks are being tiled
        self.futures: dict[cf.Future, tuple[str, str, int]] = {}  # future -> (kind, slide_id, block index)
        self.executor: cf.Executor = _InlineExecutor()
        self.n_workers = 1
        self.plan_inline_next = False

    def run(self, slides: list[SlideInput], *, overwrite: bool) -> None:
        self.store.clean_stale_staging()
        for slide in slides:
            self._skip_or_queue(slide, overwrite=overwrite)
        self._start_workers()
        try:
            self._fill()
            while self.futures:
                done, _ = cf.wait(list(self.futures), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    self._on_done(fut)
                self._fill()
        except BrokenProcessPool as exc:
            # A worker died (killed, typically out of memory): nothing more can run in this pool. Committed slides
            # are kept; every other slide is recorded so that rerunning the same command resumes exactly there.
            broken = RuntimeError(f"a tiling worker process died ({exc}); slides already committed are kept: rerun "
                                  "the same command to resume (with fewer --workers if memory ran out)")
            for sid in self.by_id:
                if sid not in self.outcomes:
                    self._fail(sid, broken)
        finally:
            for job in list(self.jobs.values()):
                job.writer.abort()
            self.executor.shutdown(wait=True, cancel_futures=True)
            close_readers()

    def _skip_or_queue(self, slide: SlideInput, *, overwrite: bool) -> None:
        done = None if overwrite else self._up_to_date(slide)
        if done is None:
            self.queue.append(slide)
            self.by_id[slide.slide_id] = slide
            return
        n_tiles = int(done.get("n_tiles", 0))
        status, reason = ("skipped", "") if n_tiles else ("empty", done.get("empty_reason", "no tiles"))
        self.outcomes[slide.slide_id] = SlideOutcome(slide.slide_id, str(slide.path), status, n_tiles=n_tiles,
                                                     reason=reason, already_complete=True)
        self.emit("slide_end", {"slide_id": slide.slide_id, "status": status})

    def _up_to_date(self, slide: SlideInput) -> dict[str, Any] | None:
        """The stored provenance when the slide is complete with the same file and parameters, else None."""
        done = self.store.completed_provenance(slide.slide_id)
        if not done:
            return None  # the worker that plans the slide fingerprints it, in parallel with the others
        try:
            source = self.sources[slide.slide_id] = fingerprint(slide.path)
        except OSError:
            return None  # planning opens the file and fails the slide with the reader's message
        same = (done.get("source_fingerprint") == source[0] and done.get("source_size_bytes") == source[1]
                and done.get("params_key") == self.cfg.params_key()
                and (slide.mpp_override is None or abs(done.get("slide_mpp", 0) - slide.mpp_override) < 1e-9))
        return done if same else None

    def _start_workers(self) -> None:
        self.n_workers = self.cfg.n_workers if self.queue else 1  # nothing to do: no pool to start
        if self.n_workers > 1:
            # Results come back through scratch files: a worker killed mid-send must not hang the run (tiling/pool.py)
            self.executor = SpillingProcessPool(self.n_workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.n_workers):
                self.executor.submit(_worker_ready)
            # The first slide is planned here while the workers start (spawning and importing takes ~1.5 s), so
            # a single huge slide does not wait for both one after the other.
            self.plan_inline_next = True

    def _fill(self) -> None:
        max_in_flight = 2 * self.n_workers
        n_plans = sum(1 for kind, _, _ in self.futures.values() if kind == "plan")
        while (self.queue and n_plans < max(1, self.n_workers // 2) and len(self.jobs) + n_plans <= self.n_workers
               and len(self.futures) < max_in_flight):
            slide = self.queue.pop(0)
            self.emit("slide_start", {"slide_id": slide.slide_id})
            planner = _InlineExecutor() if self.plan_inline_next else self.executor
            self.plan_inline_next = False
            fut = planner.submit(plan_slide, slide, self.cfg, source=self.sources.get(slide.slide_id))
            self.futures[fut] = ("plan", slide.slide_id, -1)
            n_plans += 1
        for job in list(self.jobs.values()):
            plan = job.plan
            while job.next_submit < len(plan.blocks) and len(self.futures) < max_in_flight:
                start, stop = plan.blocks[job.next_submit]
                fut = self.executor.submit(tile_block, plan.slide.path, backend=plan.backend, geometry=plan.geometry,
                                           rows=plan.rows[start:stop], cols=plan.cols[start:stop], cfg=self.cfg)
                self.futures[fut] = ("block", plan.slide.slide_id, job.next_submit)
                job.next_submit += 1

    def _on_done(self, fut: cf.Future) -> None:
        kind, sid, index = self.futures.pop(fut)
        if sid in self.outcomes:  # the slide already failed; drop its remaining blocks
            return
        exc = fut.exception()
        if isinstance(exc, BrokenProcessPool):
            raise exc  # the pool is gone for every slide, not just this one: handled in run()
        if exc is not None:
            self._fail(sid, exc)
            return
        try:
            if kind == "plan":
                self._on_plan(fut.result())
            else:
                self._on_block(self.jobs[sid], index, fut.result())
        except Exception as exc:  # noqa: BLE001 - store errors etc. fail the slide, not the run
            self._fail(sid, exc)

    def _on_plan(self, plan: SlidePlan) -> None:
        cfg, sid = self.cfg, plan.slide.slide_id
        writer = self.store.begin_slide(
            sid, cfg.tile_px, encoding=cfg.encoding, tiles_per_shard=cfg.tiles_per_shard,
            tiles_per_chunk=cfg.tiles_per_chunk, max_tiles=len(plan.rows),
            tile_attrs={"jpeg_quality": cfg.jpeg_quality, "jpeg_subsampling": cfg.jpeg_subsampling})
        self.jobs[sid] = job = _SlideJob(plan=plan, writer=writer, started=time.perf_counter())
        self.emit("slide_planned", {"slide_id": sid, "n_candidates": len(plan.rows)})
        if not plan.blocks:
            self._finish(job)

    def _on_block(self, job: _SlideJob, index: int, result: BlockResult) -> None:
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
            self.emit("tiles", {"slide_id": plan.slide.slide_id, "n": len(res.kept)})
        if job.next_write == len(plan.blocks):
            self._finish(job)

    def _finish(self, job: _SlideJob) -> None:
        plan, sid = job.plan, job.plan.slide.slide_id
        if not plan.blocks:
            job.pixel_source = "none (no tissue)"
        rejected = {k: int(sum(len(v) for v in vs)) for k, vs in job.rejected.items()}
        empty_reason = "" if job.n_tiles else why_empty(len(plan.rows), rejected, job.n_decode_failures,
                                                        self.cfg.tissue.min_tissue_fraction)
        job.writer.commit({**provenance(plan, self.cfg, job), "empty_reason": empty_reason})
        self.jobs.pop(sid)
        if self.cfg.qc_images:
            try:
                _write_qc_image(self.store, plan, job)
            except Exception as exc:  # noqa: BLE001 - a QC picture is not worth losing the slide for
                self.emit("warning", {"slide_id": sid, "message": f"QC image not written: {exc}"})
        status = "done" if job.n_tiles else "empty"
        self.outcomes[sid] = SlideOutcome(
            sid, str(plan.slide.path), status, n_tiles=job.n_tiles, n_candidates=len(plan.rows), rejected=rejected,
            n_decode_failures=job.n_decode_failures, seconds=time.perf_counter() - job.started, reason=empty_reason)
        self.emit("slide_end", {"slide_id": sid, "status": status, "n_tiles": job.n_tiles})

    def _fail(self, slide_id: str, exc: BaseException) -> None:
        job = self.jobs.pop(slide_id, None)
        if job is not None:
            job.writer.abort()
        slide = self.by_id[slide_id]
        self.store.record_failure(slide_id, _failure_record(slide, exc))
        self.outcomes[slide_id] = SlideOutcome(slide_id, str(slide.path), "failed",
                                               reason=f"{type(exc).__name__}: {exc}")
        self.emit("slide_end", {"slide_id": slide_id, "status": "failed"})


def why_empty(n_candidates: int, rejected: dict[str, int], n_decode_failures: int,
              min_tissue_fraction: float) -> str:
    """One line saying why a slide gave no tiles: no tissue, or which rules rejected every candidate."""
    if n_candidates == 0:
        return f"no tissue found (no tile reached min_tissue_fraction {min_tissue_fraction:g}; see the QC image)"
    rules = [f"{reason} {n}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1])]
    if n_decode_failures:
        rules.append(f"unreadable {n_decode_failures}")
    return f"all {n_candidates} candidate tile(s) rejected: {', '.join(rules)}"


__all__ = ["run_tiling", "SlideOutcome", "SlideError", "provenance", "why_empty"]
