"""Small DICOM files made with pydicom: headers for input-collection tests, and tiny WSIs OpenSlide can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(series_uid: str, sop_class: str, modality: str, image_type: str) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom(
    path: Path,
    series_uid: str,
    *,
    image_type: str = "VOLUME",
    width_px: int = 64,
    sop_class: str = WSI,
    modality: str = "SM",
) -> Path:
    """Write one DICOM file of `series_uid`: a WSI level (VOLUME), a LABEL or OVERVIEW image, or another modality."""
    ds = _dataset(series_uid, sop_class, modality, image_type)
    ds.Rows, ds.Columns = 8, 8
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width_px, width_px
    ds.PixelData = np.full((8, 8, 3), 200, np.uint8).tobytes()
    return _save(ds, path)


def write_dicom_wsi(
    path: Path,
    image: np.ndarray,
    *,
    series_uid: str | None = None,
    mpp: float = 0.5,
    tile_px: int = 256,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    container: str | None = None,
) -> Path:
    """A one-level, uncompressed TILED_FULL whole-slide image of `image` (h, w, 3) that OpenSlide opens.

    Several levels of one slide: one file per level, all with the same ``series_uid``, ``study_uid``,
    ``frame_of_reference_uid`` and ``container`` (a level at twice the ``mpp`` is half the size)."""
    height, width, _ = image.shape
    ds = _dataset(series_uid or generate_uid(), WSI, "SM", "VOLUME")
    if study_uid:
        ds.StudyInstanceUID = study_uid
    if frame_of_reference_uid:
        ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Rows = ds.Columns = tile_px
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
    measures = pydicom.Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm
    measures.SliceThickness = 0.001
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical_path = pydicom.Dataset()
    optical_path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([optical_path])
    ds.ContainerIdentifier = container or path.stem
    rows, cols = -(-height // tile_px), -(-width // tile_px)
    padded = np.full((rows * tile_px, cols * tile_px, 3), 255, np.uint8)
    padded[:height, :width] = image
    frames = padded.reshape(rows, tile_px, cols, tile_px, 3).transpose(0, 2, 1, 3, 4)
    ds.NumberOfFrames = rows * cols
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return _save(ds, path)
