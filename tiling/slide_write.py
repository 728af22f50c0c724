"""Writing one slide of a tile store: its tiles shard by shard into a staging folder, then its coordinates, its
arrays' metadata and the commit that publishes it (through the store's `TileStoreWriter`).

The shard files are the bytes zarr 3 writes (`shard_file_bytes`, checked against zarr in tests/test_store.py);
docs/tile-store.md documents the layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tiling import staging, store_index
from tiling.store import TILE_ENCODINGS, StoreError

import google_crc32c as _crc32c  # zarr's own CRC32C dependency

_U32 = struct.Struct("<I")


def shard_file_bytes(items: list[bytes], *, tiles_per_chunk: int, tiles_per_shard: int) -> bytes:
    """One shard file of the tile array as zarr 3 writes it: `items` (<= tiles_per_shard) from the shard's start.

    Layout (Zarr v3 `sharding_indexed`, index at the end): the shard's chunks back to back, each a `vlen-bytes`
    chunk (uint32 item count, then per item a uint32 length and its bytes, all little-endian; a partial last chunk is
    padded with the fill value b""); then per chunk slot a (uint64 offset, uint64 nbytes) pair, 2**64-1 twice for
    chunks with no items; then the CRC32C of that index as uint32. `tests/test_store.py` checks it against zarr.
    """
    if len(items) > tiles_per_shard:
        raise ValueError(f"{len(items)} items do not fit a shard of {tiles_per_shard}")
    n_slots = tiles_per_shard // tiles_per_chunk
    index = np.full((n_slots, 2), np.iinfo(np.uint64).max, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for slot in range(n_slots):
        chunk = items[slot * tiles_per_chunk : (slot + 1) * tiles_per_chunk]
        if not any(chunk):  # zarr stores no chunk that holds only the fill value
            continue
        chunk = chunk + [b""] * (tiles_per_chunk - len(chunk))
        start = len(parts)
        parts.append(_U32.pack(tiles_per_chunk))
        for item in chunk:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
        nbytes = sum(len(p) for p in parts[start:])
        index[slot] = offset, nbytes
        offset += nbytes
    index_bytes = index.tobytes()
    return b"".join([*parts, index_bytes, _U32.pack(_crc32c.value(index_bytes))])


class StoreStaging(Protocol):
    """What a `SlideWriter` needs of its store's writer (`tiling.store_write.TileStoreWriter`, which creates it in
    `begin_slide`): a staging area for the slide, then its publication through the index, or its removal. Typed
    here so that this module does not import the store writer back."""

    def _staging_area(self, slide_id: str) -> tuple[store_index.Files, str, Path | None]: ...

    def _publish(self, slide_id: str, staged: str, nodes: dict[str, dict[str, Any]]) -> None: ...

    def _discard_staging(self, staged: str) -> None: ...


class SlideWriter:
    """Writes one slide's tiles shard by shard; nothing is visible to readers until `commit`.

    Tiles arrive already encoded (the tiler encodes in worker processes). They are buffered until a whole shard is
    ready and written as one file (`shard_file_bytes`: the bytes zarr writes, tested), because writing tile by tile
    into a shard rewrites the shard each time (30x slower, measured) and zarr's sharding pipeline cost ~11 ms of CPU
    per 256-tile shard. The arrays' metadata (`store_index.slide_nodes`) and the coordinate chunks are written at
    commit, also as files: a slide costs no zarr call at all (nine of them cost ~35 ms per slide on a busy 2-core
    machine, more than a small slide's tiles).
    """

    def __init__(
        self,
        writer: StoreStaging,
        slide_id: str,
        *,
        tile_px: int,
        encoding: str,
        tiles_per_shard: int,
        tiles_per_chunk: int,
        tile_attrs: dict[str, Any],
    ):
        if encoding not in TILE_ENCODINGS:
            raise ValueError(f"unknown tile encoding {encoding!r}; expected one of {TILE_ENCODINGS}")
        if tiles_per_shard % tiles_per_chunk:
            raise ValueError(
                f"tiles_per_shard ({tiles_per_shard}) must be a multiple of tiles_per_chunk ({tiles_per_chunk})"
            )
        self.slide_id = slide_id
        self._writer = writer
        self._shard = tiles_per_shard
        self._chunk = tiles_per_chunk
        self._files, self._final_key, self._lease = writer._staging_area(slide_id)
        self._tile_attrs = {"encoding": encoding, "tile_px": int(tile_px), "channels": 3, **tile_attrs}
        self._buffer: list[bytes] = []
        self._coords: list[np.ndarray] = []
        self._fractions: list[np.ndarray] = []
        self.n_written = 0

    def add(self, encoded_tiles: list[bytes], level0_xy: np.ndarray, tissue_fraction: np.ndarray) -> None:
        """Append tiles (in their final order) with their level-0 coordinates and tissue fractions."""
        if not (len(encoded_tiles) == len(level0_xy) == len(tissue_fraction)):
            raise ValueError("encoded_tiles, level0_xy and tissue_fraction must have the same length")
        self._buffer.extend(encoded_tiles)
        self._coords.append(np.asarray(level0_xy, dtype=np.int64).reshape(-1, 2))
        self._fractions.append(np.asarray(tissue_fraction, dtype=np.float32).reshape(-1))
        while len(self._buffer) >= self._shard:
            self._flush(self._shard)

    def _flush(self, n: int) -> None:
        items = self._buffer[:n]
        del self._buffer[:n]
        data = shard_file_bytes(items, tiles_per_chunk=self._chunk, tiles_per_shard=self._shard)
        # Always a shard's start (only the last flush is partial). A staged slide is invisible until commit, and a
        # killed run's staging folder is discarded: no temporary file.
        self._files.write(f"tiles/c/{self.n_written // self._shard}", data, atomic=False)
        self.n_written += n

    def commit(self, provenance: dict[str, Any]) -> int:
        """Write the last partial shard, coordinates and provenance, then make the slide visible. Returns N."""
        if self._buffer:
            self._flush(len(self._buffer))
        coords = np.concatenate(self._coords) if self._coords else np.zeros((0, 2), np.int64)
        fractions = np.concatenate(self._fractions) if self._fractions else np.zeros((0,), np.float32)
        n = self.n_written
        rows = max(min(n, 1 << 16), 1)
        for i, start in enumerate(range(0, n, rows)):  # regular chunks, the last padded with the fill value 0
            chunk_xy = np.zeros((rows, 2), "<i8")
            chunk_xy[: min(rows, n - start)] = coords[start : start + rows]
            chunk_f = np.zeros(rows, "<f4")
            chunk_f[: min(rows, n - start)] = fractions[start : start + rows]
            self._files.write(f"coords/c/{i}/0", chunk_xy.tobytes(), atomic=False)
            self._files.write(f"tissue_fraction/c/{i}", chunk_f.tobytes(), atomic=False)
        nodes = store_index.slide_nodes(
            n_tiles=n,
            provenance={**provenance, "n_tiles": n, "complete": True},
            tile_attrs=self._tile_attrs,
            tiles_per_shard=self._shard,
            tiles_per_chunk=self._chunk,
            coord_rows=rows,
        )
        for name in (*store_index.SLIDE_ARRAYS, ""):  # the group last: a folder with it has everything
            self._files.write(
                f"{name}/zarr.json" if name else "zarr.json", json.dumps(nodes[name]).encode(), atomic=False
            )
        self._check_staged(n)
        self._writer._publish(self.slide_id, self._final_key, nodes)
        if self._lease is not None:
            staging.release_lease(self._lease)
        return n

    def _check_staged(self, n: int) -> None:
        """Refuse to publish a staging folder this writer no longer owns or that lost files: another run reclaimed
        it (this one hung past the lease) and a later write may have recreated part of it."""
        if self._lease is None:
            return
        problem = "" if staging.lease_held(self._lease) else "its lease was reclaimed by another run"
        if not problem:
            n_shards = -(-n // self._shard)
            found = len(self._files.names("tiles/c"))
            if found != n_shards:
                problem = f"{found} of its {n_shards} shard file(s) are left"
        if not problem and not all(
            (Path(self._final_key) / name / "zarr.json").exists() for name in ("tiles", "coords", "tissue_fraction")
        ):
            problem = "arrays are missing"
        if problem:
            raise StoreError(
                f"slide {self.slide_id!r}: staging folder {self._final_key} cannot be committed: "
                f"{problem} (this run stalled for over {staging.LEASE_S:.0f} s, or another run deleted "
                "it); nothing was published. Rerun the same command to tile the slide again"
            )

    def abort(self) -> None:
        """Drop everything written for this slide (used when the slide fails mid-way)."""
        self._writer._discard_staging(self._final_key)
        if self._lease is not None:
            staging.release_lease(self._lease)
