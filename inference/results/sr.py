"""The TID 1500 Measurement Report (Comprehensive 3D SR) of a run, built with highdicom.

One TID 1411 group per manifest segment references that segment of the SEG and the source series,
carries the segment's tracking identifier and UID (the same UID as in the SEG), the algorithm, and
the manifest's measurements: Volume (SCT 118565006, cm3) and, for CT, the attenuation coefficient
(DCM 112031, HU) with derivation Mean, Standard Deviation, Minimum or Maximum. An empty segment
reports a volume of 0 and no intensity statistics.

For each non-empty segment a TID 1501 group follows (viewers such as OHIF draw only planar
measurements): the segment's area (SCT 42798000, cm2) on its reference slice, INFERRED FROM its
outline there as a SCOORD POLYLINE on that source image (:mod:`inference.results.planar`). The
outline sits under the area rather than at group level (TID 1410, which forbids it there) because
that is where OHIF's cornerstone adapters read a planar tool's outline; the group's Tracking
Identifier starts with :data:`PLANAR_TOOL_PREFIX` so that OHIF loads it into its PlanarFreehandROI
tool and lists it in its measurements panel. Both groups of a segment carry the same tracking UID
(the SEG's): they measure the same tracked finding. OHIF (3.13) merges groups by tracking UID into
one measurement; a volumetric group with a UID of its own becomes a measurement without
coordinates, which stops OHIF from showing the report at all (it reads ``coords[0]`` of every
measurement).

The report says it is machine output: the observer is the appliance (a device observer, TID 1004),
every group names the algorithm (TID 4019), the series description starts with "AI", the document
is left unverified and partial, and models not cleared for clinical use mark it ``RESEARCH``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as SrCode

from inference.measurements import SegmentMeasurement
from inference.packages import Manifest, Measurement
from inference.results.planar import PlanarRegion, planar_regions
from inference.results.seg import coded, content_qualification, device_attributes, lo, pin_times, tracking_uid
from inference.results.uids import derive_uid, derived_uids
from inference.settings import DeviceIdentity
from inference.volume import Volume

logger = logging.getLogger(__name__)

DEFAULT_SR_SERIES_NUMBER = 9902

VOLUME = SrCode("118565006", "SCT", "Volume")
CUBIC_CENTIMETER = SrCode("cm3", "UCUM", "cubic centimeter")
ATTENUATION = SrCode("112031", "DCM", "Attenuation Coefficient")
HOUNSFIELD_UNIT = SrCode("[hnsf'U]", "UCUM", "Hounsfield unit")
AREA = SrCode("42798000", "SCT", "Area")
SQUARE_CENTIMETER = SrCode("cm2", "UCUM", "square centimeter")
#: how a planar group's Tracking Identifier starts so that OHIF loads it into its PlanarFreehandROI tool
#: and lists it in its measurements panel (cornerstone3D's SR adapters pick a tool by this text prefix)
PLANAR_TOOL_PREFIX = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:"
#: derivation (CID 7464) of each intensity statistic, and where it sits in SegmentMeasurement
DERIVATIONS: dict[Measurement, tuple[SrCode, str]] = {
    Measurement.MEAN: (SrCode("373098007", "SCT", "Mean"), "mean"),
    Measurement.STDDEV: (SrCode("386136009", "SCT", "Standard Deviation"), "stddev"),
    Measurement.MIN: (SrCode("255605001", "SCT", "Minimum"), "min"),
    Measurement.MAX: (SrCode("56851009", "SCT", "Maximum"), "max"),
}
#: procedure reported (CID 100) by source modality
PROCEDURES: dict[str, SrCode] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
}


def device_observer(device: DeviceIdentity, uid_root: str) -> hd.sr.ObserverContext:
    """The appliance as the report's observer (TID 1002 / 1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(uid_root, "device", device.manufacturer, device.model_name, device.serial_number),
            name=lo(device.model_name),
            manufacturer_name=lo(device.manufacturer),
            model_name=lo(device.model_name),
            serial_number=lo(device.serial_number),
        ),
    )


def _measurements(found: SegmentMeasurement, wanted: Sequence[Measurement],
                  modality: str) -> list[hd.sr.Measurement]:
    """TID 300 measurements of one segment; the group names the algorithm once for all of them."""
    out = []
    if Measurement.VOLUME in wanted:
        out.append(hd.sr.Measurement(name=VOLUME, value=found.volume_ml, unit=CUBIC_CENTIMETER))
    if modality != "CT":
        return out  # attenuation in HU is a CT concept; other modalities get no intensity statistics
    for kind in wanted:
        if kind not in DERIVATIONS:
            continue
        derivation, field = DERIVATIONS[kind]
        value = getattr(found, field)
        if value is None:
            continue
        out.append(hd.sr.Measurement(name=ATTENUATION, value=float(value), unit=HOUNSFIELD_UNIT,
                                     derivation=derivation))
    return out


def _tracking(uid_root: str, run_key: str, manifest: Manifest, label: int, name: str,
              prefix: str = "") -> hd.sr.TrackingIdentifier:
    """The segment as a tracked finding: one UID (the SEG's) for its volumetric and its planar group."""
    return hd.sr.TrackingIdentifier(uid=tracking_uid(uid_root, run_key, manifest, label),
                                    identifier=prefix + lo(f"{manifest.name} {name}"))


def _planar_group(region: PlanarRegion, volume: Volume, tracking: hd.sr.TrackingIdentifier,
                  finding_type: hd.sr.CodedConcept, finding_category: hd.sr.CodedConcept,
                  algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the segment's area on its reference slice, inferred from its outline on that source image.

    The outline sits under the area (TID 300 INFERRED FROM, TID 320), not at group level as in TID 1410:
    that is where OHIF's cornerstone adapters read a planar tool's outline, and TID 1410 forbids it.
    """
    source = volume.frames[region.slice_index]
    image = volume.datasets[source.instance]
    frames = [source.frame] if volume.is_multiframe else None
    area = hd.sr.Measurement(
        name=AREA, value=round(region.area_cm2, 4), unit=SQUARE_CENTIMETER,
        referenced_coordinates=[hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=region.outline,
            source_image=hd.sr.SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID, frames))],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_type,
        finding_category=finding_category,
        algorithm_id=algorithm,
        measurements=[area],
    )


def build_sr(
    seg: Dataset,
    volume: Volume,
    measurements: Sequence[SegmentMeasurement],
    manifest: Manifest,
    device: DeviceIdentity,
    uid_root: str,
    run_key: str,
    series_number: int = DEFAULT_SR_SERIES_NUMBER,
    *,
    content_datetime: dt.datetime | None = None,
    labels: NDArray[np.uint8] | None = None,
) -> Dataset:
    """Build the Measurement Report of ``measurements`` for the segments of ``seg``.

    ``seg`` is the object from :func:`inference.results.seg.build_seg` for the same run; its
    segment ``i + 1`` is ``manifest.output.segments[i]``. Evidence is the SEG and the source
    instances. UIDs derive from ``uid_root``, ``run_key`` and the model's name and version;
    ``content_datetime`` fixes every date and time written (the default is now). With ``labels``, the
label map the SEG encodes, each non-empty segment also gets a planar group (TID 1410).

    Raises
    ------
    ValueError
        When a manifest segment has no measurement, or ``seg`` has a different number of segments.
    """
    by_label = {m.label: m for m in measurements}
    segments = manifest.output.segments
    missing = [s.label for s in segments if s.label not in by_label]
    if missing:
        raise ValueError(f"no measurements for segment label(s) {missing}")
    if len(seg.SegmentSequence) != len(segments):
        raise ValueError(f"the SEG has {len(seg.SegmentSequence)} segments, the manifest {len(segments)}")
    if volume.modality != "CT" and any(k in DERIVATIONS for k in manifest.output.measurements):
        logger.info("intensity statistics are reported for CT only; %s series gets volumes only",
                    volume.modality)

    algorithm = hd.sr.AlgorithmIdentification(
        name=lo(manifest.title), version=manifest.version, family=coded(manifest.algorithm_family),
        manufacturer=lo(device.manufacturer),
    )
    source_series = hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for number, segment in enumerate(segments, start=1):
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid_root, run_key, manifest, segment.label, segment.name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number,
                source_series=source_series,
            ),
            finding_type=coded(segment.type),
            finding_category=coded(segment.category),
            algorithm_id=algorithm,
            measurements=_measurements(by_label[segment.label], manifest.output.measurements,
                                       volume.modality),
        ))
    if labels is not None:
        regions = planar_regions(labels, [s.label for s in segments], volume.spacing[1:])
        for segment in segments:
            if segment.label not in regions:
                continue  # an empty segment has no cross-section to outline
            groups.append(_planar_group(
                regions[segment.label], volume,
                _tracking(uid_root, run_key, manifest, segment.label, segment.name, PLANAR_TOOL_PREFIX),
                coded(segment.type), coded(segment.category), algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(device, uid_root)),
        procedure_reported=PROCEDURES.get(volume.modality, codes.SCT.ImagingProcedure),
        # planar groups first: OHIF shows a merged measurement's first few values, so the area on the
        # outlined slice leads, then the volume and the HU statistics
        imaging_measurements=[*groups[len(segments):], *groups[:len(segments)]],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    uids = derived_uids(uid_root, run_key, manifest.name, manifest.version, "SR")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *volume.datasets],
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        **device_attributes(device),
        institution_name=device.institution_name,
        series_description=lo(f"AI measurements {manifest.title} {manifest.version}"),
        content_qualification=content_qualification(manifest),
        is_complete=False,
        is_final=False,
        is_verified=False,
        content_date=content_datetime.date() if content_datetime else None,
        content_time=content_datetime.time() if content_datetime else None,
        series_date=content_datetime.date() if content_datetime else None,
        series_time=content_datetime.time() if content_datetime else None,
    )
    pin_times(sr, content_datetime)
    logger.info("built SR %s: %d measurement group(s)", uids.sop_instance_uid[-12:], len(groups))
    return sr
