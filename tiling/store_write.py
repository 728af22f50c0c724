"""Writing pathdino tile stores: slides staged, written shard by shard, and committed through the index.

The layout itself is defined (and read) in `tiling.store`; docs/tile-store.md documents both.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import zarr
import zarr.storage

from tiling import staging
from tiling.fsio import atomic_write_bytes, now_iso, publish_dir
from tiling.store import (
    FORMAT_NAME, FORMAT_VERSION, TILE_ENCODINGS, StoreError, check_format, is_remote_url, local_root,
    safe_slide_id, sidecar_url, zarr_store,
)

try:  # zarr's own CRC32C dependency; without it, shards go through zarr's codec pipeline
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover
    _crc32c = None

_U32 = struct.Struct("<I")

# Both live in the sidecar folder beside the store (tiling.store.sidecar_url), outside the Zarr hierarchy. Staging
# there keeps the commit one rename: the sidecar and the store share a parent folder, hence a filesystem.
_STAGING_DIR = "staging"
_LOCK_FILE = "lock"
# Where earlier versions kept them, inside the store: stale staging folders there are still cleaned up.
_LEGACY_STAGING_DIR = ".staging"


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
        chunk = items[slot * tiles_per_chunk:(slot + 1) * tiles_per_chunk]
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


class SlideWriter:
    """Writes one slide's tiles shard by shard; nothing is visible to readers until `commit`.

    Tiles arrive already encoded (the tiler encodes in worker processes). They are buffered until a whole shard is
    ready, because writing tile by tile into a shard rewrites the shard each time (30x slower, measured).
    """

    def __init__(self, writer: "TileStoreWriter", slide_id: str, tile_px: int, encoding: str,
                 tiles_per_shard: int, tiles_per_chunk: int, tile_attrs: dict[str, Any], max_tiles: int = 0):
        if encoding not in TILE_ENCODINGS:
            raise ValueError(f"unknown tile encoding {encoding!r}; expected one of {TILE_ENCODINGS}")
        if tiles_per_shard % tiles_per_chunk:
            raise ValueError(f"tiles_per_shard ({tiles_per_shard}) must be a multiple of tiles_per_chunk "
                             f"({tiles_per_chunk})")
        self.slide_id = slide_id
        self._writer = writer
        self._shard = tiles_per_shard
        self._group, self._final_key, self._lease = writer._staging_group(slide_id)
        from zarr.core.dtype import VariableLengthBytes

        self._tiles = self._group.create_array(
            "tiles", shape=(0,), chunks=(tiles_per_chunk,), shards=(tiles_per_shard,), dtype=VariableLengthBytes(),
            compressors=None, fill_value=b"")
        self._tiles.attrs.update({"encoding": encoding, "tile_px": int(tile_px), "channels": 3, **tile_attrs})
        self._chunk = tiles_per_chunk
        # Local stores: whole shards are written as files by `shard_file_bytes` (the same bytes zarr writes, tested),
        # because zarr's sharding pipeline cost ~11 ms of CPU per 256-tile shard, 6-8% of tiling a 20x slide.
        self._shard_dir = None if writer.remote or _crc32c is None else Path(self._final_key) / "tiles" / "c"
        # The array is sized once for at most `max_tiles` (resizing rewrites its metadata: ~1 ms per shard) and cut
        # to the tiles written at commit; staged, so nobody sees the interim size.
        self._capacity = max(int(max_tiles), 0)
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
        start = self.n_written
        if start + n > self._tiles.shape[0]:
            self._tiles.resize((max(start + n, self._capacity),))
        if self._shard_dir is not None and start % self._shard == 0:
            self._shard_dir.mkdir(parents=True, exist_ok=True)
            data = shard_file_bytes(items, tiles_per_chunk=self._chunk, tiles_per_shard=self._shard)
            # A staged slide is invisible until commit, and a killed run's staging folder is discarded: no temp file.
            (self._shard_dir / str(start // self._shard)).write_bytes(data)
        else:
            chunk = np.empty(n, dtype=object)
            chunk[:] = items
            self._tiles[start:start + n] = chunk
        self.n_written += n

    def commit(self, provenance: dict[str, Any]) -> int:
        """Write the last partial shard, coordinates and provenance, then make the slide visible. Returns N."""
        if self._buffer:
            self._flush(len(self._buffer))
        coords = np.concatenate(self._coords) if self._coords else np.zeros((0, 2), np.int64)
        fractions = np.concatenate(self._fractions) if self._fractions else np.zeros((0,), np.float32)
        n = self.n_written
        if self._tiles.shape[0] != n:
            self._tiles.resize((n,))
        rows = max(min(n, 1 << 16), 1)
        self._group.create_array("coords", data=coords, chunks=(rows, 2), compressors=None)
        self._group.create_array("tissue_fraction", data=fractions, chunks=(rows,), compressors=None)
        self._group.attrs["pathdino"] = {**provenance, "n_tiles": n, "complete": True}
        self._check_staged(n)
        self._writer._publish(self.slide_id, self._final_key, n, provenance)
        if self._lease is not None:
            staging.release_lease(self._lease)
        return n

    def _check_staged(self, n: int) -> None:
        """Refuse to publish a staging folder this writer no longer owns or that lost files: another run reclaimed
        it (this one hung past the lease) and a later write may have recreated part of it."""
        if self._lease is None:
            return
        problem = "" if staging.lease_held(self._lease) else "its lease was reclaimed by another run"
        if not problem and self._shard_dir is not None:
            n_shards = -(-n // self._shard)
            found = len(list(self._shard_dir.glob("*"))) if self._shard_dir.exists() else 0
            if found != n_shards:
                problem = f"{found} of its {n_shards} shard file(s) are left"
        if not problem and not all((Path(self._final_key) / name / "zarr.json").exists()
                                   for name in ("tiles", "coords", "tissue_fraction")):
            problem = "arrays are missing"
        if problem:
            raise StoreError(f"slide {self.slide_id!r}: staging folder {self._final_key} cannot be committed: "
                             f"{problem} (this run stalled for over {staging.LEASE_S:.0f} s, or another run deleted "
                             "it); nothing was published. Rerun the same command to tile the slide again")

    def abort(self) -> None:
        """Drop everything written for this slide (used when the slide fails mid-way)."""
        self._writer._discard_staging(self._final_key)
        if self._lease is not None:
            staging.release_lease(self._lease)


class TileStoreWriter:
    """Creates or opens a tile store for writing; safe for several processes (or machines) on disjoint slides.

    Local stores stage each slide under `<store>.pathdino/staging/` (named after its host and pid, with a lease:
    tiling/staging.py) and move it into `slides/` with one rename; commits and index updates are serialised with a
    lock file. On object stores (fsspec URLs) a slide is written in place and becomes visible
    only through the index entry written last.
    """

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.remote = is_remote_url(self.url)
        self.sidecar = sidecar_url(self.url)
        if not self.remote:
            try:
                local_root(self.url).mkdir(parents=True, exist_ok=True)
                Path(self.sidecar).mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the tile store {self.url}: {exc.strerror or exc} "
                                 f"({exc.filename or self.url}); choose a folder you can write to") from None
        with self._index_lock():
            store = zarr_store(self.url, read_only=False)
            try:
                root = zarr.open_group(store=store, mode="r")
                check_format(dict(root.attrs.get("pathdino", {})), self.url)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                root = zarr.open_group(store=store, mode="a")
                root.attrs["pathdino"] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                          "created": now_iso(), "slides": {}, "failures": {}}
                root.require_group("slides")

    # -- index ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        if self.remote:
            yield
            return
        with open(Path(self.sidecar) / _LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _root(self) -> zarr.Group:
        # Re-open every time: another process may have changed the index since we last looked.
        return zarr.open_group(store=zarr_store(self.url, read_only=False), mode="r+")

    def _update_meta(self, update: Callable[[dict[str, Any]], None], *, locked: bool = False) -> None:
        with contextlib.nullcontext() if locked else self._index_lock():
            root = self._root()
            meta = dict(root.attrs["pathdino"])
            meta["slides"] = dict(meta.get("slides", {}))
            meta["failures"] = dict(meta.get("failures", {}))
            update(meta)
            root.attrs["pathdino"] = meta

    def read_meta(self) -> dict[str, Any]:
        return dict(self._root().attrs["pathdino"])

    def completed_provenance(self, slide_id: str) -> dict[str, Any] | None:
        """The provenance of `slide_id` if it is complete in this store, else None."""
        if slide_id not in self.read_meta().get("slides", {}):
            return None
        return dict(self._root()[f"slides/{slide_id}"].attrs.get("pathdino", {}))

    def record_failure(self, slide_id: str, failure: dict[str, Any]) -> None:
        """Record why `slide_id` failed, and forget any earlier committed version of it: a slide that was tried
        again (its file or the parameters changed, or --overwrite) and failed must not keep serving tiles of a
        file or parameters that are no longer the ones asked for."""
        dropped: list[bool] = []

        def update(meta: dict[str, Any]) -> None:
            dropped.append(meta["slides"].pop(slide_id, None) is not None)
            meta["failures"][slide_id] = {**failure, "time": now_iso(),
                                          **({"replaced_committed": True} if dropped[0] else {})}

        with self._index_lock():  # as in _publish: never between another run's rename and its index entry
            self._update_meta(update, locked=True)
            if dropped[0]:
                self._delete_key(f"slides/{slide_id}")

    def remove_slide(self, slide_id: str) -> None:
        """Forget a slide (index first, so readers stop seeing it before its data goes)."""
        with self._index_lock():
            self._update_meta(lambda m: m["slides"].pop(slide_id, None), locked=True)
            self._delete_key(f"slides/{slide_id}")

    # -- slides --------------------------------------------------------------------------------------------------

    def begin_slide(self, slide_id: str, tile_px: int, *, encoding: str = "jpeg", tiles_per_shard: int = 256,
                    tiles_per_chunk: int = 16, tile_attrs: dict[str, Any] | None = None,
                    max_tiles: int = 0) -> SlideWriter:
        """Stage a slide; `max_tiles` (optional, e.g. the number of candidate tiles) lets the writer size its array
        once instead of once per shard."""
        if slide_id != safe_slide_id(slide_id):
            raise StoreError(f"slide id {slide_id!r} is not a safe group name; pass it through safe_slide_id()")
        self.remove_slide(slide_id)
        return SlideWriter(self, slide_id, tile_px, encoding, tiles_per_shard, tiles_per_chunk, tile_attrs or {},
                           max_tiles)

    def _staging_group(self, slide_id: str) -> tuple[zarr.Group, str, Path | None]:
        """(the staged group, its folder or key, its lease file): see tiling/staging.py for names and leases."""
        if self.remote:
            group = zarr.open_group(store=zarr_store(self.url, read_only=False), mode="r+")
            return group.create_group(f"slides/{slide_id}", overwrite=True), slide_id, None
        folder = Path(self.sidecar) / _STAGING_DIR / staging.staging_name(slide_id)
        folder.parent.mkdir(parents=True, exist_ok=True)
        lease = staging.write_lease(folder, slide_id)  # before the folder: a folder never exists without its lease
        folder.mkdir()
        return zarr.open_group(store=zarr.storage.LocalStore(folder), mode="w"), str(folder), lease

    def _publish(self, slide_id: str, staged: str, n_tiles: int, provenance: dict[str, Any]) -> None:
        def update(meta: dict[str, Any]) -> None:
            meta["slides"][slide_id] = {"n_tiles": int(n_tiles), "source_path": str(provenance.get("source_path", "")),
                                        "fingerprint": str(provenance.get("source_fingerprint", "")),
                                        "committed": now_iso()}
            meta["failures"].pop(slide_id, None)

        with self._index_lock():  # the rename too: two runs committing the same slide take turns, never interleave
            if not self.remote:
                # No fsync: a slide's shards are many files, and an unfinished commit is redone on resume anyway.
                publish_dir(staged, local_root(self.url) / "slides" / slide_id, fsync=False)
            self._update_meta(update, locked=True)

    def _discard_staging(self, staged: str) -> None:
        if self.remote:
            self._delete_key(f"slides/{staged}")
        else:
            shutil.rmtree(staged, ignore_errors=True)

    def _delete_key(self, key: str) -> None:
        if self.remote:
            import fsspec

            fs, path = fsspec.core.url_to_fs(f"{self.url.rstrip('/')}/{key}")
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(local_root(self.url) / key, ignore_errors=True)

    def clean_stale_staging(self) -> list[str]:
        """Remove staging folders (and leases) whose writer is provably gone: on this host with its process dead,
        or with a lease not renewed for `staging.LEASE_S` (tiling/staging.py). Returns the names removed.

        Staging folders of live writers, on this host or any other sharing the store, are never touched.
        """
        if self.remote:
            return []
        removed = []
        for staging_root in (Path(self.sidecar) / _STAGING_DIR, local_root(self.url) / _LEGACY_STAGING_DIR):
            if not staging_root.is_dir():
                continue
            now = staging.staging_clock(staging_root)
            for path in sorted(staging_root.iterdir()):
                if not path.exists():
                    continue  # a lease removed with its folder just before
                if path.name.endswith(staging.LEASE_SUFFIX) and path.with_name(
                        path.name.removesuffix(staging.LEASE_SUFFIX)).exists():
                    continue  # a folder's lease goes with its folder, below
                if staging.is_reclaimable(path, now=now):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    lease = path.with_name(path.name.removesuffix(staging.LEASE_SUFFIX) + staging.LEASE_SUFFIX)
                    lease.unlink(missing_ok=True)
                    removed.append(path.name)
        with contextlib.suppress(OSError):  # gone from earlier versions' stores once nothing is staged there
            (local_root(self.url) / _LEGACY_STAGING_DIR).rmdir()
        return removed

    def write_file(self, key: str, data: bytes) -> str:
        """Write a non-Zarr file (QC image) into the sidecar folder atomically; returns its path or URL."""
        if self.remote:
            import fsspec

            url = f"{self.sidecar}/{key}"
            with fsspec.open(url, "wb") as fh:
                fh.write(data)
            return url
        path = Path(self.sidecar) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(atomic_write_bytes(path, data))
