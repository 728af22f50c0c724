"""DICOM whole-slide images: which files belong to which slide, from their headers alone.

A DICOM WSI is a series (one SeriesInstanceUID) of files: one per pyramid level, plus label, overview and thumbnail
images. Files of unrelated series often share a folder, so slides are found by series, never by folder. Only the
header is read (pydicom stops before the pixel data).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# ImageType's third value says what a WSI file holds; these are pictures of the slide, not the tissue pyramid.
NOT_TISSUE_IMAGE_TYPES = {"LABEL": "a DICOM label image", "OVERVIEW": "a DICOM overview (macro) image"}
_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "Modality", "TotalPixelMatrixColumns", "Columns"]


def looks_like_dicom(path: Path) -> bool:
    """A `.dcm` file, or any file with the DICOM preamble ('DICM' at byte 128): DICOM files often have no suffix."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomFile:
    """What the header of one DICOM file says about it."""

    path: Path
    series_uid: str
    width_px: int  # the whole image's width at this file's level (0 when unknown)
    skip_reason: str = ""  # why this file is not (part of) a slide's tissue pyramid; "" when it is


def read_header(path: Path) -> DicomFile:
    """Read the few header fields that decide which slide a file belongs to, or why it is not one."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for "not DICOM"
        return DicomFile(path, "", 0, f"not a readable DICOM file ({type(exc).__name__})")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    width = int(ds.get("TotalPixelMatrixColumns", 0) or ds.get("Columns", 0) or 0)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class != WSI_SOP_CLASS:
        what = ds.get("Modality", "") or sop_class or "unknown"
        return DicomFile(path, series, width, f"a DICOM file that is not a whole-slide image ({what})")
    image_type = [str(v).upper() for v in (ds.get("ImageType", None) or [])]
    flavour = image_type[2] if len(image_type) > 2 else ""
    if flavour in NOT_TISSUE_IMAGE_TYPES:
        return DicomFile(path, series, width, NOT_TISSUE_IMAGE_TYPES[flavour])
    if not series:
        return DicomFile(path, series, width, "a DICOM whole-slide file without a SeriesInstanceUID")
    return DicomFile(path, series, width)


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM slide: the file to open (the largest level) and every tissue file of its series."""

    open_path: Path
    files: tuple[Path, ...]
    default_id: str


def group_series(files: list[Path], sibling_slides: set[Path]) -> tuple[list[DicomSeries], list[DicomFile]]:
    """Group DICOM files into slides by SeriesInstanceUID; returns (series, skipped files with their reason).

    `sibling_slides` are the non-DICOM slide files found alongside, used to name the series: a series that has its
    folder to itself is named after the folder (as a folder of `.dcm` files always was), a lone file after itself,
    anything else after its folder plus a short hash of the series UID.
    """
    headers = [read_header(p) for p in sorted(set(files))]
    skipped = [h for h in headers if h.skip_reason]
    by_series: dict[str, list[DicomFile]] = defaultdict(list)
    for h in headers:
        if not h.skip_reason:
            by_series[h.series_uid].append(h)
    owners: dict[Path, set[str]] = defaultdict(set)  # folder -> series (and other slides) found in it
    for h in headers:
        owners[h.path.parent].add(h.series_uid or str(h.path))
    for p in sibling_slides:
        owners[p.parent].add(str(p))
    series = []
    for uid, members in by_series.items():
        level0 = max(members, key=lambda h: (h.width_px, -len(str(h.path))))
        folder = level0.path.parent
        if owners[folder] == {uid}:
            name = folder.name
        elif len(members) == 1:
            name = level0.path.stem
        else:
            name = f"{folder.name}-{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
        series.append(DicomSeries(level0.path, tuple(sorted(h.path for h in members)), name))
    return sorted(series, key=lambda s: s.open_path), skipped
