"""Turning `pathdino tile INPUTS...` into a deterministic list of slides, and splitting it across machines."""

from __future__ import annotations

import collections
import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from tiling.dicom import group_series, looks_like_dicom
from tiling.errors import PathdinoError
from tiling.store import safe_slide_id

# Extensions OpenSlide or tiffslide can open. `.mrxs` slides are a file plus a folder of the same name.
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".tif", ".tiff", ".svslide",
                    ".dcm", ".qptiff")


class InputError(PathdinoError):
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
    return path.is_file() and path.name.lower().endswith(SLIDE_EXTENSIONS) and path.suffix.lower() != ".dcm"


def slide_format(path: Path) -> str:
    """A short format name for counts and listings: svs, ndpi, tiff, ome-tiff, dicom, ..."""
    name = path.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if path.suffix.lower() == ".dcm" or (path.is_file() and not path.suffix and looks_like_dicom(path)):
        return "dicom"
    return {".tif": "tiff"}.get(path.suffix.lower(), path.suffix.lower().lstrip(".") or "unknown")


@dataclass(frozen=True)
class SkippedFile:
    """A file met while collecting inputs that is not tiled, and why."""

    path: Path
    reason: str


@dataclass
class _Found:
    slides: list[Path] = field(default_factory=list)
    dicom: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def add_file(self, path: Path) -> None:
        if _is_slide(path):
            self.slides.append(path)
        elif looks_like_dicom(path):
            self.dicom.append(path)
        else:
            self.skipped.append(SkippedFile(path, "unknown extension"))


def _walk_folder(folder: Path, found: _Found) -> None:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            found.add_file(Path(root) / name)
        # a MIRAX slide's data folder sits next to its .mrxs file: don't look inside it
        dirs[:] = [d for d in dirs if not (Path(root) / f"{d}.mrxs").exists()]


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


@dataclass
class InputScan:
    """Every slide found in the inputs, and every file met but not tiled, with its reason."""

    slides: list[SlideInput]
    skipped: list[SkippedFile]

    def format_counts(self) -> dict[str, int]:
        """Slides per format (svs, tiff, dicom, ...), most common first."""
        counts = collections.Counter(slide_format(s.path) for s in self.slides)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def skip_counts(self) -> dict[str, int]:
        """Skipped files per reason, most common first."""
        counts = collections.Counter(f.reason for f in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def scan_inputs(inputs: list[str], slide_mpp: float | None = None) -> InputScan:
    """Expand files, folders (recursive), globs and manifest CSVs into slides sorted by id, plus skipped files.

    DICOM files are grouped into slides by SeriesInstanceUID wherever they sit (see tiling.dicom); label and
    overview images and non-slide DICOM are skipped with a reason. `slide_mpp` (the `--slide-mpp` flag) overrides
    every slide's mpp unless its manifest row gives one. Duplicate slide ids are an error (two slides would write
    the same group).
    """
    slides: list[SlideInput] = []
    found = _Found()
    for item in inputs:
        path = Path(item).expanduser()
        if path.suffix.lower() == ".csv" and path.is_file():
            slides.extend(read_manifest(path))
        elif path.is_dir():
            n_before = len(found.slides) + len(found.dicom)
            _walk_folder(path, found)
            if len(found.slides) + len(found.dicom) == n_before:
                raise InputError(f"{path}: no slide files found (extensions: {', '.join(SLIDE_EXTENSIONS)}, "
                                 "or DICOM files)")
        elif path.is_file():
            (found.dicom if looks_like_dicom(path) else found.slides).append(path)
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"{item}: no such file, folder or glob match")
            for match in map(Path, matches):
                if match.is_dir():
                    _walk_folder(match, found)
                elif match.is_file():
                    found.add_file(match)
    slides.extend(_make_input(p, _slide_id_for(p), None) for p in found.slides)
    series, dicom_skipped = group_series(found.dicom, set(found.slides))
    slides.extend(_make_input(s.open_path, s.default_id, None) for s in series)
    skipped = found.skipped + [SkippedFile(h.path, h.skip_reason) for h in dicom_skipped]
    if slide_mpp is not None:
        slides = [s if s.mpp_override is not None else SlideInput(s.path, s.slide_id, slide_mpp, s.source_id)
                  for s in slides]
    scan = InputScan(_unique_by_id(slides), sorted(set(skipped), key=lambda f: str(f.path)))
    if not scan.slides:
        skips = ", ".join(f"{n} {why}" for why, n in scan.skip_counts().items())
        raise InputError(f"no slides found in {' '.join(inputs)}; skipped {len(scan.skipped)} file(s): {skips}")
    return scan


def _unique_by_id(slides: list[SlideInput]) -> list[SlideInput]:
    seen: dict[str, Path] = {}
    for s in slides:
        if s.slide_id in seen and seen[s.slide_id] != s.path:
            raise InputError(f"slide id {s.slide_id!r} is used by both {seen[s.slide_id]} and {s.path}; give "
                             "unique ids with a manifest CSV (path,slide_id)")
        seen[s.slide_id] = s.path
    unique = {s.slide_id: s for s in slides}
    return [unique[k] for k in sorted(unique)]


def collect_slides(inputs: list[str], slide_mpp: float | None = None) -> list[SlideInput]:
    """The slides of `scan_inputs` (files not tiled are dropped from the answer, see scan_inputs)."""
    return scan_inputs(inputs, slide_mpp).slides


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
