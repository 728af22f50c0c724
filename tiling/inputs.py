"""Turning `pathdino tile INPUTS...` into a deterministic list of slides, and splitting it across machines."""

from __future__ import annotations

import collections
import csv
import errno
import glob
import math
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from tiling.dicom import group_series, looks_like_dicom
from tiling.errors import PathdinoError
from tiling.reader_warnings import collect_library_warnings, summarise_warnings
from tiling.readers import special_file_kind
from tiling.slide_ids import make_ids_unique
from tiling.store import safe_slide_id

# Extensions OpenSlide or tiffslide can open. `.mrxs` slides are a file plus a folder of the same name.
SLIDE_EXTENSIONS = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".tif",
    ".tiff",
    ".svslide",
    ".dcm",
    ".qptiff",
)


class InputError(PathdinoError):
    """An input path, glob or manifest that cannot be turned into slides."""


@dataclass(frozen=True)
class SlideInput:
    """One slide to tile: where it is, the group name it gets, and an optional mpp override."""

    path: Path
    slide_id: str
    mpp_override: float | None = None
    source_id: str | None = None  # the id as given, when it had to be made safe (or unique)
    id_given: bool = False  # the id comes from a manifest's slide_id column (never renamed)


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
    """A file (or folder) met while collecting inputs that is not tiled, and why."""

    path: Path
    reason: str  # counted in the summary ("unknown extension", "a dangling symlink", ...)
    detail: str = ""  # shown when listed (the symlink's target, the first path of a duplicate, ...)

    def describe(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def _link_problem(path: Path) -> SkippedFile | None:
    """Why a symlink cannot be followed (None when it can): dangling, or a loop."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return SkippedFile(path, "a symlink loop", "the link leads back to itself")
        try:
            return SkippedFile(path, "a dangling symlink", f"its target {os.readlink(path)} does not exist")
        except OSError:
            return SkippedFile(path, "cannot be read", exc.strerror or str(exc))
    return None


@dataclass
class _Found:
    slides: list[Path] = field(default_factory=list)
    dicom: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    folders_seen: dict[tuple[int, int], Path] = field(default_factory=dict)  # (st_dev, st_ino) -> first path

    def add_file(self, path: Path, *, any_extension: bool = False) -> None:
        """A file met in the inputs: a slide, a DICOM file, or skipped with its reason. Files that are not regular
        files (FIFOs, sockets, devices) are never opened: reading a FIFO blocks forever."""
        if path.is_symlink() and (problem := _link_problem(path)):
            self.skipped.append(problem)
            return
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            self.skipped.append(SkippedFile(path, "cannot be read", exc.strerror or str(exc)))
            return
        if not stat.S_ISREG(mode):
            self.skipped.append(SkippedFile(path, "not a regular file", special_file_kind(mode) or "unknown kind"))
        elif _is_slide(path):
            self.slides.append(path)
        elif looks_like_dicom(path):
            self.dicom.append(path)
        elif any_extension:
            self.slides.append(path)
        else:
            self.skipped.append(SkippedFile(path, "unknown extension"))

    def enter_folder(self, folder: Path) -> bool:
        """Whether to search `folder`: each real folder once, however many symlinks lead to it (no loops)."""
        try:
            st = folder.stat()
        except OSError as exc:
            self.skipped.append(_link_problem(folder) or SkippedFile(folder, "cannot be read", exc.strerror or ""))
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.folders_seen:
            self.skipped.append(
                SkippedFile(
                    folder,
                    "a folder already searched (a symlink to it, or a loop)",
                    f"first searched as {self.folders_seen[key]}",
                )
            )
            return False
        self.folders_seen[key] = folder
        return True


def _walk_folder(folder: Path, found: _Found) -> None:
    """Search `folder` recursively, following symlinked folders, each real folder once (see _Found.enter_folder)."""
    if not found.enter_folder(folder):
        return
    for root, dirs, files in os.walk(folder, followlinks=True):
        for name in sorted(files):
            found.add_file(Path(root) / name)
        # a MIRAX slide's data folder sits next to its .mrxs file: don't look inside it
        dirs[:] = [
            d for d in sorted(dirs) if not (Path(root) / f"{d}.mrxs").exists() and found.enter_folder(Path(root) / d)
        ]


def _parse_mpp(value: str, where: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise InputError(f"{where}: mpp {value!r} is not a number") from None
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"{where}: mpp must be a positive number of µm/px, got {mpp}")
    return mpp


def read_manifest(path: Path) -> list[SlideInput]:
    """Read a manifest CSV with columns `path[,slide_id][,mpp]`; relative paths are relative to the CSV."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise InputError(f"manifest {path}: needs a 'path' column (columns: path[,slide_id][,mpp]); found {fields}")
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
            slides.append(_make_input(slide_path, raw_id, mpp, id_given=bool(row.get("slide_id"))))
    return slides


def _make_input(path: Path, raw_id: str, mpp: float | None, *, id_given: bool = False) -> SlideInput:
    safe = safe_slide_id(raw_id)
    return SlideInput(
        path=path, slide_id=safe, mpp_override=mpp, source_id=None if safe == raw_id else raw_id, id_given=id_given
    )


@dataclass
class InputScan:
    """Every slide found in the inputs, every file met but not tiled (with its reason), and notes for the user."""

    slides: list[SlideInput]
    skipped: list[SkippedFile]
    notes: list[str] = field(default_factory=list)  # e.g. slide ids made unique
    reader_warnings: list[str] = field(default_factory=list)  # what pydicom warned about while reading headers

    def format_counts(self) -> dict[str, int]:
        """Slides per format (svs, tiff, dicom, ...), most common first."""
        counts = collections.Counter(slide_format(s.path) for s in self.slides)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def skip_counts(self) -> dict[str, int]:
        """Skipped files per reason, most common first."""
        counts = collections.Counter(f.reason for f in self.skipped)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_slide_mpp(slide_mpp: float | None) -> None:
    """`--slide-mpp` must be a positive, finite number of µm/px (0, inf or nan would fail every slide later)."""
    if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise InputError(f"--slide-mpp must be a positive number of µm per level-0 pixel (e.g. 0.25), got {slide_mpp}")


def scan_inputs(inputs: list[str], slide_mpp: float | None = None) -> InputScan:
    """Expand files, folders (recursive), globs and manifest CSVs into slides sorted by id, plus skipped files.

    DICOM files are grouped into slides by SeriesInstanceUID wherever they sit (see tiling.dicom); label and
    overview images and non-slide DICOM are skipped with a reason, as are FIFOs, sockets and devices (never
    opened) and dangling or looping symlinks. Symlinked folders are followed, each real folder searched once; a file
    reached through several paths (symlinks) is one slide. `slide_mpp` (the `--slide-mpp` flag) overrides every
    slide's mpp unless its manifest row gives one. Slides whose ids collide get a suffix (tiling.slide_ids; said in
    `notes`); only ids given in a manifest's slide_id column that collide are an error.
    """
    check_slide_mpp(slide_mpp)
    manifest: list[SlideInput] = []
    found = _Found()
    for item in inputs:
        path = Path(item).expanduser()
        if path.suffix.lower() == ".csv" and path.is_file():
            manifest.extend(read_manifest(path))
        elif path.is_dir():
            n_before = len(found.slides) + len(found.dicom)
            _walk_folder(path, found)
            if len(found.slides) + len(found.dicom) == n_before:
                raise InputError(
                    f"{path}: no slide files found (extensions: {', '.join(SLIDE_EXTENSIONS)}, or DICOM files)"
                )
        elif os.path.lexists(path):
            found.add_file(path, any_extension=True)  # a file named on the command line is a slide, any extension
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"{item}: no such file, folder or glob match")
            for match in map(Path, matches):
                if match.is_dir():
                    _walk_folder(match, found)
                else:
                    found.add_file(match)
    slides = _regular_only(manifest, found)
    slides.extend(_make_input(p, _slide_id_for(p), None) for p in _distinct_files(found, found.slides))
    with collect_library_warnings() as header_warnings:  # pydicom warns on stderr about odd header values
        series, dicom_skipped = group_series(_distinct_files(found, found.dicom), set(found.slides))
    slides.extend(_make_input(s.open_path, s.default_id, None) for s in series)
    skipped = found.skipped + [SkippedFile(h.path, h.skip_reason) for h in dicom_skipped]
    if slide_mpp is not None:
        slides = [s if s.mpp_override is not None else replace(s, mpp_override=slide_mpp) for s in slides]
    try:
        unique, notes = make_ids_unique(slides)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    scan = InputScan(
        unique, sorted(set(skipped), key=lambda f: str(f.path)), notes, summarise_warnings(header_warnings)
    )
    if not scan.slides:
        skips = ", ".join(f"{n} {why}" for why, n in scan.skip_counts().items())
        raise InputError(f"no slides found in {' '.join(inputs)}; skipped {len(scan.skipped)} file(s): {skips}")
    return scan


def _regular_only(slides: list[SlideInput], found: _Found) -> list[SlideInput]:
    """Manifest rows naming a FIFO, socket or device are skipped (opening one would block the run)."""
    keep = []
    for s in slides:
        try:
            mode = s.path.stat().st_mode
        except OSError:
            keep.append(s)  # a missing file fails when the slide is opened, with the reader's message
            continue
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            keep.append(s)
        else:
            found.skipped.append(SkippedFile(s.path, "not a regular file", special_file_kind(mode) or "unknown kind"))
    return keep


def _distinct_files(found: _Found, paths: list[Path]) -> list[Path]:
    """`paths` with every file reached more than once (symlinks, overlapping inputs) kept once: the path that is
    not a symlink if there is one, else the first in sorted order; the others are listed as skipped."""
    by_target: dict[str, list[Path]] = collections.defaultdict(list)
    for p in sorted(set(paths)):
        by_target[os.path.realpath(p)].append(p)
    kept = []
    for group in by_target.values():
        first = min(group, key=lambda p: (p.is_symlink(), str(p)))
        kept.append(first)
        found.skipped.extend(
            SkippedFile(p, "the same file as another input (a symlink)", f"tiled as {first}")
            for p in group
            if p != first
        )
    return kept


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
        values = {}
        for name, default in (
            ("SLURM_ARRAY_TASK_ID", None),
            ("SLURM_ARRAY_TASK_COUNT", None),
            ("SLURM_ARRAY_TASK_MIN", "0"),
        ):
            text = env.get(name, default)
            try:
                values[name] = int(str(text).strip())
            except ValueError:
                raise InputError(
                    f"environment variable {name}={text!r} is not an integer; SLURM sets it inside a "
                    "job array (--array); outside one, unset it or pass --shard i/N"
                ) from None
        index = values["SLURM_ARRAY_TASK_ID"] - values["SLURM_ARRAY_TASK_MIN"]
        count = values["SLURM_ARRAY_TASK_COUNT"]
    else:
        return 0, 1
    if not (count >= 1 and 0 <= index < count):
        raise InputError(f"shard {index}/{count}: need 0 <= i < N")
    return index, count


def select_shard(slides: list[SlideInput], index: int, count: int) -> list[SlideInput]:
    """Every count-th slide of the id-sorted list, starting at index: the same split on every machine."""
    return sorted(slides, key=lambda s: s.slide_id)[index::count]
