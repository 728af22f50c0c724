"""`pathdino tile` and `pathdino info`: the tiler's command-line front end (progress, tables, exit codes)."""

from __future__ import annotations

import collections
import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tiling.config import TilingConfig
from tiling.configio import load_config
from tiling.inputs import InputScan, SlideInput, parse_shard, scan_inputs, select_shard, slide_format
from tiling.outcome import TilingInterrupted
from tiling.preflight import check_out_path
from tiling.runner import SlideOutcome, run_tiling
from tiling.store import TileStore, summarise

console = Console(stderr=True)


def build_config(config_path: Path | None, flags: dict[str, Any]) -> TilingConfig:
    """YAML config (if any) first, then every flag the user actually gave on top (``None``: not given)."""
    return load_config(TilingConfig, config_path, values=flags, where=str(config_path or "tiling config"))


def tile_command(
    inputs: list[str],
    out: str,
    config: TilingConfig,
    *,
    slide_mpp: float | None,
    shard: str | None,
    overwrite: bool,
    dry_run: bool = False,
    fail_on_empty: bool = False,
) -> int:
    """`pathdino tile`: say what was found, tile it with progress bars, summarise; returns the exit status.

    Ctrl-C (SIGINT) and SIGTERM stop the run after the workers: what was committed is kept, the summary says so,
    and the status is 130 or 143 (128 + the signal), as for any program a signal stopped.
    """
    check_out_path(out, inputs, probe_write=not dry_run)
    index, count = parse_shard(shard)
    try:
        scan = scan_inputs(inputs, slide_mpp=slide_mpp)  # a big archive takes a while: Ctrl-C is likely here too
    except KeyboardInterrupt:
        console.print("[red]interrupted (SIGINT)[/] while looking for slides: nothing was written")
        return 130
    mine = select_shard(scan.slides, index, count)
    print_found(scan, list_all=dry_run)
    if dry_run:
        print_slide_list(mine)
        return 0
    shard_note = f" (shard {index}/{count}: {len(mine)} of {len(scan.slides)})" if count > 1 else ""
    console.print(
        f"Tiling {len(mine)} slide(s){shard_note} into [bold]{escape(out)}[/] at {config.target_mpp} µm/px, "
        f"{config.tile_px} px, {config.n_workers} worker(s)",
        soft_wrap=True,
    )
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal and not _force_progress(),
    ) as progress:
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
                console.print(
                    f"[yellow]warning[/] {escape(info['slide_id'])}: {escape(info['message'])}", soft_wrap=True
                )

        try:
            outcomes = run_tiling(mine, out, config, overwrite=overwrite, on_event=on_event)
        except TilingInterrupted as stop:
            interrupted = stop
        else:
            interrupted = None
    if interrupted is not None:
        return print_interrupted(interrupted, time.perf_counter() - started)
    print_summary(outcomes, time.perf_counter() - started)
    failed = any(o.status == "failed" for o in outcomes)
    empty = any(o.status == "empty" for o in outcomes)
    return 1 if failed or (fail_on_empty and empty) else 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items())


def print_found(scan: InputScan, *, list_all: bool, max_listed: int = 10) -> None:
    """Before tiling: slides per format, and the files that will not be tiled with their reason."""
    console.print(f"Found {len(scan.slides)} slide(s): {_counts(scan.format_counts()) or 'none'}")
    for note in scan.notes:
        console.print(f"[yellow]warning[/] {escape(note)}", highlight=False, soft_wrap=True)
    if scan.reader_warnings and list_all:
        for message in scan.reader_warnings:
            console.print(f"  [dim]DICOM header warning[/] {escape(message)}", highlight=False, soft_wrap=True)
    elif scan.reader_warnings:
        console.print(
            f"[dim]{len(scan.reader_warnings)} warning(s) while reading DICOM headers (odd values; the "
            "files are used as usual): --dry-run lists them[/]",
            highlight=False,
        )
    if not scan.skipped:
        return
    console.print(f"Skipped {len(scan.skipped)} file(s): {_counts(scan.skip_counts())}")
    shown = scan.skipped if list_all else scan.skipped[:max_listed]
    for f in shown:
        console.print(
            f"  [dim]skipped[/] {escape(str(f.path))}: {escape(f.describe())}", highlight=False, soft_wrap=True
        )
    if len(shown) < len(scan.skipped):
        console.print(f"  ... and {len(scan.skipped) - len(shown)} more (--dry-run lists them all)")


def _plain_rows(columns: tuple[str, ...], rows: list[tuple[str, ...]], stream: Any) -> None:
    """Columns aligned with spaces, the last one left free: for lists of hundreds or thousands of slides, where
    laying out a rich table costs ~10 ms a row (10,000 slides took minutes)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns[:-1])]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in [columns, *rows]]
    stream.write("\n".join(lines) + "\n")


def print_slide_list(slides: list[SlideInput]) -> None:
    """`--dry-run`: every slide that would be tiled, to stdout (one per line: id, format, path)."""
    if len(slides) > PLAIN_TABLE_ROWS:
        print(f"{len(slides)} slide(s) would be tiled (--dry-run: nothing written)")
        _plain_rows(
            ("slide", "format", "path"), [(s.slide_id, slide_format(s.path), str(s.path)) for s in slides], sys.stdout
        )
        return
    table = Table(title=f"{len(slides)} slide(s) would be tiled (--dry-run: nothing written)")
    for col in ("slide", "format", "path"):
        table.add_column(col, overflow="fold")
    for s in slides:
        table.add_row(s.slide_id, slide_format(s.path), str(s.path))
    Console().print(table, highlight=False)


def _force_progress() -> bool:
    import os

    return bool(os.environ.get("PATHDINO_PROGRESS"))


PLAIN_TABLE_ROWS = 200
"""`pathdino info`, `tile --dry-run` and the end-of-run summary list more slides than this as plain aligned text,
not a rich table (fast at 10,000 slides)."""
STATUS_STYLE = {"done": "green", "empty": "yellow", "skipped": "cyan", "failed": "red"}


def short_reason(reason: str) -> str:
    """One line for an 80-column table: the error class and the message's first clause, file paths shortened.

    The full message and traceback stay in the store (`pathdino info STORE --failures`).
    """
    line = (reason or "").strip().splitlines()[0] if (reason or "").strip() else ""
    # The slide column already says which slide: drop "path/to/slide.svs: " prefixes, shorten other paths.
    line = re.sub(r"(?:^|(?<=: ))(?:[\w.~-]*/)*[\w.-]+\.\w+: ", "", line)
    line = re.sub(r"(?:[\w.~-]*/)+([\w.-]+)", r"\1", line)
    return re.split(r"; | \(|\. ", line, maxsplit=1)[0]


def _middle_cut(text: str, width: int) -> str:
    """Cut the middle out of a long id: slides often share a prefix and differ at the end."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def _outcome_note(o: SlideOutcome) -> str:
    if o.status in ("failed", "empty"):
        return short_reason(o.reason)
    if o.status == "skipped":
        return "already complete"
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(o.rejected.items()))
    note = f"of {o.n_candidates:,} candidates"
    if o.n_decode_failures:  # tiles lost to source tiles that do not decode: never silent
        note += f"; unreadable {o.n_decode_failures:,}"
    return f"{note}; rejected: {rejected}" if rejected else note


def print_summary(outcomes: list[SlideOutcome], elapsed_s: float) -> None:
    """The end-of-run table (slide, status, tiles, one-line note: fits 80 columns) and the totals line. Past
    `PLAIN_TABLE_ROWS` slides, slides skipped as already complete are counted, not listed, and the rest are plain
    aligned rows (a rerun over a 10,000-slide archive prints its totals, not 10,000 rows)."""
    if len(outcomes) > PLAIN_TABLE_ROWS:
        listed = [o for o in outcomes if not o.already_complete]
        if listed:
            _plain_rows(
                ("slide", "status", "tiles", "reason / note"),
                [(o.slide_id, o.status, f"{o.n_tiles:,}", _outcome_note(o)) for o in listed],
                console.file,
            )
    else:
        _summary_table(outcomes)
    _summary_totals(outcomes, elapsed_s)


def _summary_table(outcomes: list[SlideOutcome]) -> None:
    table = Table(
        title="pathdino tile: summary", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    # Every cell stays on one line: the slide id and the reason are cut with "…" to fit the terminal (80 columns).
    id_width = min(22, max([len(o.slide_id) for o in outcomes] + [5]))
    tiles_width = max([len(f"{o.n_tiles:,}") for o in outcomes] + [5])
    reason_width = max(20, console.width - id_width - 7 - tiles_width - 6)  # 6: the padding between 4 columns
    table.add_column("slide", no_wrap=True, overflow="ellipsis", max_width=id_width)
    table.add_column("status", no_wrap=True, min_width=7)
    table.add_column("tiles", justify="right", no_wrap=True)
    table.add_column("reason / note", no_wrap=True, overflow="ellipsis", max_width=reason_width)
    for o in outcomes:
        style = STATUS_STYLE[o.status]
        table.add_row(
            escape(_middle_cut(o.slide_id, id_width)),
            f"[{style}]{o.status}[/]",
            f"{o.n_tiles:,}",
            escape(_outcome_note(o)),
        )
    console.print(table, highlight=False)


def _summary_totals(outcomes: list[SlideOutcome], elapsed_s: float) -> None:
    n = collections.Counter(o.status for o in outcomes)
    n_empty_old = sum(o.status == "empty" and o.already_complete for o in outcomes)
    total = sum(o.n_tiles for o in outcomes if o.status == "done")
    console.print(
        f"{n['done']} done, [yellow]{n['empty']} empty[/], {n['skipped'] + n_empty_old} skipped (already "
        f"complete), [red]{n['failed']} failed[/]; {total:,} new tiles in {elapsed_s:.1f} s "
        f"({total / max(elapsed_s, 1e-9):,.0f} tiles/s)"
    )
    if n["failed"]:
        console.print("[red]full failure messages and tracebacks[/]: pathdino info STORE --failures")
    if n["empty"]:
        console.print(
            f"[yellow]{n['empty']} slide(s) gave no tiles[/] (reasons above; --fail-on-empty makes this an error)"
        )
    damaged = [o for o in outcomes if o.n_decode_failures and o.status != "failed"]
    if damaged:
        console.print(
            f"[yellow]{sum(o.n_decode_failures for o in damaged):,} tile(s) of {len(damaged)} slide(s) "
            "could not be read[/] (source tiles that fail to decode; kept below "
            "--max-decode-failure-fraction; `pathdino info STORE` lists them)"
        )


def print_interrupted(stop: TilingInterrupted, elapsed_s: float) -> int:
    """After Ctrl-C / SIGTERM: what this run committed, what was discarded, how to resume; returns 128 + signal."""
    import signal

    if stop.outcomes:
        print_summary(stop.outcomes, elapsed_s)
    n = collections.Counter(o.status for o in stop.outcomes)
    committed = n["done"] + sum(o.status == "empty" and not o.already_complete for o in stop.outcomes)
    try:
        name = signal.Signals(stop.signum).name
    except ValueError:
        name = f"signal {stop.signum}"
    console.print(
        f"[red]interrupted ({name})[/]: {committed} slide(s) committed by this run, {stop.n_partial} "
        f"partial (discarded: they start over), {stop.n_not_started} not started; everything committed is "
        "kept: rerun the same command to resume"
    )
    return 128 + int(stop.signum)


def info_command(store_url: str, show_failures: bool, as_json: bool) -> int:
    """`pathdino info`: slides with tiles, slides that gave none, failures (full messages with --failures)."""
    from tiling.store import dumps

    store = TileStore(store_url)
    summary = summarise(store)
    entries = store.entries
    attrs_of = {sid: store.slide_attrs(sid) for sid in entries}  # format 2: no request per slide
    decode_failures = {sid: int(a.get("n_decode_failures", 0) or 0) for sid, a in attrs_of.items()}
    summary["n_decode_failures"] = sum(decode_failures.values())
    summary["n_slides_with_decode_failures"] = sum(n > 0 for n in decode_failures.values())
    if as_json:
        slides = {
            k: {
                **dataclasses.asdict(v),
                "n_decode_failures": decode_failures[k],
                "n_candidates": int(attrs_of[k].get("n_candidates", 0) or 0),
                "thumbnail_fallbacks": len(attrs_of[k].get("thumbnail_fallbacks", []) or []),
            }
            for k, v in store.entries.items()
        }
        print(dumps({**summary, "slides": slides, "failures": store.failures}))
        return 0
    out = Console()
    out.print(
        f"[bold]{escape(store.url)}[/]: pathdino tile store v{summary['format_version']}, "
        f"{summary['n_slides'] - summary['n_empty']} slide(s) with {summary['n_tiles']:,} tiles, "
        f"[yellow]{summary['n_empty']} empty[/] (no tiles), [red]{summary['n_failures']} failed[/]"
    )
    damaged = summary["n_decode_failures"] > 0  # the column only where there is something to show
    columns = (
        "slide",
        "tiles",
        *(["unreadable"] if damaged else []),
        "µm/px",
        "tile px",
        "read level",
        "reader",
        "source",
    )
    rows = []
    for sid, entry in entries.items():
        attrs = attrs_of[sid]
        rows.append(
            (
                sid,
                f"{entry.n_tiles:,}" if entry.n_tiles else "0 (empty)",
                *([f"{decode_failures[sid]:,}"] if damaged else []),
                f"{attrs.get('effective_mpp', float('nan')):.4f}",
                str(attrs.get("tile_px")),
                str(attrs.get("read_level")),
                f"{attrs.get('reader')} ({attrs.get('pixel_source')})",
                entry.source_path,
            )
        )
    if len(rows) > PLAIN_TABLE_ROWS:
        _plain_rows(columns, rows, sys.stdout)
    else:
        table = Table()
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            tiles = row[1] if not row[1].startswith("0 ") else f"[yellow]{row[1]}[/]"
            table.add_row(escape(row[0]), tiles, *(escape(v) for v in row[2:]))
        out.print(table)
    if summary["n_decode_failures"]:
        out.print(
            f"[yellow]{summary['n_decode_failures']:,} candidate tile(s) of "
            f"{summary['n_slides_with_decode_failures']} slide(s) could not be read[/] (source tiles that fail "
            "to decode: the column 'unreadable'; each slide's first error is in its provenance, decode_error)"
        )
    empty = {sid: attrs_of[sid].get("empty_reason", "") for sid, e in entries.items() if not e.n_tiles}
    if empty:
        etable = Table(title="empty slides (committed, no tiles)")
        etable.add_column("slide", overflow="fold")
        etable.add_column("why", overflow="fold")
        for sid, why in empty.items():
            etable.add_row(escape(sid), escape(why or "no tiles"))
        out.print(etable)
    if store.failures:
        _print_failures(out, store.failures, full=show_failures)
    return 0


def _print_failures(out: Console, failures: dict[str, dict[str, Any]], *, full: bool) -> None:
    if not full:
        ftable = Table(title="failures (full messages and tracebacks: --failures)")
        for col, width in (("slide", 28), ("reason", None)):
            ftable.add_column(col, no_wrap=True, overflow="ellipsis", max_width=width)
        for sid, f in sorted(failures.items()):
            ftable.add_row(escape(sid), escape(short_reason(f"{f.get('error_type', '')}: {f.get('reason', '')}")))
        out.print(ftable)
        return
    for sid, f in sorted(failures.items()):
        out.rule(escape(sid))
        out.print(
            f"{f.get('source_path', '')}\n{f.get('error_type', '')}: {f.get('reason', '')}\n",
            markup=False,
            highlight=False,
        )
        out.print(f.get("traceback", ""), markup=False, highlight=False)
        if f.get("reader_warnings"):
            out.print("reader warnings:\n  " + "\n  ".join(f["reader_warnings"]), markup=False, highlight=False)
