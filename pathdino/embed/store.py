"""The embeddings store written by ``pathdino embed``: one Zarr v3 group per slide (layout in
docs/export-embed-eval.md), written atomically, indexed in the root attributes.

::

    <emb>/zarr.json                       attrs["pathdino"]: format, version, encoder, tile store, index, failures
    <emb>/slides/<slide_id>/zarr.json     attrs["pathdino"]: {"slide": tile-store provenance, "embedding": ...}
    <emb>/slides/<slide_id>/cls           (N, D) float32: CLS embedding of tile i (the tile store's order)
    <emb>/slides/<slide_id>/mean_patch    (N, D) float32: mean patch token (--mean-patch, or the recipe needs it)
    <emb>/slides/<slide_id>/patch_tokens  (N, T, D) float16: every patch token, registers excluded (--patch-tokens)
    <emb>/slides/<slide_id>/coords        (N, 2) int64: level-0 (x, y) of tile i's top-left corner
    <emb>.pathdino/h5/<slide_id>.h5       CLAM/TRIDENT-style copy (only with --format h5)
    <emb>.pathdino/commits.jsonl          one line per slide commit: slide, tiles, host, pid, rank, time
    <emb>.pathdino/assembly/, staging/, lock   slides being assembled, scratch space, the index lock

What is not Zarr lives BESIDE the store (``<emb>.pathdino/``, as a tile store's sidecar), so plain zarr opens the
store without a warning; stores written before keep those files inside (``work_files`` finds them there).
Only slides in the root index are complete. Local folders only (the tile store may be remote). The tile embedding
("features") follows the encoder's recipe (``attrs["pathdino"]["encoder"]["recipe"]``): ``cls``, ``mean_patch`` or
``cls+mean_patch`` (the two concatenated, Virchow's way); it is assembled from the stored arrays when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

from tiling.errors import PathdinoError
from tiling.fsio import atomic_path, check_format, now_iso, pid_alive, publish_dir

FORMAT_NAME = "pathdino-embeddings"
FORMAT_VERSION = 1
FEATURE_NAMES = ("cls", "mean_patch", "patch_tokens")
H5_DIR = "h5"
JOURNAL = "commits.jsonl"
WORK_SUFFIX = ".pathdino"
# Inside the store (layout before the work files moved beside it): still found and used for such stores.
_LEGACY_NAMES = {"lock": ".pathdino.lock", "assembly": ".assembly", "staging": ".staging"}


class EmbedError(PathdinoError, ValueError):
    """An embedding run cannot start or an embeddings store is not what it should be; names the file or flag."""


def _check_local(url: str | Path) -> Path:
    if "://" in str(url) and not str(url).startswith("file://"):
        raise EmbedError(f"embeddings output {url}: only local folders are supported; write locally, then copy")
    return Path(str(url).removeprefix("file://")).expanduser().resolve()


@dataclass(frozen=True)
class WorkFiles:
    """Where an embeddings store's non-Zarr files are: the folder beside it, or (older stores) inside it."""

    root: Path  # <emb>.pathdino, or <emb> itself for a store of the old layout
    legacy: bool

    def _name(self, key: str) -> Path:
        return self.root / (_LEGACY_NAMES[key] if self.legacy else key)

    @property
    def lock(self) -> Path:
        return self._name("lock")

    @property
    def assembly(self) -> Path:
        return self._name("assembly")

    @property
    def staging(self) -> Path:
        return self._name("staging")

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL

    @property
    def h5(self) -> Path:
        return self.root / H5_DIR


def work_files(url: str | Path) -> WorkFiles:
    """The work files of the embeddings store at ``url``: ``<emb>.pathdino/`` beside it, unless the store was
    written with them inside (an older pathdino) and has no such folder: then inside, where its resume state is."""
    path = _check_local(url)
    beside = path.with_name(path.name + WORK_SUFFIX)
    inside = [path / name for name in (*_LEGACY_NAMES.values(), JOURNAL, H5_DIR)]
    if not beside.exists() and any(p.exists() for p in inside):
        return WorkFiles(root=path, legacy=True)
    return WorkFiles(root=beside, legacy=False)


def h5_dir(url: str | Path) -> Path:
    """The folder of a store's CLAM/TRIDENT h5 files (``--format h5``): ``<emb>.pathdino/h5`` (older: ``<emb>/h5``)."""
    return work_files(url).h5


def _check_format(meta: dict[str, Any], where: Path) -> None:
    check_format(
        meta,
        where=where,
        kind="pathdino embeddings store",
        format_name=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        error=EmbedError,
        not_this_format="Choose another --out (or point at a folder `pathdino embed --out` created).",
        other_version="Re-embed the slides or install the pathdino release that wrote it.",
    )


RECIPE_ARRAYS = {"cls": ("cls",), "mean_patch": ("mean_patch",), "cls+mean_patch": ("cls", "mean_patch")}


def recipe_arrays(recipe: str) -> tuple[str, ...]:
    """The stored arrays a tile-embedding recipe is made of."""
    if recipe not in RECIPE_ARRAYS:
        raise EmbedError(f"unknown feature recipe {recipe!r}; expected one of {sorted(RECIPE_ARRAYS)}")
    return RECIPE_ARRAYS[recipe]


def apply_recipe(recipe: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The tile embeddings [N, D or 2D] of a recipe from its arrays (concatenated along features, in order)."""
    parts = [np.asarray(arrays[name], dtype=np.float32) for name in recipe_arrays(recipe)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


class EmbeddingStore(Mapping):
    """Read an embeddings store: a mapping ``slide_id -> (features [N, D], coords [N, 2])`` (complete slides only).

    ``feature`` picks what is returned as features: ``"features"`` (default: the encoder's tile embedding, e.g.
    CLS, or CLS ++ mean patch token for Virchow2), ``"cls"``, ``"mean_patch"`` or ``"patch_tokens"`` (float16
    [N, T, D]); this mapping plugs directly into ``pathdino.mil.train_abmil``.
    """

    def __init__(self, url: str | Path, feature: str = "features"):
        self.path = _check_local(url)
        if not (self.path / "zarr.json").is_file():
            raise EmbedError(
                f"no embeddings store at {self.path} (create one with `pathdino embed STORE --encoder "
                f"DIR --out {self.path}`)"
            )
        self.root = zarr.open_group(store=zarr.storage.LocalStore(self.path, read_only=True), mode="r")
        self.meta: dict[str, Any] = dict(self.root.attrs.get("pathdino", {}))
        _check_format(self.meta, self.path)
        self.recipe = str(self.encoder.get("recipe", "cls"))
        if feature not in ("features", *FEATURE_NAMES):
            raise EmbedError(f"unknown feature {feature!r}; choose from {('features', *FEATURE_NAMES)}")
        self.arrays = recipe_arrays(self.recipe) if feature == "features" else (feature,)
        lacking = [a for a in self.arrays if a not in self.meta.get("features", FEATURE_NAMES)]
        if lacking:
            raise EmbedError(
                f"{self.path} has no {lacking} arrays (it holds {self.meta.get('features')}); re-run "
                f"`pathdino embed` with {_flag(lacking)}"
            )
        self.feature = feature

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self.meta.get("slides", {}))

    @property
    def encoder(self) -> dict[str, Any]:
        return dict(self.meta.get("encoder", {}))

    def __getitem__(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        group = self.group(slide_id)
        lacking = [a for a in self.arrays if a not in self.meta["slides"][slide_id].get("features", ["cls"])]
        if lacking:
            raise EmbedError(
                f"slide {slide_id!r} of {self.path} has no {lacking} arrays; re-run `pathdino embed` "
                f"with {_flag(lacking)}"
            )
        coords = np.asarray(group["coords"][:], dtype=np.int64)
        if self.feature == "patch_tokens":
            return np.asarray(group["patch_tokens"][:]), coords
        return apply_recipe(
            self.recipe if self.feature == "features" else self.feature, {a: group[a][:] for a in self.arrays}
        ), coords

    def __iter__(self) -> Iterator[str]:
        return iter(self.slide_ids)

    def __len__(self) -> int:
        return len(self.meta.get("slides", {}))

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.meta.get("slides", {})

    def group(self, slide_id: str) -> zarr.Group:
        if slide_id not in self:
            raise KeyError(f"slide {slide_id!r} is not a complete slide of {self.path}")
        return self.root[f"slides/{slide_id}"]

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        """``{"slide": tile-store provenance, "embedding": encoder, features, precision, ...}``."""
        return dict(self.group(slide_id).attrs.get("pathdino", {}))


def _flag(arrays: list[str]) -> str:
    return " ".join(f"--{a.replace('_', '-')}" for a in arrays)


class EmbeddingWriter:
    """Creates or opens an embeddings store; writes whole slides atomically (staging folder + one rename)."""

    def __init__(self, url: str | Path, encoder: dict[str, Any], tile_store: str, features: tuple[str, ...]):
        self.path = _check_local(url)
        self.work = work_files(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.work.root.mkdir(exist_ok=True)
        with self.lock():
            if (self.path / "zarr.json").is_file():
                meta = dict(zarr.open_group(store=self._store(), mode="r").attrs.get("pathdino", {}))
                _check_format(meta, self.path)
                old = meta.get("encoder", {}).get("weights_sha256")
                old_recipe = meta.get("encoder", {}).get("recipe", "cls")
                if old == encoder.get("weights_sha256") and old_recipe != encoder.get("recipe", "cls"):
                    raise EmbedError(
                        f"{self.path} holds {old_recipe!r} embeddings of this encoder, this run makes "
                        f"{encoder.get('recipe')!r} ones (encoder table changed?): choose another --out"
                    )
                if old != encoder.get("weights_sha256"):
                    raise EmbedError(
                        f"{self.path} holds embeddings from another encoder ({meta['encoder'].get('dir')}, weights "
                        f"sha256 {str(old)[:12]}...); embeddings of two encoders must not mix: choose another --out"
                    )
            else:
                root = zarr.open_group(store=self._store(), mode="a")
                root.attrs["pathdino"] = {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "created": now_iso(),
                    "encoder": encoder,
                    "tile_store": tile_store,
                    "features": list(features),
                    "slides": {},
                    "failures": {},
                }
                root.require_group("slides")
        self._clean_stale_staging()

    def _store(self) -> zarr.storage.LocalStore:
        return zarr.storage.LocalStore(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The store's lock file (flock): index updates and renames into ``slides/`` happen under it."""
        with open(self.work.lock, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def meta(self) -> dict[str, Any]:
        return dict(zarr.open_group(store=self._store(), mode="r").attrs["pathdino"])

    def _update(self, change) -> None:
        with self.lock():
            self._apply(change)

    def _apply(self, change) -> None:
        """Read-modify-write the root index; the caller holds the lock."""
        root = zarr.open_group(store=self._store(), mode="r+")
        meta = dict(root.attrs["pathdino"])
        meta["slides"], meta["failures"] = dict(meta.get("slides", {})), dict(meta.get("failures", {}))
        change(meta)
        root.attrs["pathdino"] = meta

    def entry(self, slide_id: str) -> dict[str, Any] | None:
        """The index entry of a complete slide, or None."""
        return self.meta().get("slides", {}).get(slide_id)

    def h5_path(self, slide_id: str) -> Path:
        return self.work.h5 / f"{slide_id}.h5"

    def write_slide(
        self,
        slide_id: str,
        arrays: dict[str, np.ndarray],
        coords: np.ndarray,
        attrs: dict[str, Any],
        index_entry: dict[str, Any],
    ) -> None:
        """Write one slide's arrays in a staging folder, move it into ``slides/`` and add it to the index."""
        staging = self.work.staging / f"{slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            group = zarr.open_group(store=zarr.storage.LocalStore(staging), mode="w")
            n = int(coords.shape[0])
            for name, values in arrays.items():
                rows = max(1, min(n, max(1, (8 << 20) // max(1, values.shape[1] * 4))))  # ~8 MiB chunks
                group.create_array(
                    name, data=np.ascontiguousarray(values, dtype=np.float32), chunks=(rows, values.shape[1])
                )
            group.create_array(
                "coords", data=np.asarray(coords, dtype=np.int64), chunks=(max(1, n), 2), compressors=None
            )
            group.attrs["pathdino"] = attrs
            self.commit_staged(slide_id, staging, index_entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def commit_staged(self, slide_id: str, staged: Path, index_entry: dict[str, Any]) -> None:
        """Move a finished staging group (coords and attributes written) into ``slides/`` and list it; both under
        one hold of the lock, so a kill leaves either the old state or the new one. Used for every slide."""
        final = self.path / "slides" / slide_id
        n = int(zarr.open_array(store=zarr.storage.LocalStore(staged / "coords"), mode="r").shape[0])

        def publish(meta: dict[str, Any]) -> None:
            meta["slides"][slide_id] = {**index_entry, "n_tiles": n, "committed": now_iso()}
            meta["failures"].pop(slide_id, None)

        with self.lock():
            publish_dir(staged, final)
            self._apply(publish)
            self._journal(slide_id, n)

    def _journal(self, slide_id: str, n_tiles: int) -> None:
        """One line per commit in ``commits.jsonl`` (who committed what, when); the caller holds the lock."""
        record = {
            "slide_id": slide_id,
            "n_tiles": n_tiles,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rank": os.environ.get("RANK"),
            "time": now_iso(),
        }
        with open(self.work.journal, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def forget(self, slide_id: str) -> None:
        """Drop a slide from the index (before it is recomputed, so a killed rerun never shows stale data)."""
        self._update(lambda meta: meta["slides"].pop(slide_id, None))

    def record_failure(self, slide_id: str, failure: dict[str, Any]) -> None:
        self._update(lambda meta: meta["failures"].__setitem__(slide_id, {**failure, "time": now_iso()}))

    def set_features(self, features: tuple[str, ...]) -> None:
        """Record the union of feature arrays slides may hold (``EmbeddingStore`` checks it)."""

        def change(meta: dict[str, Any]) -> None:
            meta["features"] = sorted(set(meta.get("features", [])) | set(features), key=FEATURE_NAMES.index)

        self._update(change)

    def _clean_stale_staging(self) -> None:
        root, assembly = self.work.staging, self.work.assembly
        leftovers = [
            *(root.glob("*.*.*") if root.is_dir() else []),
            *(assembly.glob(".tmp.*") if assembly.is_dir() else []),
        ]
        for path in leftovers:  # staging folders of processes killed on this host
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def read_commits(url: str | Path) -> list[dict[str, Any]]:
    """Every commit recorded in the store's ``commits.jsonl`` (a slide recomputed later appears again)."""
    path = work_files(url).journal
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def write_h5(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: dict[str, Any],
    file_attrs: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """A CLAM/TRIDENT-style HDF5: ``features`` float32 [N, D], ``coords`` int64 [N, 2] (level-0 x, y) with the
    patch-size attributes on ``coords`` (where CLAM and TRIDENT put them); written to a temporary name, then renamed.
    """
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            h5.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for name, values in (extra or {}).items():
                h5.create_dataset(name, data=np.asarray(values, dtype=np.float32))
            for key, value in coords_attrs.items():
                if value is not None:
                    h5["coords"].attrs[key] = value
            for key, value in file_attrs.items():
                if value is not None:
                    h5.attrs[key] = value
    return path
