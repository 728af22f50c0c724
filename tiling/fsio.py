"""Filesystem helpers shared by every package: atomic writes, folder publishing, reading a JSON file or raising,
file hashes, timestamps, pids.

One rule behind them (DEVELOPERS.md): bad input or a kill never leaves a half-written file where a reader looks.
Everything is written to a temporary name in the same folder, made durable (fsync), then renamed into place;
``os.replace`` is atomic on POSIX within one filesystem, so readers see the old file or the new one, never a mix.

This module lives at the bottom of the import graph (``tiling`` never imports torch or ``pathdino``; ``pathdino``
imports ``tiling``), so both can use it. It imports only the standard library and numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def now_iso() -> str:
    """The current UTC time as ISO 8601 with seconds (``2026-01-31T12:00:00+00:00``), for provenance records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (staging folders carry their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so the names created or renamed in it survive a crash (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(path: Path) -> Path:
    # hidden, beside the target (same filesystem: the rename stays atomic), unique per writer
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends cleanly, fsync it and rename it to ``path``.

    For writers that want a file name (h5py, safetensors, PIL): ``with atomic_path(p) as tmp: save_file(sd, tmp)``.
    On an exception the temporary file is removed and ``path`` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); returns ``path``."""
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(
    path: str | Path, payload: Any, *, indent: int | None = 2, fsync: bool = True, **dumps_kwargs: Any
) -> Path:
    """Write ``payload`` as JSON (plus a final newline) to ``path`` atomically; ``dumps_kwargs`` go to json.dumps."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, **dumps_kwargs) + "\n", fsync=fsync)


def read_json(path: str | Path, *, error: type[Exception], expect: type = dict, hint: str = "") -> Any:
    """The JSON value in ``path``, which must be a ``expect`` (a JSON object by default, or ``list``).

    Anything else raises ``error`` naming the file and what is wrong: unreadable (missing, a folder, no
    permission), not valid JSON, or another JSON type; ``hint`` (what the user should do) ends the message.
    """
    path = Path(path)
    kind = {dict: "object", list: "list"}.get(expect, expect.__name__)
    end = f"; {hint}" if hint else ""
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc}){end}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){end}") from exc
    if not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {kind}, found {type(value).__name__}{end}")
    return value


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a ``.safetensors`` file (truncated, not safetensors), or None when its header and length
    agree. Reads the header only (a few KB), so a damaged checkpoint or encoder is found before any work starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                return f"truncated or not a safetensors file ({size:,} bytes)"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid (truncated or not a safetensors file)"
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    return None


def zip_problem(path: str | Path) -> str | None:
    """What is wrong with a zip-based file (``torch.save``'s format), or None when its directory reads."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except zipfile.BadZipFile:
        return f"truncated or damaged ({Path(path).stat().st_size:,} bytes)"
    return None


def to_jsonable(obj: object) -> object:
    """Plain JSON types: numpy/torch arrays and scalars become lists and numbers, NaN/inf None, paths strings."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or (hasattr(obj, "tolist") and hasattr(obj, "dtype")):  # numpy, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder`` and the folders themselves: the bytes are durable before a rename."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def publish_dir(staged: str | Path, final: str | Path, *, fsync: bool = True) -> Path:
    """Move a fully written folder ``staged`` to ``final`` (same filesystem), replacing what is there.

    With ``fsync`` its contents are made durable first. An existing ``final`` is first renamed aside and deleted
    only after the new folder is in place, so a crash leaves the old folder or the new one, never neither.
    """
    staged, final = Path(staged), Path(final)
    if fsync:
        fsync_tree(staged)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    if fsync:
        fsync_dir(final.parent)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return final


def check_format(
    meta: Mapping[str, Any],
    *,
    where: str | Path,
    kind: str,
    format_name: str,
    format_version: int,
    error: type[Exception],
    not_this_format: str,
    other_version: str,
) -> None:
    """Raise ``error`` unless a store's ``attrs['pathdino']`` names ``format_name`` at ``format_version``.

    ``kind`` says what the store should be ("pathdino tile store"); ``not_this_format`` / ``other_version`` finish
    the message with what the user should do.
    """
    if meta.get("format") != format_name:
        raise error(
            f"{where} is a Zarr group but not a {kind} (no attrs['pathdino']['format'] == "
            f"{format_name!r}). {not_this_format}"
        )
    version = meta.get("format_version")
    if version != format_version:
        raise error(
            f"{where} has {kind} format version {version!r}; this pathdino reads version "
            f"{format_version}. {other_version}"
        )
