"""`pathdino tile` and `pathdino info`: the tiler's command-line front end (progress, tables, exit codes)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tiling.config import TilingConfig
from tiling.configio import load_config
from tiling.inputs import collect_slides, parse_shard, select_shard
from tiling.runner import SlideOutcome, run_tiling
from tiling.store import TileStore, summarise

console = Console(stderr=True)


def build_config(config_path: Path | None, flags: dict[str, Any]) -> TilingConfig:
    """YAML config (if any) first, then every flag the user actually gave on top (``None``: not given)."""
    return load_config(TilingConfig, config_path, values=flags, where=str(config_path or "tiling config"))


def tile_command(inputs: list[str], out: str, config: TilingConfig, slide_mpp: float | None, shard: str | None,
                 overwrite: bool) -> int:
    slides = collect_slides(inputs, slide_mpp=slide_mpp)
    index, count = parse_shard(shard)
    mine = select_shard(slides, index, count)
    shard_note = f" (shard {index}/{count}: {len(mine)} of {len(slides)})" if count > 1 else ""
    console.print(f"Tiling {len(mine)} slide(s){shard_note} into [bold]{out}[/] at {config.target_mpp} µm/px, "
                  f"{config.tile_px} px, {config.n_workers} worker(s)")
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal and not _force_progress()) as progress:
        slides_task = progress.add_task("slides", total=len(mine), rate="")
        tiles_task = progress.add_task("tiles", total=None, rate="")
        counts = {"tiles": 0}

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "slide_end":
                progress.advance(slides_task)
            elif kind == "tiles":
                counts["tiles"] += info["n"]
                rate = counts["tiles"] / max(time.perf_counter() - started, 1e-9)
                progress.update(tiles_task, completed=counts["tiles"], rate=f"{rate:,.0f} tiles/s")
            elif kind == "warning":
                console.print(f"[yellow]warning[/] {info['slide_id']}: {info['message']}")

        outcomes = run_tiling(mine, out, config, overwrite=overwrite, on_event=on_event)
    elapsed = time.perf_counter() - started
    print_summary(outcomes, elapsed)
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed else 0


def _force_progress() -> bool:
    import os

    return bool(os.environ.get("PATHDINO_PROGRESS"))


def print_summary(outcomes: list[SlideOutcome], elapsed_s: float) -> None:
    table = Table(title="pathdino tile: summary")
    for col in ("slide", "status", "tiles", "candidates", "rejected by QC", "decode failures", "seconds"):
        table.add_column(col, justify="left" if col in ("slide", "status") else "right")
    for o in outcomes:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(o.rejected.items())) or "-"
        style = {"done": "green", "skipped": "cyan", "failed": "red"}[o.status]
        table.add_row(o.slide_id, f"[{style}]{o.status}[/]", f"{o.n_tiles:,}", f"{o.n_candidates:,}", rejected,
                      str(o.n_decode_failures), f"{o.seconds:.1f}")
    console.print(table)
    total = sum(o.n_tiles for o in outcomes if o.status == "done")
    console.print(f"{sum(o.status == 'done' for o in outcomes)} done, {sum(o.status == 'skipped' for o in outcomes)} "
                  f"skipped (already complete), {sum(o.status == 'failed' for o in outcomes)} failed; {total:,} new "
                  f"tiles in {elapsed_s:.1f} s ({total / max(elapsed_s, 1e-9):,.0f} tiles/s)")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        ftable = Table(title="failed slides (details and tracebacks: `pathdino info STORE --failures`)")
        ftable.add_column("slide")
        ftable.add_column("path")
        ftable.add_column("reason")
        for o in failed:
            ftable.add_row(o.slide_id, o.source_path, o.reason)
        console.print(ftable)


def info_command(store_url: str, show_failures: bool, as_json: bool) -> int:
    from tiling.store import dumps

    store = TileStore(store_url)
    summary = summarise(store)
    if as_json:
        print(dumps({**summary, "slides": {k: dataclasses.asdict(v) for k, v in store.entries.items()},
                     "failures": store.failures}))
        return 0
    out = Console()
    out.print(f"[bold]{store.url}[/]: pathdino tile store v{summary['format_version']}, {summary['n_slides']} "
              f"complete slide(s), {summary['n_tiles']:,} tiles, {summary['n_failures']} failure(s)")
    table = Table()
    for col in ("slide", "tiles", "µm/px", "tile px", "read level", "reader", "source"):
        table.add_column(col)
    for sid, entry in store.entries.items():
        attrs = store.slide(sid).attrs
        table.add_row(sid, f"{entry.n_tiles:,}", f"{attrs.get('effective_mpp', float('nan')):.4f}",
                      str(attrs.get("tile_px")), str(attrs.get("read_level")),
                      f"{attrs.get('reader')} ({attrs.get('pixel_source')})", entry.source_path)
    out.print(table)
    if store.failures:
        ftable = Table(title="failures")
        for col in ("slide", "error", "reason", "path"):
            ftable.add_column(col)
        for sid, f in sorted(store.failures.items()):
            ftable.add_row(sid, f.get("error_type", ""), f.get("reason", ""), f.get("source_path", ""))
        out.print(ftable)
        if show_failures:
            for sid, f in sorted(store.failures.items()):
                out.rule(sid)
                out.print(f.get("traceback", ""), markup=False, highlight=False)
    return 0
