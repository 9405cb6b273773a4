"""Synthetic DICOM instances and STOW-RS request bodies for the ingest tests."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

BOUNDARY = "portico-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
PATIENT_NAME = "STOW^TESTPATIENT"


def ct_instance(study_uid: str, series_uid: str, number: int, *, sop_instance_uid: str | None = None,
                rows: int = 8) -> bytes:
    """One small CT slice as a Part 10 file."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, "STOW0001", "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.full((rows, rows), number, np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(*parts: bytes, content_type: str = "application/dicom") -> bytes:
    """A ``multipart/related`` body of ``parts``, framed with :data:`BOUNDARY`."""
    chunks = []
    for data in parts:
        chunks += [f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(chunks)
