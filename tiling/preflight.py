"""Checks on `--out` made before any work: a wrong output path should cost one line, not a scan or a traceback."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tiling.store import SIDECAR_SUFFIX, StoreError, is_remote_url, local_root


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_path(out: str, inputs: list[str], *, probe_write: bool = True) -> None:
    """Raise StoreError (one line, saying what to do) when `out` cannot be a tile store for these inputs.

    Refused: an empty path; an existing file; an existing folder that is neither empty nor a tile store; a store
    that is, or lies inside, an input folder (its own files would be read as inputs by the next run); a place this
    process cannot write to. With `probe_write` a temporary folder is created and removed where the store will go
    (the only sure test, e.g. for root on a read-only mount); without it (`--dry-run`) permissions are only looked at.
    Fsspec URLs are not checked here.
    """
    if not out.strip():
        raise StoreError("--out is empty: give the tile store's folder, e.g. --out tiles.zarr")
    if is_remote_url(out):
        return
    root = local_root(out)
    if root.is_file():
        raise StoreError(f"--out {out} is an existing file; the tile store is a folder: choose another path")
    for item in inputs:
        folder = Path(item).expanduser()
        if folder.is_dir() and _inside(root, folder.resolve()):
            where = "is" if root == folder.resolve() else "is inside"
            raise StoreError(
                f"--out {out} {where} the input folder {item}: the store's files would be read as slide "
                f"inputs by the next run; put the store beside it, e.g. --out "
                f"{folder.resolve().parent / (folder.resolve().name + '-tiles.zarr')}"
            )
    if root.is_dir() and any(root.iterdir()) and not (root / "zarr.json").exists():
        raise StoreError(
            f"--out {out} is a folder with other files in it, not a tile store: choose a new folder "
            "(e.g. beside the slides: --out tiles.zarr)"
        )
    for target in (root, root.with_name(root.name + SIDECAR_SUFFIX)):
        base = _nearest_existing(target)
        if not base.is_dir():
            raise StoreError(f"--out {out}: {base} is a file, so {target} cannot be created; choose another path")
        if not os.access(base, os.W_OK | os.X_OK):
            raise StoreError(
                f"--out {out}: cannot write in {base} (permission denied or read-only); "
                "choose a folder you can write to"
            )
        if probe_write:
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".pathdino-write-check-", dir=base))
            except OSError as exc:
                raise StoreError(
                    f"--out {out}: cannot write in {base} ({exc.strerror or exc}); choose a folder you can write to"
                ) from None
