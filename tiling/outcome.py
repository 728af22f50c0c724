"""What a tiling run records about each slide: its outcome, its provenance, why it gave no tiles, its failure.

The runner (tiling/runner.py) decides what happens; this module says how it is written down, in the store (the
provenance and failure records of docs/tile-store.md) and for the summary (`SlideOutcome`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tiling.config import TilingConfig
from tiling.configio import to_dict
from tiling.fsio import now_iso
from tiling.inputs import SlideInput
from tiling.store import qc_image_key

if TYPE_CHECKING:
    from tiling.worker import SlidePlan

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
    warnings: list[str] = field(default_factory=list)  # e.g. where the thumbnail needed a fallback


@dataclass
class SlideTally:
    """What a slide's blocks gave so far (the runner adds each block's result in order)."""

    kept_rows: list[np.ndarray] = field(default_factory=list)
    kept_cols: list[np.ndarray] = field(default_factory=list)
    rejected: dict[str, list[np.ndarray]] = field(default_factory=dict)
    n_decode_failures: int = 0
    decode_error: str = ""
    n_tiles: int = 0
    pixel_source: str = ""
    fast_path_reason: str = ""
    decoder: str = ""
    reader_warnings: list[str] = field(default_factory=list)

    def rejected_counts(self) -> dict[str, int]:
        return {k: int(sum(len(v) for v in vs)) for k, vs in self.rejected.items()}


class TilingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM: what was committed is kept, slides in progress are discarded.

    `outcomes` lists the slides that finished (or were already complete); `n_partial` slides were being tiled
    and `n_not_started` never started: rerunning the same command tiles exactly those.
    """

    def __init__(self, signum: int, outcomes: list[SlideOutcome], *, n_partial: int, n_not_started: int):
        super().__init__(signum)
        self.signum, self.outcomes = signum, outcomes
        self.n_partial, self.n_not_started = n_partial, n_not_started


def failure_record(slide: SlideInput, exc: BaseException) -> dict[str, Any]:
    """The store's `failures` entry for a slide that failed with `exc`."""
    record = {
        "source_path": str(slide.path),
        "error_type": type(exc).__name__,
        "reason": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:],
    }
    warnings = getattr(exc, "reader_warnings", None)
    if warnings:
        record["reader_warnings"] = list(warnings)
    return record


def provenance(plan: SlidePlan, cfg: TilingConfig, tally: SlideTally) -> dict[str, Any]:
    """The slide group's attrs["pathdino"]: enough to know exactly how every tile was made."""
    from tiling import __version__

    g = plan.geometry
    return {
        "slide_id": plan.slide.slide_id,
        "source_slide_id": plan.slide.source_id or plan.slide.slide_id,
        "source_path": str(plan.slide.path.resolve()),
        "source_size_bytes": plan.size_bytes,
        "source_fingerprint": plan.fingerprint,
        "reader": plan.backend,
        "reader_version": plan.backend_version,
        "pixel_source": tally.pixel_source,
        "fast_path_reason": tally.fast_path_reason,
        "slide_mpp": g.slide_mpp,
        "slide_mpp_source": plan.slide_mpp_source,
        "level0_width": plan.level0_size[0],
        "level0_height": plan.level0_size[1],
        "target_mpp": g.target_mpp,
        "effective_mpp": g.effective_mpp,
        "mpp_tolerance": g.tolerance,
        "within_tolerance": g.within_tolerance,
        "read_level": g.read_level,
        "read_downsample": g.read_downsample,
        "read_mpp": g.read_mpp,
        "read_tile_px": g.read_tile_px,
        "scale": g.scale,
        "tile_px": g.tile_px,
        "overlap_px": g.overlap_px,
        "step_px": g.step_px,
        "level0_tile_px": g.level0_tile_px,
        "level0_step_px": g.level0_step_px,
        "grid_rows": plan.grid_rows,
        "grid_cols": plan.grid_cols,
        "tile_order": TILE_ORDER,
        "block_tiles": cfg.block_tiles,
        "tissue": to_dict(cfg.tissue),
        "pixel_qc": to_dict(cfg.pixel_qc),
        "thumbnail_mpp": plan.thumbnail_mpp,
        "encoding": cfg.encoding,
        "jpeg_quality": cfg.jpeg_quality,
        "jpeg_subsampling": cfg.jpeg_subsampling,
        "params_key": cfg.params_key(),
        "n_candidates": int(len(plan.rows)),
        "n_rejected": tally.rejected_counts(),
        "n_decode_failures": tally.n_decode_failures,
        "decode_error": tally.decode_error,
        "max_decode_failure_fraction": cfg.max_decode_failure_fraction,
        "thumbnail_fallbacks": list(plan.thumbnail_notes),
        "reader_warnings": list(dict.fromkeys(plan.reader_warnings + tally.reader_warnings))[:10],
        "qc_image": qc_image_key(plan.slide.slide_id),
        "package_version": __version__,
        "created": now_iso(),
        "read_reduction": g.read_reduction,
        "decoder": tally.decoder,
    }


def qc_image_inputs(plan: SlidePlan, tally: SlideTally) -> dict[str, np.ndarray]:
    """What `tiling.qc_image.qc_image_jpeg` draws for a slide: thumbnail, mask, kept and rejected tile boxes in
    thumbnail pixels (cheap to compute; the drawing itself is left to a worker)."""
    from tiling.geometry import tile_level0_xy

    scale = plan.geometry.slide_mpp / plan.thumbnail_mpp

    def boxes(rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
        if not rows:
            return np.zeros((0, 4))
        xy = tile_level0_xy(plan.geometry, np.concatenate(rows), np.concatenate(cols)).astype(float) * scale
        side = plan.geometry.level0_tile_px * scale
        return np.column_stack([xy, xy + side])

    rej_rows = [plan.rows[idx] for idxs in tally.rejected.values() for idx in idxs]
    rej_cols = [plan.cols[idx] for idxs in tally.rejected.values() for idx in idxs]
    return {
        "thumbnail_rgb": plan.thumbnail,
        "mask": plan.mask,
        "tile_boxes_thumb_px": boxes(tally.kept_rows, tally.kept_cols),
        "rejected_boxes": boxes(rej_rows, rej_cols),
    }


def why_empty(
    n_candidates: int, rejected: dict[str, int], n_decode_failures: int, min_tissue_fraction: float, too_small: str = ""
) -> str:
    """One line saying why a slide gave no tiles: smaller than one tile, no tissue, or which rules rejected every
    candidate."""
    if too_small:
        return too_small
    if n_candidates == 0:
        return f"no tissue found (no tile reached min_tissue_fraction {min_tissue_fraction:g}; see the QC image)"
    rules = [f"{reason} {n}" for reason, n in sorted(rejected.items(), key=lambda kv: -kv[1])]
    if n_decode_failures:
        rules.append(f"unreadable {n_decode_failures}")
    return f"all {n_candidates} candidate tile(s) rejected: {', '.join(rules)}"


def too_many_decode_failures(n_failures: int, n_candidates: int, max_fraction: float) -> str:
    """The DecodeFailuresError message when more than `max_fraction` of the candidates were unreadable, else ""."""
    if n_failures == 0 or n_failures <= max_fraction * n_candidates:
        return ""
    return (
        f"{n_failures} of {n_candidates} candidate tiles ({n_failures / max(n_candidates, 1):.0%}) could not be "
        f"read: their source tiles fail to decode (a damaged file?), more than max_decode_failure_fraction "
        f"{max_fraction:g}; re-export or re-copy the slide, or raise --max-decode-failure-fraction to keep the "
        "tiles that decode"
    )
