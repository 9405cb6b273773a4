"""IHE IOCM rejection notes: a Key Object Selection that takes results back.

When a result already sent must be withdrawn, the destination gets a Key Object Selection Document
(TID 2010) whose document title is a rejection reason from PS3.16 CID 7011 (by default DCM 113001
"Rejected for Quality Reasons") and whose key objects are the instances to withdraw. IHE IOCM
(Imaging Object Change Management) defines what an archive does with it: hide the referenced
instances from queries and retrievals (dcm4chee-arc does), or merely store it (Orthanc does; the
objects stay visible until someone deletes them).

The observer is the appliance (a device observer): the note carries no person's name and none of
the reviewer's free-text reason, so it quotes nothing typed by a person. Its UIDs derive from the
appliance's UID root and a caller-given key (job and destination), so resending is the same object.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from enum import StrEnum

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code as SrCode
from pydicom.valuerep import DA, TM

from inference.results.patient import conform
from inference.results.seg import device_attributes, lo, pin_times
from inference.results.sr import device_observer
from inference.results.uids import derive_uid
from inference.settings import DeviceIdentity

logger = logging.getLogger(__name__)

DEFAULT_KOS_SERIES_NUMBER = 9904
KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"


class RejectionReason(StrEnum):
    """The CID 7011 document titles Portico uses to take its results back."""

    QUALITY = "quality"
    PATIENT_SAFETY = "patient-safety"


#: the document title of each reason (PS3.16 CID 7011, "Rejected for ..." concepts)
TITLES: dict[RejectionReason, SrCode] = {
    RejectionReason.QUALITY: SrCode("113001", "DCM", "Rejected for Quality Reasons"),
    RejectionReason.PATIENT_SAFETY: SrCode("113037", "DCM", "Rejected for Patient Safety Reasons"),
}


def build_rejection_kos(
    rejected: Sequence[Dataset],
    device: DeviceIdentity,
    uid_root: str,
    key: str,
    reason: RejectionReason = RejectionReason.QUALITY,
    series_number: int = DEFAULT_KOS_SERIES_NUMBER,
    *,
    content_datetime: dt.datetime | None = None,
) -> Dataset:
    """A rejection note (IOCM KOS) for ``rejected``: instances of one study that Portico created.

    ``rejected`` are their headers (pixel data not needed). UIDs derive from ``uid_root``, ``key``
    and the rejected SOP Instance UIDs.

    Raises
    ------
    ValueError
        When ``rejected`` is empty or spans more than one study.
    """
    if not rejected:
        raise ValueError("a rejection note needs at least one instance to reject")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ValueError(f"a rejection note covers one study, not {len(studies)}")
    ordered = sorted(rejected, key=lambda ds: str(ds.SOPInstanceUID))
    uids = [str(ds.SOPInstanceUID) for ds in ordered]
    # the patient and study attributes are copied from the first one: make them conformant
    evidence = [conform(ordered[0]).dataset, *ordered[1:]]
    content = hd.ko.KeyObjectSelection(
        document_title=TITLES[reason],
        referenced_objects=evidence,
        observer_device_context=device_observer(device, uid_root),
        description="AI results withdrawn by the appliance that created them",
    )
    attributes = device_attributes(device)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=derive_uid(uid_root, "KOS", key, *uids, "series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(uid_root, "KOS", key, *uids, "instance"),
        instance_number=1,
        manufacturer=attributes["manufacturer"],
        institution_name=device.institution_name,
    )
    kos.ManufacturerModelName = attributes["manufacturer_model_name"]
    kos.SoftwareVersions = attributes["software_versions"]
    kos.DeviceSerialNumber = attributes["device_serial_number"]
    kos.SeriesDescription = lo(f"AI withdrawn: {TITLES[reason].meaning}")
    if content_datetime is not None:
        date, time = DA(content_datetime.date()), TM(content_datetime.time().replace(microsecond=0))
        kos.ContentDate, kos.ContentTime, kos.SeriesDate, kos.SeriesTime = date, time, date, time
    pin_times(kos, content_datetime)
    logger.info("built rejection note %s for %d instance(s)", kos.SOPInstanceUID[-12:], len(uids))
    return kos
