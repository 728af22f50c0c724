"""Format 2's slide index: Zarr v3 consolidated metadata in the root `zarr.json`, plus a journal of recent commits.

The root `zarr.json` holds, inline (`consolidated_metadata`, as zarr-python writes it), the metadata of every node of
every complete slide: its group (provenance, `n_tiles`) and its `tiles`, `coords` and `tissue_fraction` arrays. Plain
zarr therefore opens a store and lists its slides with one read of one object, and pathdino's readers open any
slide without another request.

Rewriting that document (~3.3 KB per slide: 33 MB at 10,000 slides) at every commit would make a run's index writes
grow with the square of its slide count, so a commit appends one small record to the journal
(`<store>.pathdino/journal/<seq>.json`, under the writers' lock) and the journal is *folded* into the root
document now and then: when it holds `FOLD_FRACTION` of the folded slides,
when its oldest record is older than `FOLD_MAX_AGE_S`, when a slide that plain zarr can see is removed, and at the
end of every run. A commit costs O(1); folds cost O(store) but come after a number of commits that grows with the
store, so their cost per commit stays constant (plus one fold a minute at most). pathdino's readers apply the
journal on top of the root document, so they see every commit at once; plain zarr sees the store as of the last
fold (at most a minute or 1/8 of the store behind during a run, exact after it).

Records (JSON, one file each, applied in `seq` order; `folded_seq` in the root attributes says which are already in):
``{"seq", "op": "commit", "slide_id", "nodes": {"": group, "tiles": array, ...}}``, ``{"seq", "op": "remove",
"slide_id"}``, ``{"seq", "op": "fail", "slide_id", "failure": {...}}``. The layout is documented in
docs/tile-store.md; `tiling.store` reads it, `tiling.store_write` writes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiling.fsio import atomic_write_bytes

JOURNAL_DIR = "journal"
SLIDES = "slides"
SLIDE_ARRAYS = ("tiles", "coords", "tissue_fraction")
FOLD_FRACTION = 1 / 8
"""The journal is folded once it holds this share of the folded slides (so at every commit while a store has under
8 slides): folds get rarer as the store grows, so a commit's share of their cost stays constant (each slide's
metadata is rewritten about 1 + 1/FOLD_FRACTION times over the store's life)."""
FOLD_MAX_AGE_S = 60.0
"""A journal record older than this is folded at the next commit: plain zarr is never more than a minute behind."""
_GROUP_CONSOLIDATED = {"kind": "inline", "must_understand": False, "metadata": {}}


class Files:
    """Reads and writes whole objects under a local folder or an fsspec URL (the root document, journal records)."""

    def __init__(self, url: str, *, remote: bool):
        self.remote = remote
        if remote:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(url.rstrip("/"))
        else:
            self.fs, self.base = None, url.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            if self.remote:
                return self.fs.cat_file(self._path(key))
            return Path(self._path(key)).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes, *, atomic: bool = True) -> None:
        """Write an object whole; locally `atomic` writes a temporary name, then renames it over (readers never see
        half of it), else writes in place (files of a staged slide, which nobody reads before its commit)."""
        if self.remote:
            self.fs.pipe_file(self._path(key), data)
        elif atomic:
            atomic_write_bytes(self._path(key), data, fsync=False)
        else:
            path = Path(self._path(key))
            try:
                path.write_bytes(data)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def names(self, folder: str) -> list[str]:
        """The names in a folder (empty when it does not exist)."""
        if self.remote:
            try:
                return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(folder), detail=False)]
            except FileNotFoundError:
                return []
        try:
            return [p.name for p in Path(self._path(folder)).iterdir()]
        except FileNotFoundError:
            return []

    def delete(self, key: str) -> None:
        if self.remote:
            if self.fs.exists(self._path(key)):
                self.fs.rm_file(self._path(key))
        else:
            Path(self._path(key)).unlink(missing_ok=True)


@dataclass
class IndexState:
    """The slide index as a reader sees it: the root document with the journal applied.

    Attributes:
        attrs: the root's attributes["pathdino"] (format, format_version, created, failures, folded_seq).
        slides: slide id -> {"": the slide group's metadata, "tiles"/"coords"/"tissue_fraction": array metadata}.
        last_seq: the last journal record applied (== attrs["folded_seq"] when the journal is empty).
        unfolded: (seq, time written) of each journal record not yet folded, oldest first.
        folded_ids: the slides plain zarr sees (those in the root document).
    """

    attrs: dict[str, Any]
    slides: dict[str, dict[str, dict[str, Any]]]
    last_seq: int = 0
    unfolded: list[tuple[int, float]] = field(default_factory=list)
    folded_ids: frozenset[str] = frozenset()

    @property
    def failures(self) -> dict[str, dict[str, Any]]:
        return self.attrs.setdefault("failures", {})

    def apply(self, record: dict[str, Any]) -> None:
        """Apply one journal record (in seq order)."""
        sid, op = record["slide_id"], record["op"]
        if op == "commit":
            self.slides[sid] = record["nodes"]
            self.failures.pop(sid, None)
        elif op == "remove":
            self.slides.pop(sid, None)
        elif op == "fail":
            self.slides.pop(sid, None)
            self.failures[sid] = record["failure"]
        else:
            raise ValueError(f"unknown journal operation {op!r} in record {record.get('seq')}")
        self.last_seq = max(self.last_seq, int(record["seq"]))


def _array(
    *,
    shape: list[int],
    dtype: str,
    chunk_shape: list[int],
    fill_value: Any,
    codecs: list[dict[str, Any]],
    attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Zarr v3 array's metadata, as zarr-python 3 writes it."""
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": attributes or {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


_LITTLE_ENDIAN = [{"name": "bytes", "configuration": {"endian": "little"}}]


def slide_nodes(
    *,
    n_tiles: int,
    provenance: dict[str, Any],
    tile_attrs: dict[str, Any],
    tiles_per_shard: int,
    tiles_per_chunk: int,
    coord_rows: int,
) -> dict[str, dict[str, Any]]:
    """The metadata of a slide's group and arrays (docs/tile-store.md): what its zarr.json files and the index hold.

    `tiles`: variable-length bytes in `tiles_per_chunk` chunks inside `tiles_per_shard` shards (sharding_indexed,
    index at the end with its CRC32C); `coords` (N, 2) int64 and `tissue_fraction` (N,) float32 in chunks of
    `coord_rows` rows. tests/test_store.py checks that zarr reads them and would write the same.
    """
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [tiles_per_chunk],
            "codecs": [{"name": "vlen-bytes", "configuration": {}}],
            "index_codecs": [*_LITTLE_ENDIAN, {"name": "crc32c"}],
            "index_location": "end",
        },
    }
    return {
        "": {"attributes": {"pathdino": provenance}, "zarr_format": 3, "node_type": "group"},
        "tiles": _array(
            shape=[n_tiles],
            dtype="variable_length_bytes",
            chunk_shape=[tiles_per_shard],
            fill_value="",
            codecs=[sharding],
            attributes=tile_attrs,
        ),
        "coords": _array(
            shape=[n_tiles, 2], dtype="int64", chunk_shape=[coord_rows, 2], fill_value=0, codecs=_LITTLE_ENDIAN
        ),
        "tissue_fraction": _array(
            shape=[n_tiles], dtype="float32", chunk_shape=[coord_rows], fill_value=0.0, codecs=_LITTLE_ENDIAN
        ),
    }


def slide_group_attrs(nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A slide's provenance (its group's attributes["pathdino"]) from its node metadata."""
    return dict(nodes[""].get("attributes", {}).get("pathdino", {}))


def _slide_lines(sid: str, nodes: dict[str, dict[str, Any]]) -> list[str]:
    """A slide's lines of the root document: its group's and its arrays' metadata, one node per line."""
    group = {**nodes[""], "consolidated_metadata": _GROUP_CONSOLIDATED}
    lines = [json.dumps(f"{SLIDES}/{sid}") + ": " + json.dumps(group, separators=(",", ":"))]
    for name in sorted(n for n in nodes if n):
        lines.append(json.dumps(f"{SLIDES}/{sid}/{name}") + ": " + json.dumps(nodes[name], separators=(",", ":")))
    return lines


def _document(attrs: dict[str, Any], slide_lines: dict[str, list[str]]) -> bytes:
    lines = [
        f'"{SLIDES}": '
        + json.dumps(
            {"attributes": {}, "zarr_format": 3, "consolidated_metadata": _GROUP_CONSOLIDATED, "node_type": "group"}
        )
    ]
    for sid in sorted(slide_lines):
        lines.extend(slide_lines[sid])
    head = json.dumps({"attributes": {"pathdino": attrs}, "zarr_format": 3, "node_type": "group"})
    return (head[:-1] + ",\n" + _CONSOLIDATED_OPEN + "\n" + ",\n".join(lines) + "\n}}}\n").encode()


_CONSOLIDATED_OPEN = '"consolidated_metadata": {"kind": "inline", "must_understand": false, "metadata": {'


def root_document(attrs: dict[str, Any], slides: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """The root zarr.json of a format-2 store: the group, its attributes, and every node's metadata inline.

    One node per line (and the attributes on the first), so that folding the journal in (`fold_document`) edits
    lines instead of parsing and writing 40,000 nodes; groups carry an empty inline `consolidated_metadata` of their
    own, as zarr-python writes them.
    """
    return _document(attrs, {sid: _slide_lines(sid, nodes) for sid, nodes in slides.items()})


def document_attrs(raw: bytes) -> dict[str, Any] | None:
    """The root attributes["pathdino"] of a document laid out by `root_document` (its first line only), else None."""
    head, _, rest = raw.partition(b"\n")
    if not head.endswith(b",") or not rest.startswith(_CONSOLIDATED_OPEN.encode()):
        return None
    try:
        return dict(json.loads(head[:-1] + b"}")["attributes"]["pathdino"])
    except (ValueError, KeyError, TypeError):
        return None


def fold_document(raw: bytes, records: list[dict[str, Any]]) -> tuple[bytes, dict[str, Any], int] | None:
    """Apply journal `records` (in order) to a root document written by `root_document`, editing its lines: only the
    attributes line and the records' slides are parsed or written as JSON. Returns (new document, its attributes,
    number of slides), or None when the document is not laid out one node per line (rewritten by another tool):
    the caller then parses it whole."""
    lines = raw.decode("utf-8").split("\n")
    if len(lines) < 4 or lines[1] != _CONSOLIDATED_OPEN or lines[-2] != "}}}" or not lines[0].endswith(","):
        return None
    try:
        attrs = dict(json.loads(lines[0][:-1] + "}")["attributes"]["pathdino"])
    except (ValueError, KeyError, TypeError):
        return None
    attrs["failures"] = dict(attrs.get("failures", {}))
    slide_lines: dict[str, list[str]] = {}
    prefix = f'"{SLIDES}/'
    for line in lines[2:-2]:
        if line.startswith(prefix):
            sid = line[len(prefix) : line.index('"', len(prefix))].split("/", 1)[0]
            slide_lines.setdefault(sid, []).append(line.removesuffix(","))
    for record in records:
        sid, op = record["slide_id"], record["op"]
        slide_lines.pop(sid, None)
        if op == "commit":
            slide_lines[sid] = _slide_lines(sid, record["nodes"])
            attrs["failures"].pop(sid, None)
        elif op == "fail":
            attrs["failures"][sid] = record["failure"]
        elif op != "remove":
            raise ValueError(f"unknown journal operation {op!r} in record {record.get('seq')}")
        attrs["folded_seq"] = max(int(attrs.get("folded_seq", 0)), int(record["seq"]))
    return _document(attrs, slide_lines), attrs, len(slide_lines)


def parse_root(doc: dict[str, Any]) -> IndexState:
    """The state a format-2 root document holds (journal not applied)."""
    attrs = dict(doc.get("attributes", {}).get("pathdino", {}))
    attrs["failures"] = dict(attrs.get("failures", {}))
    slides: dict[str, dict[str, dict[str, Any]]] = {}
    prefix = SLIDES + "/"
    for key, meta in ((doc.get("consolidated_metadata") or {}).get("metadata") or {}).items():
        if not key.startswith(prefix):
            continue
        sid, _, name = key[len(prefix) :].partition("/")
        if name == "":
            meta = {k: v for k, v in meta.items() if k != "consolidated_metadata"}
        slides.setdefault(sid, {})[name] = meta
    slides = {sid: nodes for sid, nodes in slides.items() if "" in nodes}
    folded_seq = int(attrs.get("folded_seq", 0))
    return IndexState(attrs=attrs, slides=slides, last_seq=folded_seq, folded_ids=frozenset(slides))


def record_name(seq: int) -> str:
    return f"{seq:012d}.json"


def journal_seqs(sidecar: Files) -> list[int]:
    """The sequence numbers of the records in the journal, sorted."""
    return sorted(
        int(n.split(".")[0]) for n in sidecar.names(JOURNAL_DIR) if n.endswith(".json") and n.split(".")[0].isdigit()
    )


def apply_journal(state: IndexState, sidecar: Files) -> bool:
    """Apply the journal's unfolded records to `state`; False when a record vanished (folded meanwhile: re-read)."""
    folded = state.last_seq
    for seq in journal_seqs(sidecar):
        if seq <= folded:
            continue  # folded, and about to be deleted by the writer that folded it
        if seq != state.last_seq + 1:
            return False  # a gap: records folded (and deleted) after we read the root document
        data = sidecar.read(f"{JOURNAL_DIR}/{record_name(seq)}")
        if data is None:
            return False
        record = json.loads(data)
        state.apply(record)
        state.unfolded.append((seq, float(record.get("unix_time", time.time()))))
    return True


def needs_fold(state: IndexState, *, now: float) -> bool:
    """Whether the journal should be folded into the root document now (see the module docstring)."""
    if not state.unfolded:
        return False
    by_size = len(state.unfolded) >= max(1.0, FOLD_FRACTION * len(state.folded_ids))
    return by_size or now - state.unfolded[0][1] >= FOLD_MAX_AGE_S
