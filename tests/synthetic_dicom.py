"""Small DICOM files made with pydicom for input-collection tests (headers that matter, a few pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
CT = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom(path: Path, series_uid: str, *, image_type: str = "VOLUME", width_px: int = 64,
                sop_class: str = WSI, modality: str = "SM") -> Path:
    """Write one DICOM file of `series_uid`: a WSI level (VOLUME), a LABEL or OVERVIEW image, or another modality."""
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
    ds.Rows, ds.Columns = 8, 8
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width_px, width_px
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((8, 8, 3), 200, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
