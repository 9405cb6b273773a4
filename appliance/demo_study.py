"""Write a synthetic CT study (a phantom from :mod:`inference.phantom`) as DICOM files.

Used by the demo, the tests and the benchmarks. The patient is fictional and says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

DEMO_PATIENT_NAME = "PHANTOM^DEMO"
DEMO_PATIENT_ID = "PORTICO-PHANTOM-001"


@dataclass(frozen=True)
class WrittenStudy:
    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]


def write_ct_series(
    hu: NDArray[np.floating],
    spacing: tuple[float, float, float],
    out_dir: Path,
    *,
    patient_name: str = DEMO_PATIENT_NAME,
    patient_id: str = DEMO_PATIENT_ID,
    patient_birth_date: str = "19700101",
    patient_sex: str = "O",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_description: str = "Phantom abdomen 2.5mm",
    transfer_syntax: str = ExplicitVRLittleEndian,
    order: Sequence[int] | None = None,
    seed: int = 0,
) -> WrittenStudy:
    """Write ``hu`` (z, y, x) as one axial CT series, slice 0 inferior-most, one file per slice.

    ``order`` permutes which slice goes to which file name (to test slice-order independence);
    ``transfer_syntax`` may be RLE or JPEG 2000 lossless to produce compressed files. The patient's
    name, ID, birth date and sex are written as given, conformant or not (tests send both).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid(entropy_srcs=[patient_id, str(seed), "study"])
    series_uid = series_instance_uid or generate_uid(entropy_srcs=[study_uid, series_description])
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame"])
    nz, ny, nx = hu.shape
    now = dt.datetime(2026, 1, 1, 9, 0, 0)
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
    paths: list[Path] = []
    indices = list(order) if order is not None else list(range(nz))
    for file_no, z in enumerate(indices):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(z)])
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"PHA{seed:07d}"
        ds.Modality = "CT"
        ds.Manufacturer = "Portico synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic CT phantom (not a patient)"
        ds.SeriesDescription = series_description
        # as given, without pydicom's validation: tests write non-conformant values on purpose
        for keyword, vr, value in (("PatientName", "PN", patient_name), ("PatientID", "LO", patient_id),
                                   ("PatientBirthDate", "DA", patient_birth_date), ("PatientSex", "CS", patient_sex)):
            ds.add(DataElement(keyword, vr, value, validation_mode=config.IGNORE))
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = z + 1
        # slice 0 is inferior-most: in LPS, z increases towards the head
        ds.ImagePositionPatient = [f"{-nx * spacing[2] / 2:.4f}", f"{-ny * spacing[1] / 2:.4f}",
                                   f"{(z - nz) * spacing[0]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[z].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if UID(transfer_syntax) in (RLELossless, JPEG2000Lossless):
            ds.compress(transfer_syntax, stored[z])
        path = out_dir / f"CT{file_no:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return WrittenStudy(study_instance_uid=study_uid, series_instance_uid=series_uid, paths=paths)
