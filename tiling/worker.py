"""Work done in the tiler's worker processes: plan a slide, and turn blocks of grid cells into encoded tiles.

Both functions take and return plain picklable values; slides are opened inside the worker (never inherited
from the parent) and a few recently used readers are kept open per worker.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiling.brightfield import check_metadata, check_pixels, check_properties
from tiling.config import TilingConfig
from tiling.geometry import (
    VIRTUAL_REDUCTIONS,
    TileGeometry,
    grid_shape,
    plan_geometry,
    tile_level0_xy,
    too_small_reason,
)
from tiling.inputs import SlideInput
from tiling.mpp import resolve_mpp
from tiling.pixel_qc import check_tiles
from tiling.reader_warnings import collect_library_warnings, summarise_warnings
from tiling.readers import check_slide_file, open_slide
from tiling.regions import BlockReader, FastLevelReader
from tiling.store import encode_tile
from tiling.thumbnail import read_thumbnail
from tiling.tissue import tissue_fractions, tissue_mask

_OPEN_READERS_PER_WORKER = 2


@dataclass
class SlidePlan:
    """Everything the parent needs to schedule a slide's blocks and to describe it afterwards."""

    slide: SlideInput
    geometry: TileGeometry
    backend: str
    backend_version: str
    slide_mpp_source: str
    level0_size: tuple[int, int]
    grid_rows: int
    grid_cols: int
    thumbnail: np.ndarray
    thumbnail_mpp: float
    mask: np.ndarray
    rows: np.ndarray  # candidate cells (tissue fraction >= threshold), in block-major order
    cols: np.ndarray
    level0_xy: np.ndarray
    tissue_fraction: np.ndarray
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (start, stop) into the candidate arrays
    fingerprint: str = ""
    size_bytes: int = 0
    too_small: str = ""  # why no tile fits the slide ("" when one does)
    thumbnail_notes: list[str] = field(default_factory=list)  # regions of the thumbnail read by a fallback
    reader_warnings: list[str] = field(default_factory=list)  # what the imaging libraries warned about


@dataclass
class BlockResult:
    """One block's outcome: kept candidate positions (into the block's slice) and their encoded tiles."""

    kept: np.ndarray
    encoded: list[bytes]
    rejected: dict[str, list[int]]  # QC reason -> candidate positions
    n_decode_failures: int
    pixel_source: str
    fast_path_reason: str = ""
    decoder: str = ""
    decode_error: str = ""  # the first decode error of the block, for the provenance
    reader_warnings: list[str] = field(default_factory=list)


def fingerprint(path: Path) -> tuple[str, int]:
    """A cheap content fingerprint: SHA-256 of the size and the first, middle and last MiB of the file.

    Hashing whole multi-GB slides on every resume would cost more than tiling some of them; three MiB samples change
    whenever a slide is re-scanned or re-encoded. For folders (DICOM series) the file names and sizes are hashed.
    """
    h = hashlib.sha256()
    if path.is_dir():
        total = 0
        for p in sorted(path.rglob("*")):
            if p.is_file():
                size = p.stat().st_size
                total += size
                h.update(f"{p.relative_to(path)}:{size};".encode())
        return f"sha256-listing:{h.hexdigest()[:32]}", total
    if not path.is_file():  # a FIFO would block the read forever; planning says what the file is
        raise OSError(f"{path} is not a regular file")
    size = path.stat().st_size
    h.update(str(size).encode())
    mib = 1 << 20
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - mib // 2), max(0, size - mib)}):
            fh.seek(offset)
            h.update(fh.read(mib))
    return f"sha256-3MiB:{h.hexdigest()[:32]}", size


def _block_order(rows: np.ndarray, cols: np.ndarray, block_tiles: int) -> np.ndarray:
    """Sort cells block by block (row-major over blocks), then row-major inside a block."""
    return np.lexsort((cols, rows, cols // block_tiles, rows // block_tiles))


def plan_slide(slide: SlideInput, cfg: TilingConfig, *, source: tuple[str, int] | None = None) -> SlidePlan:
    """Open a slide, resolve its mpp and geometry, find tissue, and list the candidate tiles in blocks.

    `source` is the slide file's (fingerprint, size) when the caller already computed it (the runner does, to
    decide what to resume); fluorescence and multiplex slides raise NotBrightfieldError. Warnings of the imaging
    libraries go into the plan (or, when planning fails, onto the exception as `reader_warnings`), not to stderr.
    """
    with collect_library_warnings() as messages:
        try:
            plan = _plan_slide(slide, cfg, source)
        except Exception as exc:
            exc.reader_warnings = summarise_warnings(messages)  # type: ignore[attr-defined]
            raise
    plan.reader_warnings = summarise_warnings(messages)
    return plan


def _plan_slide(slide: SlideInput, cfg: TilingConfig, source: tuple[str, int] | None) -> SlidePlan:
    check_slide_file(slide.path)
    fp, size = source if source is not None else fingerprint(slide.path)
    check_metadata(slide.path)
    reader = open_slide(slide.path, cfg.backend, check_file=False)
    try:
        check_properties(slide.path, reader.properties)
        mpp = resolve_mpp(reader, slide.mpp_override)
        geometry = plan_geometry(
            reader.level_dimensions,
            reader.level_downsamples,
            slide_mpp=mpp.mpp,
            target_mpp=cfg.target_mpp,
            tile_px=cfg.tile_px,
            overlap_px=cfg.overlap_px,
            tolerance=cfg.mpp_tolerance,
            virtual_reductions=VIRTUAL_REDUCTIONS if cfg.virtual_levels else (),
        )
        level0_size = tuple(int(v) for v in reader.level_dimensions[0])
        n_rows, n_cols = grid_shape(geometry, level0_size)
        # The thumbnail level decoded straight from the TIFF where the fast path applies (~4x less CPU than OpenSlide)
        thumbnail_reader = FastLevelReader(reader) if cfg.tiff_fast_path else reader
        notes: list[str] = []
        try:
            thumbnail, thumbnail_mpp = read_thumbnail(
                thumbnail_reader, mpp.mpp, cfg.tissue.thumbnail_mpp, on_unreadable=notes.append
            )
        finally:
            if thumbnail_reader is not reader:
                thumbnail_reader.close()
        check_pixels(slide.path, thumbnail)
        mask = tissue_mask(thumbnail, cfg.tissue, thumbnail_mpp)
        rows, cols = np.divmod(np.arange(n_rows * n_cols, dtype=np.int64), max(n_cols, 1))
        xy = tile_level0_xy(geometry, rows, cols)
        fractions = tissue_fractions(mask, thumbnail_mpp, xy, geometry.level0_tile_px, mpp.mpp)
        keep = fractions >= cfg.tissue.min_tissue_fraction
        rows, cols, xy, fractions = rows[keep], cols[keep], xy[keep], fractions[keep]
        order = _block_order(rows, cols, cfg.block_tiles)
        rows, cols, xy, fractions = rows[order], cols[order], xy[order], fractions[order]
        block_ids = (rows // cfg.block_tiles) * (n_cols // cfg.block_tiles + 1) + cols // cfg.block_tiles
        starts = np.flatnonzero(np.r_[True, block_ids[1:] != block_ids[:-1]]) if len(rows) else np.zeros(0, int)
        stops = np.r_[starts[1:], len(rows)]
        return SlidePlan(
            slide=slide,
            geometry=geometry,
            backend=reader.backend,
            backend_version=reader.backend_version,
            slide_mpp_source=mpp.source,
            level0_size=level0_size,
            grid_rows=n_rows,
            grid_cols=n_cols,
            thumbnail=thumbnail,
            thumbnail_mpp=thumbnail_mpp,
            mask=mask,
            rows=rows,
            cols=cols,
            level0_xy=xy,
            tissue_fraction=fractions,
            blocks=list(zip(starts.tolist(), stops.tolist())),
            fingerprint=fp,
            size_bytes=size,
            too_small=too_small_reason(geometry, level0_size),
            thumbnail_notes=summarise_warnings(notes),
        )
    finally:
        reader.close()


_readers: "collections.OrderedDict[tuple, BlockReader]" = collections.OrderedDict()


def _block_reader(path: Path, backend: str, geometry: TileGeometry, fast_path: bool) -> BlockReader:
    key = (str(path), backend, geometry, fast_path, os.getpid())
    if key in _readers:
        _readers.move_to_end(key)
        return _readers[key]
    while len(_readers) >= _OPEN_READERS_PER_WORKER:
        _, old = _readers.popitem(last=False)
        old.close()
        old.reader.close()  # BlockReader does not own the slide handle
    reader = BlockReader(open_slide(path, backend, check_file=False), geometry, use_tiff_fast_path=fast_path)
    _readers[key] = reader
    return reader


def close_readers() -> None:
    while _readers:
        block_reader = _readers.popitem()[1]
        block_reader.close()
        block_reader.reader.close()


_tile_stack: np.ndarray | None = None  # this worker's reused buffer of decoded tiles (one block's worth)


def _stack(n: int, tile_px: int) -> np.ndarray:
    """A (n, tile_px, tile_px, 3) uint8 view of this worker's tile buffer, grown when needed. Reusing it spares
    ~10 MB of fresh pages (page faults) per block; tile_block returns encoded bytes, never these pixels."""
    global _tile_stack
    if _tile_stack is None or _tile_stack.shape[1] != tile_px or len(_tile_stack) < n:
        _tile_stack = np.empty((max(n, 1), tile_px, tile_px, 3), np.uint8)
    return _tile_stack[:n]


def tile_block(
    path: Path, *, backend: str, geometry: TileGeometry, rows: np.ndarray, cols: np.ndarray, cfg: TilingConfig
) -> BlockResult:
    """Read the pixels under one block's candidate cells, cut the tiles, check their pixels, encode them.

    Only source tiles under candidates are decoded, each once (the reader caches decoded source tiles), and each
    tile's pixels are copied once, into a reused buffer (`BlockReader.read_tiles`). When a read fails (a corrupt
    source tile), each tile is read on its own so only the tiles that really fail are lost; they are counted
    (`n_decode_failures`, with the first error in `decode_error`), and the runner fails the slide when too many are.
    """
    with collect_library_warnings() as messages:
        result = _tile_block(path, backend, geometry, rows=rows, cols=cols, cfg=cfg)
    result.reader_warnings = summarise_warnings(messages)
    return result


def _tile_block(
    path: Path, backend: str, geometry: TileGeometry, *, rows: np.ndarray, cols: np.ndarray, cfg: TilingConfig
) -> BlockResult:
    reader = _block_reader(path, backend, geometry, cfg.tiff_fast_path)
    failures, first_error = 0, ""
    ok = np.ones(len(rows), dtype=bool)
    tiles = _stack(len(rows), geometry.tile_px)
    try:
        reader.read_tiles(rows, cols, out=tiles)
    except Exception:  # noqa: BLE001 - any decode error: fall back to per-tile reads
        tiles[...] = 0
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            try:
                tiles[i] = reader.read_tile(r, c)
            except Exception as exc:  # noqa: BLE001
                ok[i] = False
                failures += 1
                first_error = first_error or f"{type(exc).__name__}: {str(exc)[:300]}"
    keep_qc, reasons = check_tiles(tiles, cfg.pixel_qc)
    keep = ok & np.asarray(keep_qc, dtype=bool)
    rejected: dict[str, list[int]] = {}
    for i, reason in enumerate(reasons):
        if ok[i] and reason is not None:
            rejected.setdefault(reason, []).append(i)
    kept = np.flatnonzero(keep)
    encoded = [
        encode_tile(tiles[i], cfg.encoding, jpeg_quality=cfg.jpeg_quality, jpeg_subsampling=cfg.jpeg_subsampling)
        for i in kept
    ]
    return BlockResult(
        kept=kept,
        encoded=encoded,
        rejected=rejected,
        n_decode_failures=failures,
        pixel_source=reader.pixel_source,
        fast_path_reason=reader.fast_path_reason or "",
        decoder=reader.decoder,
        decode_error=first_error,
    )
