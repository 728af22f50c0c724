"""Turning `pathdino tile INPUTS...` into a deterministic list of slides, and splitting it across machines."""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from tiling.store import safe_slide_id

# Extensions OpenSlide or tiffslide can open. `.mrxs` slides are a file plus a folder of the same name.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".tif", ".tiff", ".svslide",
                    ".dcm", ".qptiff")


class InputError(Exception):
    """An input path, glob or manifest that cannot be turned into slides."""


@dataclass(frozen=True)
class SlideInput:
    """One slide to tile: where it is, the group name it gets, and an optional mpp override."""

    path: Path
    slide_id: str
    mpp_override: float | None = None
    source_id: str | None = None  # the id as given, when it had to be made safe


def _slide_id_for(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _is_slide(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SLIDE_EXTENSIONS)


def _dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _dicom_input(folder: Path) -> SlideInput:
    """A DICOM WSI series is a folder; OpenSlide opens it through any one of its files."""
    first = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")[0]
    return _make_input(first, folder.name, None)


def _from_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() == ".dcm":
                continue  # DICOM series are opened by folder, below
            if _is_slide(path):
                found.append(path)
        for d in dirs:
            if _dicom_folder(Path(root) / d):
                found.append(Path(root) / d)
        # a MIRAX slide's data folder sits next to its .mrxs file: don't look inside it
        dirs[:] = [d for d in dirs if not (Path(root) / f"{d}.mrxs").exists() and not _dicom_folder(Path(root) / d)]
    return found


def _parse_mpp(value: str, where: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise InputError(f"{where}: mpp {value!r} is not a number") from None
    if not mpp > 0:
        raise InputError(f"{where}: mpp must be > 0, got {mpp}")
    return mpp


def read_manifest(path: Path) -> list[SlideInput]:
    """Read a manifest CSV with columns `path[,slide_id][,mpp]`; relative paths are relative to the CSV."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise InputError(f"manifest {path}: needs a 'path' column (columns: path[,slide_id][,mpp]); "
                             f"found {fields}")
        slides = []
        for line_no, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                raise InputError(f"manifest {path}, line {line_no}: empty path")
            slide_path = Path(row["path"]).expanduser()
            if not slide_path.is_absolute():
                slide_path = (path.parent / slide_path).resolve()
            raw_id = row.get("slide_id") or _slide_id_for(slide_path)
            mpp = _parse_mpp(row.get("mpp", ""), f"manifest {path}, line {line_no}")
            slides.append(_make_input(slide_path, raw_id, mpp))
    return slides


def _make_input(path: Path, raw_id: str, mpp: float | None) -> SlideInput:
    safe = safe_slide_id(raw_id)
    return SlideInput(path=path, slide_id=safe, mpp_override=mpp, source_id=None if safe == raw_id else raw_id)


def collect_slides(inputs: list[str], slide_mpp: float | None = None) -> list[SlideInput]:
    """Expand files, folders (recursive, by extension), globs and manifest CSVs into slides sorted by id.

    `slide_mpp` (the `--slide-mpp` flag) overrides every slide's mpp unless its manifest row gives one.
    Duplicate slide ids are an error (two slides would write the same group).
    """
    slides: list[SlideInput] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.suffix.lower() == ".csv" and path.is_file():
            slides.extend(read_manifest(path))
        elif path.is_dir() and not _dicom_folder(path):
            found = _from_folder(path)
            if not found:
                raise InputError(f"{path}: no slide files found (extensions: {', '.join(SLIDE_EXTENSIONS)})")
            slides.extend(_dicom_input(p) if p.is_dir() else _make_input(p, _slide_id_for(p), None) for p in found)
        elif _dicom_folder(path):
            slides.append(_dicom_input(path))
        elif path.exists():
            slides.append(_make_input(path, _slide_id_for(path), None))
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"{item}: no such file, folder or glob match")
            for match in map(Path, matches):
                if _dicom_folder(match):
                    slides.append(_dicom_input(match))
                elif _is_slide(match):
                    slides.append(_make_input(match, _slide_id_for(match), None))
    if slide_mpp is not None:
        slides = [s if s.mpp_override is not None else SlideInput(s.path, s.slide_id, slide_mpp, s.source_id)
                  for s in slides]
    seen: dict[str, Path] = {}
    for s in slides:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise InputError(f"slide id {s.slide_id!r} is used by both {seen[s.slide_id]} and {s.path}; give "
                             "unique ids with a manifest CSV (path,slide_id)")
        seen[s.slide_id] = s.path
    unique = {s.slide_id: s for s in slides}
    return [unique[k] for k in sorted(unique)]


def parse_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """`--shard i/N` (0-based i), else SLURM array variables, else (0, 1)."""
    env = dict(os.environ if env is None else env)
    if spec:
        try:
            index_s, count_s = spec.split("/")
            index, count = int(index_s), int(count_s)
        except ValueError:
            raise InputError(f"--shard {spec!r}: expected i/N, e.g. 0/4") from None
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        return 0, 1
    if not (count >= 1 and 0 <= index < count):
        raise InputError(f"shard {index}/{count}: need 0 <= i < N")
    return index, count


def select_shard(slides: list[SlideInput], index: int, count: int) -> list[SlideInput]:
    """Every count-th slide of the id-sorted list, starting at index: the same split on every machine."""
    return sorted(slides, key=lambda s: s.slide_id)[index::count]
