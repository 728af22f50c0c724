"""The pathdino tile store: the one module that reads its layout (documented in docs/tile-store.md).

A store (format 2) is a Zarr v3 hierarchy::

    <store>/zarr.json                      root group; attrs["pathdino"] = format, version, failures, folded_seq;
                                           consolidated_metadata = every slide's node metadata (the index)
    <store>/slides/zarr.json               group holding one child group per slide
    <store>/slides/<slide_id>/zarr.json    attrs["pathdino"] = the slide's provenance
    <store>/slides/<slide_id>/tiles        (N,) variable-length bytes: one encoded image (JPEG or PNG) per tile
    <store>/slides/<slide_id>/coords       (N, 2) int64: level-0 (x, y) of each tile's top-left corner
    <store>/slides/<slide_id>/tissue_fraction  (N,) float32

Beside it, outside the Zarr hierarchy so that plain zarr opens the store without a warning::

    <store>.pathdino/qc/<slide_id>.jpg     QC image
    <store>.pathdino/journal/<seq>.json    commits not yet folded into the root document (tiling/store_index.py)
    <store>.pathdino/staging/, lock        the writers' scratch space, leases and lock file (store_write.py,
                                           staging.py)

Only slides in the index (the root document plus the journal) are complete; readers never look at anything else,
so a killed writer leaves nothing a reader can mistake for data. Format 1 (the index in the root attributes) is
still read, and a writer migrates it to format 2 when it first opens it.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
import zarr.storage

from tiling import fsio, store_index
from tiling.errors import PathdinoError

FORMAT_NAME = "pathdino-tile-store"
FORMAT_VERSION = 2
"""The version this code writes. Version 2 keeps the slide index as Zarr consolidated metadata in the root zarr.json
plus a journal (tiling/store_index.py); version 1 kept it in the root attributes, rewritten whole at every commit."""
READ_VERSIONS = (1, 2)
TILE_ENCODINGS = ("jpeg", "png")

# zarr-python warns that variable-length bytes have no Zarr v3 spec yet; docs/tile-store.md says what we rely on.
warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


class StoreError(PathdinoError):
    """A tile store is missing, of an unknown format or version, or does not hold what was asked for."""


# ----------------------------------------------------------------------------------------------------------------
# Tile encoding


def encode_tile(
    tile: np.ndarray, encoding: str = "jpeg", *, jpeg_quality: int = 90, jpeg_subsampling: str = "420"
) -> bytes:
    """Encode one RGB uint8 tile (H, W, 3) as JPEG (lossy, default) or PNG (lossless).

    JPEG chroma subsampling "420" (the default, as PIL and most tile datasets) is ~1.5x faster to encode, ~1.3x
    faster to decode and ~1.5x smaller than "444"; "444" keeps colour detail (mean abs error 1.3 vs 4.3 grey levels
    at q90 on the bundled slide's tissue).
    """
    import imagecodecs

    if encoding == "jpeg":
        return bytes(imagecodecs.jpeg8_encode(tile, level=jpeg_quality, subsampling=jpeg_subsampling))
    if encoding == "png":
        return bytes(imagecodecs.png_encode(tile, level=1))
    raise ValueError(f"unknown tile encoding {encoding!r}; expected one of {TILE_ENCODINGS}")


def decode_tile(data: bytes, encoding: str = "jpeg") -> np.ndarray:
    """Decode one stored tile to an RGB uint8 array (H, W, 3)."""
    import imagecodecs

    if encoding == "jpeg":
        return imagecodecs.jpeg8_decode(data)
    if encoding == "png":
        return imagecodecs.png_decode(data)
    raise ValueError(f"unknown tile encoding {encoding!r}; expected one of {TILE_ENCODINGS}")


# ----------------------------------------------------------------------------------------------------------------
# Slide ids


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def safe_slide_id(raw_id: str) -> str:
    """Turn a slide id into a group name that every filesystem and object store accepts.

    Ids made only of letters, digits, '.', '_' and '-' (not starting with '.') are kept as they are. Anything else
    (path separators, '..', spaces, non-ASCII) is replaced by '_' and a short hash of the original is appended, so
    two different raw ids can never collide and a manifest can never make the tiler write outside the store.
    """
    import hashlib

    raw_id = str(raw_id)
    if raw_id and not _SAFE_ID.search(raw_id) and not raw_id.startswith(".") and len(raw_id) <= 200:
        return raw_id
    cleaned = _SAFE_ID.sub("_", raw_id).lstrip("._")[:150] or "slide"
    digest = hashlib.sha1(raw_id.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


# ----------------------------------------------------------------------------------------------------------------
# Opening


def is_remote_url(url: str) -> bool:
    """Whether a store address is an fsspec URL (memory://, s3://, ...) rather than a local folder."""
    return "://" in str(url) and not str(url).startswith("file://")


def local_root(url: str | Path) -> Path:
    """The absolute folder of a local store address (a path or a file:// URL)."""
    return Path(str(url).removeprefix("file://")).expanduser().resolve()


def zarr_store(url: str | Path, read_only: bool) -> zarr.abc.store.Store:
    """The zarr Store object for a local folder or an fsspec URL."""
    if is_remote_url(str(url)):
        return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only)
    return zarr.storage.LocalStore(local_root(url), read_only=read_only)


def check_format(meta: dict[str, Any], url: str) -> None:
    """Raise StoreError unless `meta` (the root's attrs["pathdino"]) is a tile store of a version this code reads."""
    version = meta.get("format_version")
    fsio.check_format(
        meta,
        where=url,
        kind="pathdino tile store",
        format_name=FORMAT_NAME,
        format_version=version if version in READ_VERSIONS else FORMAT_VERSION,
        error=StoreError,
        not_this_format="Point at the folder that `pathdino tile --out` created.",
        other_version="Re-tile the slides or install the pathdino release that wrote it.",
    )


def read_root_document(url: str) -> dict[str, Any]:
    """The root zarr.json of the store at `url`, parsed and checked to be a tile store of a readable version."""
    raw = store_index.Files(url, remote=is_remote_url(url)).read("zarr.json")
    if raw is None:
        raise StoreError(
            f"no tile store at {url}: expected a folder with zarr.json "
            "(create one with `pathdino tile SLIDES --out STORE`)"
        )
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot open {url} as a Zarr v3 group: its zarr.json is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise StoreError(f"cannot open {url} as a Zarr v3 group: its zarr.json is not a group's metadata")
    check_format(dict((doc.get("attributes") or {}).get("pathdino") or {}), url)
    return doc


def read_index(url: str) -> tuple[dict[str, Any], store_index.IndexState | None]:
    """(the root's attrs["pathdino"], the slide index with the journal applied; None for a format-1 store)."""
    for _ in range(8):  # a writer folding the journal while we read it: read again
        doc = read_root_document(url)
        meta = dict(doc["attributes"]["pathdino"])
        if meta["format_version"] == 1:
            return meta, None
        state = store_index.parse_root(doc)
        if store_index.apply_journal(state, store_index.Files(sidecar_url(url), remote=is_remote_url(url))):
            return meta, state
    raise StoreError(f"the index of {url} kept changing while it was read; try again")


def _index_entry(attrs: dict[str, Any]) -> dict[str, Any]:
    """A format-1 style index entry (SlideEntry fields) from a slide's provenance."""
    return {
        "n_tiles": int(attrs.get("n_tiles", 0)),
        "source_path": str(attrs.get("source_path", "")),
        "fingerprint": str(attrs.get("source_fingerprint", "")),
        "committed": str(attrs.get("created", "")),
    }


def _group_from_nodes(store: zarr.abc.store.Store, slide_id: str, nodes: dict[str, dict[str, Any]]) -> zarr.Group:
    """A slide's group built from its metadata (no request): its arrays come from the group's inline metadata."""
    from zarr.core.group import AsyncGroup
    from zarr.storage import StorePath

    children = {name: meta for name, meta in nodes.items() if name}
    meta = {**nodes[""], "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": children}}
    return zarr.Group(AsyncGroup.from_dict(StorePath(store, f"slides/{slide_id}"), meta))


SIDECAR_SUFFIX = ".pathdino"


def sidecar_url(url: str | Path) -> str:
    """The folder beside a store that holds what is not Zarr: QC images, the writers' lock and staging area.

    Kept out of the store itself because zarr warns about every non-Zarr object it meets inside a hierarchy.
    """
    if is_remote_url(str(url)):
        return str(url).rstrip("/") + SIDECAR_SUFFIX
    root = local_root(url)
    return str(root.with_name(root.name + SIDECAR_SUFFIX))


def qc_image_key(slide_id: str) -> str:
    """Where a slide's QC image lies, relative to the sidecar folder."""
    return f"qc/{slide_id}.jpg"


# Earlier versions wrote PNG QC pictures; `qc_image_path` still finds them.
_LEGACY_QC_SUFFIX = ".png"


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class SlideEntry:
    """One complete slide as listed in the root index."""

    slide_id: str
    n_tiles: int
    source_path: str
    fingerprint: str
    committed: str


class StoreSlide:
    """Read access to one slide's tiles, coordinates and provenance."""

    def __init__(
        self,
        group: zarr.Group | Callable[[], zarr.Group],
        slide_id: str,
        *,
        nodes: dict[str, dict[str, Any]] | None = None,
    ):
        """`group` is the slide's zarr group, or (format 2, with the slide's node metadata `nodes`) a function that
        builds it: a slide is then described from its metadata alone, and its zarr objects are only made when its
        arrays are read (a 10,000-slide catalog makes none)."""
        self.slide_id = slide_id
        self._make_group = group if callable(group) else (lambda: group)
        if nodes is None:
            tiles = self._group["tiles"]
            self.attrs: dict[str, Any] = dict(self._group.attrs.get("pathdino", {}))
            tile_attrs, shape = dict(tiles.attrs), tiles.shape
            shard = (tiles.shards or tiles.chunks)[0]
        else:
            self.attrs = store_index.slide_group_attrs(nodes)
            tile_attrs, shape = nodes["tiles"].get("attributes", {}), nodes["tiles"]["shape"]
            shard = nodes["tiles"]["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.encoding: str = tile_attrs["encoding"]
        self.tile_px: int = int(tile_attrs["tile_px"])
        self.n_tiles: int = int(shape[0])
        self.tiles_per_shard: int = int(shard)

    @functools.cached_property
    def _group(self) -> zarr.Group:
        return self._make_group()

    @functools.cached_property
    def _tiles(self) -> zarr.Array:
        return self._group["tiles"]

    @property
    def coords(self) -> np.ndarray:
        """Level-0 (x, y) of each tile's top-left corner, int64 (N, 2)."""
        return np.asarray(self._group["coords"][:], dtype=np.int64)

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self._group["tissue_fraction"][:], dtype=np.float32)

    def shard_ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of each shard: reading a whole shard is one file read and the cheapest unit of I/O."""
        step = self.tiles_per_shard
        return [(s, min(s + step, self.n_tiles)) for s in range(0, self.n_tiles, step)]

    def read_encoded(self, start: int, stop: int) -> list[bytes]:
        """The encoded bytes of tiles start..stop-1, in order (one zarr call: read large slices, not single tiles)."""
        if not 0 <= start <= stop <= self.n_tiles:
            raise IndexError(f"slide {self.slide_id!r}: tiles {start}:{stop} outside 0:{self.n_tiles}")
        if start == stop:
            return []
        return [bytes(b) for b in self._tiles[start:stop]]

    def read_tiles(self, start: int, stop: int) -> np.ndarray:
        """Decoded tiles start..stop-1 as uint8 (n, tile_px, tile_px, 3)."""
        encoded = self.read_encoded(start, stop)
        out = np.empty((len(encoded), self.tile_px, self.tile_px, 3), dtype=np.uint8)
        for i, data in enumerate(encoded):
            out[i] = decode_tile(data, self.encoding)
        return out


def slide_mpp(slide: StoreSlide) -> float | None:
    """The µm/px a slide was tiled at (the one asked for, else the one used), None when its provenance lacks it."""
    mpp = slide.attrs.get("target_mpp", slide.attrs.get("effective_mpp"))
    return float(mpp) if mpp is not None else None


class TileStore:
    """A pathdino tile store opened for reading (local folder or fsspec URL), format 2 or 1.

    Format 2 reads one object (the root zarr.json, every slide's metadata inline) and the journal of commits not yet
    folded into it (`tiling.store_index`); opening a slide then costs no request. Format 1 reads the index from the
    root attributes and each slide's metadata when it is opened.
    """

    def __init__(self, url: str | Path):
        self.url = str(url)
        self._store = zarr_store(self.url, read_only=True)
        self.meta, self._state = read_index(self.url)
        self._v1_root: zarr.Group | None = None
        if self._state is None:
            self._v1_root = zarr.open_group(store=self._store, mode="r", use_consolidated=False)
            self._index: dict[str, dict[str, Any]] = dict(self.meta.get("slides", {}))
        else:
            self._index = {
                sid: _index_entry(store_index.slide_group_attrs(nodes)) for sid, nodes in self._state.slides.items()
            }
            self.meta = {**self.meta, "slides": self._index, "failures": self._state.failures}

    @property
    def format_version(self) -> int:
        return int(self.meta.get("format_version", FORMAT_VERSION))

    @property
    def entries(self) -> dict[str, SlideEntry]:
        return {sid: SlideEntry(slide_id=sid, **e) for sid, e in sorted(self._index.items())}

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the complete slides, sorted."""
        return sorted(self._index)

    @property
    def failures(self) -> dict[str, dict[str, Any]]:
        return dict(self.meta.get("failures", {}))

    def n_tiles(self, slide_id: str) -> int:
        return int(self._entry(slide_id)["n_tiles"])

    def _entry(self, slide_id: str) -> dict[str, Any]:
        try:
            return self._index[slide_id]
        except KeyError:
            raise StoreError(
                f"slide {slide_id!r} is not a complete slide of {self.url} "
                f"(run `pathdino info {self.url}` to list them)"
            ) from None

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        """A slide's provenance (its group's attributes["pathdino"]); no request in format 2."""
        self._entry(slide_id)
        if self._state is not None:
            return store_index.slide_group_attrs(self._state.slides[slide_id])
        return dict(self._v1_root[f"slides/{slide_id}"].attrs.get("pathdino", {}))

    def slide(self, slide_id: str) -> StoreSlide:
        self._entry(slide_id)
        if self._state is None:
            return StoreSlide(self._v1_root[f"slides/{slide_id}"], slide_id)
        nodes = self._state.slides[slide_id]
        return StoreSlide(lambda: _group_from_nodes(self._store, slide_id, nodes), slide_id, nodes=nodes)

    def qc_image_path(self, slide_id: str) -> str:
        """Path or URL of a slide's QC image. Falls back to the PNG pictures of earlier versions, in the sidecar or
        in `<store>/qc/` where even earlier versions wrote them."""
        path = f"{sidecar_url(self.url)}/{qc_image_key(slide_id)}"
        if is_remote_url(self.url) or Path(path).exists():
            return path
        png_key = qc_image_key(slide_id).removesuffix(".jpg") + _LEGACY_QC_SUFFIX
        for legacy in (f"{sidecar_url(self.url)}/{png_key}", f"{self.url.rstrip('/')}/{png_key}"):
            if Path(legacy).exists():
                return legacy
        return path


def summarise(store: TileStore) -> dict[str, Any]:
    """A JSON-friendly summary of a store (used by `pathdino info` and the demo)."""
    entries = store.entries
    return {
        "url": store.url,
        "format_version": store.meta.get("format_version"),
        "n_slides": len(entries),
        "n_tiles": sum(e.n_tiles for e in entries.values()),
        "n_empty": sum(e.n_tiles == 0 for e in entries.values()),
        "n_failures": len(store.failures),
    }


def describe_use(
    *,
    stores: tuple[str, ...],
    n_slides: int,
    n_tiles: int,
    n_failed: int,
    mpps: list[float | None],
    tile_pxs: list[int],
) -> str:
    """One line of what a run uses: stores, slides, tiles, failed slides skipped, µm/px and tile size."""
    known = sorted({round(m, 4) for m in mpps if m is not None})
    mpp = "/".join(f"{m:g}" for m in known) + " µm/px" if known else "unknown µm/px"
    if known and any(m is None for m in mpps):
        mpp += " (some slides unknown)"
    px = "/".join(str(p) for p in sorted(set(tile_pxs)))
    names = ", ".join(stores[:3]) + (f" and {len(stores) - 3} more" if len(stores) > 3 else "")
    failed = f"; {n_failed} failed slide(s) skipped (`pathdino info STORE` lists them)" if n_failed else ""
    return f"{len(stores)} store(s) ({names}): {n_slides} slide(s), {n_tiles:,} tiles, {mpp}, {px} px tiles{failed}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
