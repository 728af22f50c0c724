"""Labelled tile datasets that users download themselves (NCT-CRC-HE-100K, MHIST, BACH, ...).

Two layouts are read:

- **folder**: ``root/<class>/*.{png,jpg,jpeg,tif,tiff}``; or with given splits
  ``root/{train,val,test}/<class>/*``. Class names are the folder names, sorted.
- **CSV**: columns ``path,label[,split][,patient]``; ``path`` is relative to the CSV's folder (absolute paths are
  kept). Labels are strings; they are sorted numerically when all are integers, else alphabetically.

Splits come from the ``split`` column (``train``/``val``/``test``; ``training``, ``valid``, ``validation``,
``testing`` are accepted aliases) or the split folders. Otherwise a seeded stratified split is drawn; when a
``patient`` column exists the split is patient-level (each patient is assigned whole to one split, stratified by
the patient's most frequent label). Rows with an empty ``patient`` count as their own patient.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiling.errors import MissingFileError, PathdinoError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class DatasetError(PathdinoError, ValueError):
    """A labelled tile set (class folders or CSV) or a labels CSV that cannot be used as given; the message names
    the file (and line) and what to change."""


@dataclass(frozen=True)
class TileRecord:
    """One labelled tile image on disk."""

    path: Path
    label: int  # index into TileDataset.class_names
    patient: str | None = None  # patient/slide id used for patient-level splits; None when unknown


@dataclass(frozen=True)
class TileDatasetSpec:
    """Where a labelled tile dataset lives and how to split it when no split is given."""

    source: Path  # a class-folder root or a CSV file
    val_fraction: float = 0.15  # share of each class (or of each class's patients) drawn for validation
    test_fraction: float = 0.15  # share drawn for test; both only apply when the source gives no splits
    seed: int = 0  # seed of the stratified split

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"TileDatasetSpec.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"TileDatasetSpec: val_fraction + test_fraction must be < 1 (got "
                f"{self.val_fraction} + {self.test_fraction}); nothing would be left to train on"
            )


@dataclass(frozen=True)
class TileDataset:
    """A loaded dataset: class names and the records of each split (``train``, ``val``, ``test``)."""

    source: Path
    layout: str  # "folder", "folder-splits" or "csv"
    class_names: tuple[str, ...]
    splits: Mapping[str, tuple[TileRecord, ...]] = field(repr=False)
    split_origin: str  # "given" (CSV column / split folders), "stratified" or "patient-stratified"

    def records(self, split: str) -> tuple[TileRecord, ...]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.splits.get(split, ())

    def summary(self) -> dict[str, object]:
        """JSON-friendly counts per split and class."""
        per_split = {}
        for split in SPLITS:
            recs = self.records(split)
            counts = Counter(r.label for r in recs)
            per_split[split] = {
                "n": len(recs),
                "per_class": {name: counts.get(i, 0) for i, name in enumerate(self.class_names)},
                "n_patients": len({r.patient for r in recs if r.patient is not None}),
            }
        return {
            "source": str(self.source),
            "layout": self.layout,
            "class_names": list(self.class_names),
            "split_origin": self.split_origin,
            "splits": per_split,
        }


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test counts for a stratum of ``n`` items, always leaving at least one for training."""
    n_val = math.floor(n * val_fraction + 0.5)
    n_test = math.floor(n * test_fraction + 0.5)
    while n_val + n_test > max(n - 1, 0):
        if n_val >= n_test:  # on a tie keep the test item: a class missing from test is worse than from val
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def stratified_split(
    labels: Sequence[int],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Split name (``train``/``val``/``test``) per item, stratified by label.

    With ``groups`` (e.g. patient ids) whole groups are assigned, stratified by each group's most frequent
    label (ties: the lowest label), so no group spans two splits.
    """
    if groups is None:
        groups = [f"#{i}" for i in range(len(labels))]
    if len(groups) != len(labels):
        raise ValueError(f"stratified_split: {len(labels)} labels but {len(groups)} groups")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for g, idx in members.items():
        counts = Counter(labels[i] for i in idx)
        top = max(counts.values())
        strata[min(lab for lab, c in counts.items() if c == top)].append(g)
    rng = np.random.default_rng(seed)
    out = ["train"] * len(labels)
    for label in sorted(strata):
        gs = sorted(strata[label])
        order = rng.permutation(len(gs))
        n_val, n_test = _split_counts(len(gs), val_fraction, test_fraction)
        for rank, j in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            for i in members[gs[j]]:
                out[i] = split
    return out


def _sorted_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _class_folders(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"{root}: no class folders found; expected root/<class>/*.png|jpg|tif or a CSV with path,label columns"
        )
    found = {}
    for folder in classes:
        images = _images_in(folder)
        if not images:
            raise DatasetError(
                f"{folder}: class {folder.name!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add tiles or remove the folder"
            )
        found[folder.name] = images
    return found


def _read_folder(root: Path) -> tuple[str, list[str], dict[str, list[tuple[Path, str, str | None]]]]:
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if subdirs and subdirs <= set(SPLITS):
        rows: dict[str, list[tuple[Path, str, str | None]]] = {}
        names: set[str] = set()
        for split in sorted(subdirs):
            per_class = _class_folders(root / split)
            names |= per_class.keys()
            rows[split] = [(p, c, None) for c, ps in per_class.items() for p in ps]
        return "folder-splits", _sorted_labels(names), rows
    per_class = _class_folders(root)
    return "folder", _sorted_labels(set(per_class)), {"": [(p, c, None) for c, ps in per_class.items() for p in ps]}


def _read_csv(csv_path: Path) -> tuple[list[str], dict[str, list[tuple[Path, str, str | None]]], bool]:
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise DatasetError(f"{csv_path}: empty CSV; expected a header path,label[,split][,patient]")
        columns = {name.strip().lower(): name for name in reader.fieldnames if name is not None}
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DatasetError(
                f"{csv_path}: missing column(s) {missing}; found {list(reader.fieldnames)}; "
                "expected a header path,label[,split][,patient]"
            )
        has_split = "split" in columns
        has_patient = "patient" in columns
        rows: dict[str, list[tuple[Path, str, str | None]]] = defaultdict(list)
        missing_files: list[str] = []
        for row in reader:
            line = reader.line_num
            rel = (row.get(columns["path"]) or "").strip()
            label = (row.get(columns["label"]) or "").strip()
            if not rel or not label:
                raise DatasetError(f"{csv_path}, line {line}: empty path or label ({row})")
            path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
            if not path.is_file():
                missing_files.append(f"line {line}: {path}")
            split = ""
            if has_split:
                raw = (row.get(columns["split"]) or "").strip().lower()
                if raw not in _SPLIT_ALIASES:
                    raise DatasetError(
                        f"{csv_path}, line {line}: unknown split {raw!r}; expected one of {SPLITS} "
                        "(or training/valid/validation/testing)"
                    )
                split = _SPLIT_ALIASES[raw]
            patient = None
            if has_patient:
                patient = (row.get(columns["patient"]) or "").strip() or None
            rows[split].append((path, label, patient))
    if missing_files:
        shown = "; ".join(missing_files[:5])
        raise MissingFileError(f"{csv_path}: {len(missing_files)} listed file(s) do not exist: {shown}")
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; expected at least one path,label row")
    names = _sorted_labels({label for rs in rows.values() for _, label, _ in rs})
    return names, dict(rows), has_patient


def load_tile_dataset(spec: TileDatasetSpec | str | Path) -> TileDataset:
    """Read a class-folder root or a CSV into a split :class:`TileDataset` (see the module docstring)."""
    if not isinstance(spec, TileDatasetSpec):
        spec = TileDatasetSpec(source=Path(spec))
    source = spec.source
    if not source.exists():
        raise MissingFileError(f"dataset source {source} does not exist; pass a class-folder root or a CSV")
    has_patient = False
    if source.is_dir():
        layout, names, rows = _read_folder(source)
    elif source.suffix.lower() == ".csv":
        layout = "csv"
        names, rows, has_patient = _read_csv(source)
    else:
        raise DatasetError(f"dataset source {source} is neither a folder nor a .csv file")
    index = {name: i for i, name in enumerate(names)}

    def records(items: list[tuple[Path, str, str | None]]) -> list[TileRecord]:
        return [TileRecord(path=p, label=index[lab], patient=pat) for p, lab, pat in items]

    if "" in rows:  # no split given: draw one
        recs = records(rows[""])
        groups = [r.patient if r.patient is not None else f"#row{i}" for i, r in enumerate(recs)]
        names_per_item = stratified_split(
            [r.label for r in recs],
            val_fraction=spec.val_fraction,
            test_fraction=spec.test_fraction,
            seed=spec.seed,
            groups=groups if has_patient else None,
        )
        splits = {s: tuple(r for r, n in zip(recs, names_per_item) if n == s) for s in SPLITS}
        origin = "patient-stratified" if has_patient else "stratified"
    else:
        splits = {s: tuple(records(rows.get(s, []))) for s in SPLITS}
        origin = "given"
        _warn_patient_overlap(source, splits)
    train_labels = {r.label for r in splits["train"]}
    absent = [names[i] for i in range(len(names)) if i not in train_labels]
    if absent:
        raise DatasetError(f"{source}: class(es) {absent} have no training tiles; every class needs at least one")
    return TileDataset(source=source, layout=layout, class_names=tuple(names), splits=splits, split_origin=origin)


def _warn_patient_overlap(source: Path, splits: Mapping[str, Sequence[TileRecord]]) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for r in splits.get(split, ()):
            if r.patient is None:
                continue
            first = seen.setdefault(r.patient, split)
            if first != split:
                warnings.warn(
                    f"{source}: patient {r.patient!r} appears in both {first!r} and {split!r}; "
                    "given splits are kept as they are, but results may be optimistic",
                    stacklevel=3,
                )
                return


class TileImageDataset:
    """Map-style dataset over :class:`TileRecord` s returning ``(transform(image), label)``.

    Images are opened with PIL and converted to RGB. It needs no torch import, but plugs into a DataLoader.
    """

    def __init__(self, records: Sequence[TileRecord], transform: Callable[[object], object] | None = None):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[object, int]:
        from PIL import Image  # deferred: PIL is only needed when pixels are read

        rec = self.records[i]
        try:
            with Image.open(rec.path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read tile image {rec.path}: {exc}") from exc
        return (self.transform(image) if self.transform is not None else image), rec.label
