"""A slide being embedded: a staging Zarr group filled part by part (by one or several processes), then committed.

    <emb>.pathdino/assembly/<slide_id>.<key>/        Zarr group with the slide's full-size arrays (cls, ...)
    <emb>.pathdino/assembly/<slide_id>.<key>.parts/  one marker file per finished part ("<start>-<stop>"), "merging"

(``<emb>/.assembly/`` in stores of the old layout: ``store.work_files``.)

``key`` hashes everything the numbers depend on (tile-store entry, features, part size), so a rerun after the tile
store changed never mixes old and new parts. Part boundaries are multiples of every array's chunk rows, so two
processes never write the same chunk file. A part counts only once its marker exists (written after its rows, by
rename), so a process killed mid-part leaves that part to be recomputed and nothing else. Whoever sees every
marker claims the merge ("merging" file, created exclusively under the store's lock; a claim by a dead process on
this host, or older than ``STALE_CLAIM_S`` from another host, is taken over), writes coordinates and attributes,
and moves the group into ``slides/`` with one rename through :meth:`EmbeddingWriter.commit_staged`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any

import numpy as np
import zarr
import zarr.storage

from pathdino.embed.plan import WorkItem
from tiling.fsio import pid_alive, read_json

MERGE_CLAIM = "merging"
STALE_CLAIM_S = 1800.0
_NAME = re.compile(r"(.+)\.([0-9a-f]{12})(\.parts)?")


def assembly_key(index_entry: dict[str, Any], part_tiles: int) -> str:
    """12 hex digits naming one slide's staging data: changes whenever the numbers would."""
    text = json.dumps({**index_entry, "part_tiles": part_tiles}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _marker(item: WorkItem) -> str:
    return f"{item.start:012d}-{item.stop:012d}"


class SlideAssembly:
    """The staging group of one slide (see module docstring); safe to open from several processes at once."""

    def __init__(self, writer, slide_id: str, key: str):
        self.writer = writer
        self.slide_id = slide_id
        self.key = key
        root = writer.work.assembly
        self.path = root / f"{slide_id}.{key}"
        self.parts_dir = root / f"{slide_id}.{key}.parts"

    def create(self, arrays: dict[str, tuple[tuple[int, ...], str, int]]) -> None:
        """Create the group once (``name -> (shape, dtype, chunk_rows)``); drops this slide's stale assemblies."""
        with self.writer.lock():
            if self.path.is_dir():
                return
            root = self.path.parent
            root.mkdir(parents=True, exist_ok=True)
            for old in root.iterdir():  # this slide under another key: older tile data or features
                match = _NAME.fullmatch(old.name)
                if match and match[1] == self.slide_id and match[2] != self.key:
                    shutil.rmtree(old, ignore_errors=True)
            tmp = root / f".tmp.{self.slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            group = zarr.open_group(store=zarr.storage.LocalStore(tmp), mode="w")
            for name, (shape, dtype, rows) in arrays.items():
                group.create_array(name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]), fill_value=0)
            self.parts_dir.mkdir(exist_ok=True)
            os.replace(tmp, self.path)

    def group(self) -> zarr.Group:
        return zarr.open_group(store=zarr.storage.LocalStore(self.path), mode="r+")

    def done(self, item: WorkItem) -> bool:
        return (self.parts_dir / _marker(item)).is_file()

    def mark_done(self, item: WorkItem) -> None:
        tmp = self.parts_dir / f".{_marker(item)}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
        os.replace(tmp, self.parts_dir / _marker(item))

    def complete(self, items: list[WorkItem]) -> bool:
        """Every part of the slide is marked done."""
        return self.path.is_dir() and all(self.done(it) for it in items)

    def claim_merge(self) -> bool:
        """True if this process may merge now (exclusive claim; stale claims are taken over)."""
        claim = self.parts_dir / MERGE_CLAIM
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        with self.writer.lock():
            if not self.path.is_dir():
                return False  # merged meanwhile by another process
            if claim.is_file():
                try:
                    holder = read_json(claim, error=ValueError)
                except ValueError:  # unreadable or not an object: a claim of no one
                    holder = {}
                same_host = holder.get("host") == me["host"]
                pid = int(holder.get("pid", 0))
                # our own pid: a claim left by an earlier attempt in this process that was interrupted
                dead = same_host and (pid == os.getpid() or not pid_alive(pid))
                old = time.time() - float(holder.get("time", 0)) > STALE_CLAIM_S
                if not (dead or (old and not same_host)):
                    return False
            claim.write_text(json.dumps(me))
            return True

    def release_merge(self) -> None:
        """Give the claim back (the merge failed; another process, or a rerun, may try again)."""
        with self.writer.lock():
            (self.parts_dir / MERGE_CLAIM).unlink(missing_ok=True)

    def discard_parts(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)


class RowWriter:
    """Appends rows to one array of an assembly, writing whole chunks only (a chunk is written once, by one
    process); the rows left over at the end of a part are written by :meth:`close`."""

    def __init__(self, array, start: int, rows: int):
        self.array = array
        self.next = start  # first row not yet written
        self.rows = rows
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.n_pending += len(values)
        if self.n_pending >= self.rows:
            self._write(self.n_pending - self.n_pending % self.rows)

    def _write(self, n: int) -> None:
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.array[self.next : self.next + n] = block[:n]
        rest = block[n:]
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)
        self.next += n

    def close(self) -> None:
        if self.n_pending:
            self._write(self.n_pending)
