"""Writing pathdino tile stores: slides staged, written shard by shard, and committed through the index.

The layout itself is defined (and read) in `tiling.store`; docs/tile-store.md documents both.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from tiling import staging, store_index
from tiling.fsio import atomic_write_bytes, now_iso, publish_dir
from tiling.slide_write import SlideWriter
from tiling.slide_write import shard_file_bytes as shard_file_bytes  # its home until 2026-12-07: still importable
from tiling.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    StoreError,
    is_remote_url,
    local_root,
    read_index,
    safe_slide_id,
    sidecar_url,
)

# Both live in the sidecar folder beside the store (tiling.store.sidecar_url), outside the Zarr hierarchy. Staging
# there keeps the commit one rename: the sidecar and the store share a parent folder, hence a filesystem.
_STAGING_DIR = "staging"
_LOCK_FILE = "lock"
# The last fold (folded_seq, slides folded, when): lets a commit decide whether to fold without reading the index.
_FOLD_MARK = "index-fold.json"
# Where earlier versions kept them, inside the store: stale staging folders there are still cleaned up.
_LEGACY_STAGING_DIR = ".staging"


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
                raise StoreError(
                    f"cannot create the tile store {self.url}: {exc.strerror or exc} "
                    f"({exc.filename or self.url}); choose a folder you can write to"
                ) from None
        self._files = store_index.Files(self.url, remote=self.remote)
        self._side = store_index.Files(self.sidecar, remote=self.remote)
        self._snapshot: store_index.IndexState | None = None
        with self._index_lock():
            if self._files.read("zarr.json") is None:
                self._files.write(
                    f"{store_index.SLIDES}/zarr.json",
                    json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}).encode(),
                )
                attrs = {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "created": now_iso(),
                    "failures": {},
                    "folded_seq": 0,
                }
                self._write_root(store_index.IndexState(attrs=attrs, slides={}))
            else:
                meta, state = read_index(self.url)
                if state is None:
                    self._migrate_v1(meta)

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

    def _write_root(self, state: store_index.IndexState) -> None:
        """Write the root document (every slide's metadata inline) and the fold marker; caller holds the lock."""
        state.attrs["folded_seq"] = state.last_seq
        self._files.write("zarr.json", store_index.root_document(state.attrs, state.slides))
        self._write_fold_mark(state.last_seq, len(state.slides))

    def _write_fold_mark(self, folded_seq: int, n_slides: int) -> None:
        self._side.write(
            _FOLD_MARK, json.dumps({"folded_seq": folded_seq, "n_slides": n_slides, "unix_time": time.time()}).encode()
        )

    def _migrate_v1(self, meta: dict[str, Any]) -> None:
        """Turn a format-1 store into format 2 (once, under the lock): read each listed slide's metadata."""
        slides = {sid: self._read_nodes(f"{store_index.SLIDES}/{sid}") for sid in meta.get("slides", {})}
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": meta.get("created", now_iso()),
            "failures": dict(meta.get("failures", {})),
            "folded_seq": 0,
            "migrated_from_version": 1,
        }
        self._write_root(store_index.IndexState(attrs=attrs, slides=slides))

    def _read_nodes(self, prefix: str, files: store_index.Files | None = None) -> dict[str, dict[str, Any]]:
        """The metadata of a slide's group and arrays, from their zarr.json files under `prefix`."""
        files = files or self._files
        nodes = {}
        for name in ("", *store_index.SLIDE_ARRAYS):
            raw = files.read(f"{prefix}/{name}/zarr.json" if name else f"{prefix}/zarr.json")
            if raw is None:
                raise StoreError(
                    f"{self.url}: {prefix}/{name or '.'} has no zarr.json; the slide is incomplete. "
                    "Rerun `pathdino tile` on it"
                )
            nodes[name] = json.loads(raw)
        return nodes

    def _fold_mark(self) -> dict[str, Any]:
        raw = self._side.read(_FOLD_MARK)
        if raw is not None:
            return json.loads(raw)
        _, state = read_index(self.url)  # no mark (a store copied without its sidecar): read the root once
        self._write_fold_mark(int(state.attrs.get("folded_seq", 0)), len(state.folded_ids))
        return json.loads(self._side.read(_FOLD_MARK))

    def _append(self, record: dict[str, Any], *, fold: bool = False) -> None:
        """Append a journal record (caller holds the lock) and fold the journal when it is due (or `fold`)."""
        mark = self._fold_mark()
        seqs = [q for q in store_index.journal_seqs(self._side) if q > int(mark["folded_seq"])]
        seq = max([int(mark["folded_seq"]), *seqs]) + 1
        now = time.time()
        record = {"seq": seq, **record, "unix_time": now}
        self._side.write(
            f"{store_index.JOURNAL_DIR}/{store_index.record_name(seq)}",
            json.dumps(record, separators=(",", ":")).encode(),
        )
        if self._snapshot is not None:
            self._snapshot.apply(record)
        due = len(seqs) + 1 >= max(1.0, store_index.FOLD_FRACTION * mark["n_slides"])
        if fold or due or now - self._oldest_record_time(seqs, now) >= store_index.FOLD_MAX_AGE_S:
            self._fold()

    def _oldest_record_time(self, seqs: list[int], now: float) -> float:
        if not seqs:
            return now
        raw = self._side.read(f"{store_index.JOURNAL_DIR}/{store_index.record_name(seqs[0])}")
        return float(json.loads(raw).get("unix_time", now)) if raw else now

    def _fold(self) -> None:
        """Fold the journal into the root document, then delete the records folded (caller holds the lock).

        The document's lines are edited (`store_index.fold_document`), not parsed and written whole: at 10,000
        slides that is a 33 MB split and join instead of ~10 s of JSON on a busy 2-core machine."""
        raw = self._files.read("zarr.json")
        head = store_index.document_attrs(raw) if raw is not None else None
        folded = None
        if head is not None:
            start = int(head.get("folded_seq", 0))
            records = [
                json.loads(self._side.read(f"{store_index.JOURNAL_DIR}/{store_index.record_name(q)}"))
                for q in store_index.journal_seqs(self._side)
                if q > start
            ]
            folded = store_index.fold_document(raw, records)
        if folded is None:  # not one node per line (another tool rewrote it): parse it whole, once
            _, state = read_index(self.url)
            self._write_root(state)
            last = state.last_seq
        else:
            document, attrs, n_slides = folded
            last = int(attrs.get("folded_seq", 0))
            self._files.write("zarr.json", document)
            self._write_fold_mark(last, n_slides)
        for seq in store_index.journal_seqs(self._side):
            if seq <= last:
                self._side.delete(f"{store_index.JOURNAL_DIR}/{store_index.record_name(seq)}")

    def fold_index(self) -> None:
        """Bring the root document (what plain zarr reads) up to date with every commit; `run_tiling` calls it at
        the end of every run. Cheap when nothing is pending."""
        with self._index_lock():
            mark = self._fold_mark()
            if any(q > int(mark["folded_seq"]) for q in store_index.journal_seqs(self._side)):
                self._fold()

    def _slide_exists(self, slide_id: str) -> bool:
        return self._files.read(f"{store_index.SLIDES}/{slide_id}/zarr.json") is not None

    def completed_provenance(self, slide_id: str) -> dict[str, Any] | None:
        """The provenance of `slide_id` if it is complete in this store, else None. The index is read once per
        writer (a run checks thousands of slides) and kept up to date with this writer's own commits."""
        if self._snapshot is None:
            self._snapshot = read_index(self.url)[1]
        nodes = self._snapshot.slides.get(slide_id)
        return None if nodes is None else store_index.slide_group_attrs(nodes)

    def record_failure(self, slide_id: str, failure: dict[str, Any]) -> None:
        """Record why `slide_id` failed, and forget any earlier committed version of it: a slide that was tried
        again (its file or the parameters changed, or --overwrite) and failed must not keep serving tiles of a
        file or parameters that are no longer the ones asked for."""
        with self._index_lock():  # as in _publish: never between another run's rename and its index entry
            existed = self._slide_exists(slide_id)
            failure = {**failure, "time": now_iso(), **({"replaced_committed": True} if existed else {})}
            # a slide plain zarr may list is folded out before its files go
            self._append({"op": "fail", "slide_id": slide_id, "failure": failure}, fold=existed)
            if existed:
                self._delete_key(f"slides/{slide_id}")

    def remove_slide(self, slide_id: str) -> None:
        """Forget a slide (index first, folded, so readers stop seeing it before its data goes)."""
        with self._index_lock():
            if self._slide_exists(slide_id):
                self._append({"op": "remove", "slide_id": slide_id}, fold=True)
                self._delete_key(f"slides/{slide_id}")

    # -- slides --------------------------------------------------------------------------------------------------

    def begin_slide(
        self,
        slide_id: str,
        tile_px: int,
        *,
        encoding: str = "jpeg",
        tiles_per_shard: int = 256,
        tiles_per_chunk: int = 16,
        tile_attrs: dict[str, Any] | None = None,
        max_tiles: int = 0,
    ) -> SlideWriter:
        """Stage a slide (an earlier version of it is removed first). `max_tiles` is accepted and ignored (earlier
        versions sized their arrays with it; the metadata is now written once, at commit)."""
        if slide_id != safe_slide_id(slide_id):
            raise StoreError(f"slide id {slide_id!r} is not a safe group name; pass it through safe_slide_id()")
        del max_tiles  # accepted for callers of earlier versions: the metadata is written once, at commit
        self.remove_slide(slide_id)
        return SlideWriter(
            self,
            slide_id,
            tile_px=tile_px,
            encoding=encoding,
            tiles_per_shard=tiles_per_shard,
            tiles_per_chunk=tiles_per_chunk,
            tile_attrs=tile_attrs or {},
        )

    def _staging_area(self, slide_id: str) -> tuple[store_index.Files, str, Path | None]:
        """(the files of the staged slide, its folder or key, its lease file): see tiling/staging.py for names and
        leases. Object stores write the slide in place (nobody reads it before its commit record)."""
        if self.remote:
            self._delete_key(f"slides/{slide_id}")  # leftovers of a killed writer
            return store_index.Files(f"{self.url.rstrip('/')}/slides/{slide_id}", remote=True), slide_id, None
        folder = Path(self.sidecar) / _STAGING_DIR / staging.staging_name(slide_id)
        folder.parent.mkdir(parents=True, exist_ok=True)
        lease = staging.write_lease(folder, slide_id)  # before the folder: a folder never exists without its lease
        folder.mkdir()
        return store_index.Files(str(folder), remote=False), str(folder), lease

    def _publish(self, slide_id: str, staged: str, nodes: dict[str, dict[str, Any]]) -> None:
        with self._index_lock():  # the rename too: two runs committing the same slide take turns, never interleave
            if not self.remote:
                # No fsync: a slide's shards are many files, and an unfinished commit is redone on resume anyway.
                publish_dir(staged, local_root(self.url) / "slides" / slide_id, fsync=False)
            self._append({"op": "commit", "slide_id": slide_id, "nodes": nodes})

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
                if (
                    path.name.endswith(staging.LEASE_SUFFIX)
                    and path.with_name(path.name.removesuffix(staging.LEASE_SUFFIX)).exists()
                ):
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
