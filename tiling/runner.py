"""`pathdino tile`: schedule slides and their blocks over worker processes and write the tile store.

The parent plans slides in workers, farms each slide's blocks out to all workers (so one huge slide uses every
core), puts the results back in order, and writes whole shards. A slide becomes visible only when committed; a
slide that fails is recorded with its reason and traceback while the others go on. SIGINT (Ctrl-C) and SIGTERM
stop the workers at once, discard the slides in progress and raise `TilingInterrupted` saying what was kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import signal
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tiling.config import TilingConfig
from tiling.errors import DecodeFailuresError, SlideError
from tiling.inputs import SlideInput
from tiling.interrupts import InterruptGuard, signals_ignored
from tiling.outcome import (
    SlideOutcome,
    SlideTally,
    TilingInterrupted,
    failure_record,
    provenance,
    qc_image_inputs,
    too_many_decode_failures,
    why_empty,
)
from tiling.pool import SpillingProcessPool
from tiling.qc_image import qc_image_jpeg
from tiling.store import qc_image_key
from tiling.slide_write import SlideWriter
from tiling.store_write import TileStoreWriter
from tiling.worker import BlockResult, SlidePlan, close_readers, fingerprint, plan_slide, tile_block


class _InlineExecutor(cf.Executor):
    """Runs tasks in the calling process (workers=1): the honest one-core figure, and easy to debug."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except (KeyboardInterrupt, SystemExit):
            raise  # an interrupt stops the run; it is not this slide's failure
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
    tally: SlideTally = field(default_factory=SlideTally)


def _worker_ready() -> bool:
    """A no-op task: submitting it starts the worker processes (they import tiling.worker) right away."""
    return True


def run_tiling(
    slides: list[SlideInput],
    out_url: str,
    cfg: TilingConfig,
    overwrite: bool = False,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[SlideOutcome]:
    """Tile `slides` into the store at `out_url`; returns one outcome per slide (in input order).

    `on_event(kind, info)` receives "slide_start", "slide_planned", "tiles" (info["n"] new tiles), "slide_end" and
    "warning" for progress display. SIGINT/SIGTERM raise `TilingInterrupted` (a KeyboardInterrupt) once the
    workers are stopped and the slides in progress discarded; committed slides are kept.
    """
    run = _TilingRun(TileStoreWriter(out_url), cfg, on_event or (lambda kind, info: None))
    with run.guard.installed():
        try:
            run.run(slides, overwrite=overwrite)
        except KeyboardInterrupt as exc:
            done = [run.outcomes[s.slide_id] for s in slides if s.slide_id in run.outcomes]
            queued = {s.slide_id for s in run.queue}
            n_partial = sum(1 for sid in run.by_id if sid not in run.outcomes and sid not in queued)
            raise TilingInterrupted(
                int(getattr(exc, "signum", signal.SIGINT)),
                done,
                n_partial=n_partial,
                n_not_started=len(slides) - len(done) - n_partial,
            ) from None
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
        self.guard = InterruptGuard()  # SIGINT/SIGTERM: held while the index or a slide folder changes

    def run(self, slides: list[SlideInput], *, overwrite: bool) -> None:
        self.store.clean_stale_staging()
        for slide in slides:
            self._skip_or_queue(slide, overwrite=overwrite)
        interrupted = False
        try:
            self._start_workers()
            self._fill()
            while self.futures:
                done, _ = cf.wait(list(self.futures), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    self._on_done(fut)
                self._fill()
        except BrokenProcessPool as exc:
            # A worker died (killed, typically out of memory): nothing more can run in this pool. Committed slides
            # are kept; every other slide is recorded so that rerunning the same command resumes exactly there.
            broken = RuntimeError(
                f"a tiling worker process died ({exc}); slides already committed are kept: rerun "
                "the same command to resume (with fewer --workers if memory ran out)"
            )
            for sid in self.by_id:
                if sid not in self.outcomes:
                    self._fail(sid, broken)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            with signals_ignored() if interrupted else contextlib.nullcontext():
                self._stop(interrupted)
                self.store.fold_index()  # plain zarr (the root's consolidated metadata) sees every commit of the run

    def _stop(self, interrupted: bool) -> None:
        if interrupted and isinstance(self.executor, SpillingProcessPool):
            self.executor.terminate()  # do not wait for the plans and blocks in flight
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
        self.outcomes[slide.slide_id] = SlideOutcome(
            slide.slide_id,
            str(slide.path),
            status,
            n_tiles=n_tiles,
            reason=reason,
            already_complete=True,
            n_decode_failures=int(done.get("n_decode_failures", 0) or 0),
        )
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
        same = (
            done.get("source_fingerprint") == source[0]
            and done.get("source_size_bytes") == source[1]
            and done.get("params_key") == self.cfg.params_key()
            and (slide.mpp_override is None or abs(done.get("slide_mpp", 0) - slide.mpp_override) < 1e-9)
        )
        # a slide kept under a looser --max-decode-failure-fraction is tried again (and fails) under a stricter one
        acceptable = not too_many_decode_failures(
            int(done.get("n_decode_failures", 0) or 0),
            int(done.get("n_candidates", 0) or 0),
            self.cfg.max_decode_failure_fraction,
        )
        return done if same and acceptable else None

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
        while (
            self.queue
            and n_plans < max(1, self.n_workers // 2)
            and len(self.jobs) + n_plans <= self.n_workers
            and len(self.futures) < max_in_flight
        ):
            slide = self.queue[0]
            self.emit("slide_start", {"slide_id": slide.slide_id})
            planner = _InlineExecutor() if self.plan_inline_next else self.executor
            self.plan_inline_next = False
            fut = planner.submit(plan_slide, slide, self.cfg, source=self.sources.get(slide.slide_id))
            self.queue.pop(0)  # only now: an interrupt inside an inline plan leaves the slide "not started"
            self.futures[fut] = ("plan", slide.slide_id, -1)
            n_plans += 1
        for job in list(self.jobs.values()):
            plan = job.plan
            while job.next_submit < len(plan.blocks) and len(self.futures) < max_in_flight:
                start, stop = plan.blocks[job.next_submit]
                fut = self.executor.submit(
                    tile_block,
                    plan.slide.path,
                    backend=plan.backend,
                    geometry=plan.geometry,
                    rows=plan.rows[start:stop],
                    cols=plan.cols[start:stop],
                    cfg=self.cfg,
                )
                self.futures[fut] = ("block", plan.slide.slide_id, job.next_submit)
                job.next_submit += 1

    def _on_done(self, fut: cf.Future) -> None:
        kind, sid, index = self.futures.pop(fut)
        if kind == "qc":
            self._on_qc_image(sid, fut)
            return
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
        with self.guard.critical():
            writer = self.store.begin_slide(
                sid,
                cfg.tile_px,
                encoding=cfg.encoding,
                tiles_per_shard=cfg.tiles_per_shard,
                tiles_per_chunk=cfg.tiles_per_chunk,
                max_tiles=len(plan.rows),
                tile_attrs={"jpeg_quality": cfg.jpeg_quality, "jpeg_subsampling": cfg.jpeg_subsampling},
            )
            self.jobs[sid] = job = _SlideJob(plan=plan, writer=writer, started=time.perf_counter())
        self.emit("slide_planned", {"slide_id": sid, "n_candidates": len(plan.rows)})
        for note in plan.thumbnail_notes:
            self.emit("warning", {"slide_id": sid, "message": note})
        if not plan.blocks:
            self._finish(job)

    def _on_block(self, job: _SlideJob, index: int, result: BlockResult) -> None:
        job.results[index] = result
        plan, tally = job.plan, job.tally
        while job.next_write in job.results:
            res = job.results.pop(job.next_write)
            start, _ = plan.blocks[job.next_write]
            sel = start + res.kept
            job.writer.add(res.encoded, plan.level0_xy[sel], plan.tissue_fraction[sel])
            tally.kept_rows.append(plan.rows[sel])
            tally.kept_cols.append(plan.cols[sel])
            for reason, idxs in res.rejected.items():
                tally.rejected.setdefault(reason, []).append(start + np.asarray(idxs, dtype=np.int64))
            tally.n_decode_failures += res.n_decode_failures
            tally.decode_error = tally.decode_error or res.decode_error
            tally.reader_warnings.extend(w for w in res.reader_warnings if w not in tally.reader_warnings)
            tally.n_tiles += len(res.kept)
            tally.pixel_source, tally.fast_path_reason = res.pixel_source, res.fast_path_reason
            tally.decoder = res.decoder
            job.next_write += 1
            self.emit("tiles", {"slide_id": plan.slide.slide_id, "n": len(res.kept)})
        if job.next_write == len(plan.blocks):
            self._finish(job)

    def _finish(self, job: _SlideJob) -> None:
        plan, tally, sid = job.plan, job.tally, job.plan.slide.slide_id
        too_many = too_many_decode_failures(
            tally.n_decode_failures, len(plan.rows), self.cfg.max_decode_failure_fraction
        )
        if too_many:
            raise DecodeFailuresError(f"{plan.slide.path}: {too_many} (first error: {tally.decode_error})")
        if not plan.blocks:
            tally.pixel_source = "none (no tissue)"
        rejected = tally.rejected_counts()
        empty_reason = (
            ""
            if tally.n_tiles
            else why_empty(
                len(plan.rows), rejected, tally.n_decode_failures, self.cfg.tissue.min_tissue_fraction, plan.too_small
            )
        )
        record = {**provenance(plan, self.cfg, tally), "empty_reason": empty_reason}
        status = "done" if tally.n_tiles else "empty"
        with self.guard.critical():
            job.writer.commit(record)
            self.jobs.pop(sid)
            self.outcomes[sid] = SlideOutcome(
                sid,
                str(plan.slide.path),
                status,
                n_tiles=tally.n_tiles,
                n_candidates=len(plan.rows),
                rejected=rejected,
                n_decode_failures=tally.n_decode_failures,
                seconds=time.perf_counter() - job.started,
                reason=empty_reason,
                warnings=list(plan.thumbnail_notes),
            )
        if self.cfg.qc_images:
            # Drawn by a worker, overlapping other slides' tiles (a small slide's picture costs as much as ~100 of
            # its tiles); written here when it comes back. workers=1 draws it inline, as before.
            fut = self.executor.submit(qc_image_jpeg, **qc_image_inputs(plan, tally))
            self.futures[fut] = ("qc", sid, -1)
            if fut.done():
                self._on_done(fut)
        self.emit("slide_end", {"slide_id": sid, "status": status, "n_tiles": tally.n_tiles})

    def _on_qc_image(self, sid: str, fut: cf.Future) -> None:
        exc = fut.exception()
        if isinstance(exc, BrokenProcessPool):
            raise exc
        try:
            if exc is not None:
                raise exc
            self.store.write_file(qc_image_key(sid), fut.result())
        except Exception as err:  # noqa: BLE001 - a QC picture is not worth losing the slide for
            self.emit("warning", {"slide_id": sid, "message": f"QC image not written: {err}"})

    def _fail(self, slide_id: str, exc: BaseException) -> None:
        slide = self.by_id[slide_id]
        with self.guard.critical():
            job = self.jobs.pop(slide_id, None)
            if job is not None:
                job.writer.abort()
            self.store.record_failure(slide_id, failure_record(slide, exc))
            self.outcomes[slide_id] = SlideOutcome(
                slide_id,
                str(slide.path),
                "failed",
                reason=f"{type(exc).__name__}: {exc}",
                n_decode_failures=job.tally.n_decode_failures if job else 0,
            )
        self.emit("slide_end", {"slide_id": slide_id, "status": "failed"})


__all__ = ["run_tiling", "SlideOutcome", "SlideError", "TilingInterrupted", "provenance", "why_empty"]
