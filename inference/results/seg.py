"""The DICOM Segmentation of a model's result, built with highdicom: BINARY from the label map, or
FRACTIONAL (PROBABILITY, 0..255) from the per-segment probabilities.

Segment numbers follow the manifest: segment ``i + 1`` is ``manifest.output.segments[i]``, whatever
its label value. Every manifest segment is listed, including one the model left empty: it gets a
segment description but no frames (highdicom and dciodvfy accept this), so segment numbers, the SR
that references them and downstream readers see the same segments for every study. Empty frames are
omitted; if every segment is empty highdicom keeps all frames, as omitting all is not allowed.

The label map goes to highdicom as one 3D uint8 array (not stacked masks): about 5x faster.
Probabilities go to it already quantised (uint8, 0..255) through :class:`_ScaledFractional`, which
skips highdicom's float input path: its ``np.unique`` over the whole float array is most of a
FRACTIONAL build, and the float array itself is 4 bytes a voxel a segment.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any, TypedDict

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.measurements import as_label_map
from inference.packages import Code, Manifest
from inference.results.patient import conform
from inference.results.uids import DerivedUids, derive_uid, derived_uids
from inference.settings import DeviceIdentity
from inference.volume import Volume

logger = logging.getLogger(__name__)

DEFAULT_SEG_SERIES_NUMBER = 9901


def coded(code: Code) -> hd.sr.CodedConcept:
    """A manifest :class:`Code` as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def lo(text: str) -> str:
    """``text`` made a valid LO value: no backslash or control characters, at most 64 characters."""
    return re.sub(r"[\\\x00-\x1f]", " ", text).strip()[:64]


class DeviceAttributes(TypedDict):
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


def device_attributes(device: DeviceIdentity) -> DeviceAttributes:
    """The appliance's identity as highdicom keyword arguments; every object we create carries it."""
    return DeviceAttributes(manufacturer=lo(device.manufacturer), manufacturer_model_name=lo(device.model_name),
                            software_versions=lo(device.software_version),
                            device_serial_number=lo(device.serial_number))


def algorithm_identification(manifest: Manifest) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (SEG) for the model of ``manifest``."""
    return hd.AlgorithmIdentificationSequence(
        name=lo(manifest.title), family=coded(manifest.algorithm_family), version=manifest.version,
        parameters={"package": f"{manifest.name}@{manifest.version}"},
    )


def conformant_sources(volume: Volume) -> list[Dataset]:
    """The source headers with the first, whose patient and study attributes highdicom copies, made
    conformant (:mod:`inference.results.patient`); the volume's own headers are left as they are."""
    first = conform(volume.datasets[0])
    if first.changed:
        # keywords only: the values are the patient's
        logger.info("source patient/study attributes made conformant for the derived objects: %s",
                    ", ".join(first.changed))
    return [first.dataset, *volume.datasets[1:]]


def content_qualification(manifest: Manifest) -> str:
    """``PRODUCT`` only for models cleared for clinical use, ``RESEARCH`` otherwise."""
    return "PRODUCT" if manifest.clinical_use else "RESEARCH"


def tracking_uid(uid_root: str, run_key: str, manifest: Manifest, label: int) -> str:
    """The tracking UID of one segment of one run; the SEG and the SR share it."""
    return derive_uid(uid_root, run_key, manifest.name, manifest.version, "tracking", str(label))


def pin_times(ds: Dataset, when: dt.datetime | None) -> None:
    """Set the creation and contribution times highdicom stamps with "now" to ``when``, if given."""
    if when is None:
        return
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")


def segment_descriptions(manifest: Manifest, uid_root: str, run_key: str) -> list[hd.seg.SegmentDescription]:
    """One AUTOMATIC segment description per manifest segment, with tracking UID and colour."""
    algorithm = algorithm_identification(manifest)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lo(segment.name),
            segmented_property_category=coded(segment.category),
            segmented_property_type=coded(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(uid_root, run_key, manifest, segment.label),
            tracking_id=lo(f"{manifest.name} {segment.name}"),
            display_color=hd.color.CIELabColor.from_rgb(*segment.colour),
        )
        for number, segment in enumerate(manifest.output.segments, start=1)
    ]


def _segment_numbers(labels: NDArray[np.uint8], manifest: Manifest) -> NDArray[np.uint8]:
    """The label map with manifest labels renumbered to segment numbers 1..N (no copy when equal)."""
    present = np.zeros(256, dtype=bool)
    for z in range(labels.shape[0]):  # per slice: bincount of the whole map would need 8 bytes a voxel
        present |= np.bincount(labels[z].ravel(), minlength=256) > 0
    lut = np.zeros(256, dtype=np.uint8)
    for number, segment in enumerate(manifest.output.segments, start=1):
        lut[segment.label] = number
    unknown = [int(v) for v in np.flatnonzero(present) if v != 0 and lut[v] == 0]
    if unknown:
        raise ValueError(f"label map has values that no manifest segment describes: {unknown}")
    values = np.flatnonzero(present)
    if np.array_equal(lut[values], values):
        return labels
    renumbered: NDArray[np.uint8] = lut[labels]
    return renumbered


def _source_order(volume: Volume, numbers: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """The label map arranged as highdicom pairs it with the source: per instance, or per frame."""
    if not volume.is_multiframe:
        return numbers
    if len(volume.datasets) != 1:
        raise ValueError("a SEG can reference one multi-frame instance, not "
                         f"{len(volume.datasets)}; this series has several")
    by_frame = np.argsort([f.frame for f in volume.frames])
    reordered: NDArray[np.uint8] = numbers[by_frame]
    return reordered


class _ScaledFractional(hd.seg.Segmentation):
    """A FRACTIONAL Segmentation from a (frames, rows, columns, segments) uint8 array already scaled.

    highdicom 0.28 reads an integer array as binary masks (refusing values above 1) and scales its
    frames by ``max_fractional_value``; here the values are the stored ones. uint8 bounds them by
    0..255 = ``max_fractional_value``, so no check over the array is needed. Use only with such arrays.

    Uncompressed, highdicom keeps a bytes copy of every frame and then joins them, so the pixel data
    is held twice next to the input; here it encodes nothing and the frames (views of the input, in
    highdicom's order) are joined once at the end. Compressed transfer syntaxes go highdicom's way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_frame: NDArray[np.uint8] | None = None
        self._native_frames: list[NDArray[np.uint8]] = []
        super().__init__(*args, **kwargs)
        if self._native_frames:
            if len(self._native_frames) != int(self.NumberOfFrames):
                raise RuntimeError("frames collected do not match the frames highdicom described")
            data = b"".join(frame.data for frame in self._native_frames)
            self.PixelData = data + b"\0" if len(data) % 2 else data
        del self._last_frame, self._native_frames

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array: Any, segment_numbers: Any, segmentation_type: Any,
                                    dtype: type) -> Any:
        if (segmentation_type != hd.seg.SegmentationTypeValues.FRACTIONAL or pixel_array.ndim != 4
                or pixel_array.dtype != np.uint8 or pixel_array.shape[-1] != len(segment_numbers)):
            raise ValueError("expected FRACTIONAL (frames, rows, columns, segments) uint8 probabilities")
        # as highdicom has it: overlap of truly fractional segments is undefined
        overlap = (hd.seg.SegmentsOverlapValues.NO if pixel_array.shape[-1] == 1
                   else hd.seg.SegmentsOverlapValues.UNDEFINED)
        return pixel_array, overlap

    # an instance method where highdicom has a static one: it notes the frame for _encode_pixels_native
    def _get_segment_pixel_array(self, pixel_array: NDArray[np.uint8],  # type: ignore[override]
                                 segment_number: int, *args: Any, **kwargs: Any) -> NDArray[np.uint8]:
        # a view for (segments, z, y, x) input moved to (z, y, x, segments); a copy otherwise
        plane: NDArray[np.uint8] = np.ascontiguousarray(pixel_array[:, :, segment_number - 1])
        self._last_frame = plane
        return plane

    def _encode_pixels_native(self, planes: NDArray[np.uint8]) -> bytes:
        # called right after _get_segment_pixel_array for each frame highdicom keeps
        frame = self._last_frame
        if frame is None or frame.size != planes.size:
            raise RuntimeError("highdicom encoded a frame this class did not prepare")
        self._native_frames.append(frame)
        self._last_frame = None
        return b""


def content_label(manifest: Manifest) -> str:
    """A valid CS ContentLabel (≤ 16 characters, upper case, digits, underscore) naming the model."""
    return re.sub(r"[^A-Z0-9_]", "_", manifest.name.upper())[:16]


def build_seg(
    volume: Volume,
    labels: NDArray[np.integer] | NDArray[np.bool_],
    manifest: Manifest,
    device: DeviceIdentity,
    uid_root: str,
    run_key: str,
    series_number: int = DEFAULT_SEG_SERIES_NUMBER,
    *,
    content_datetime: dt.datetime | None = None,
) -> Dataset:
    """Encode ``labels`` (z, y, x, on ``volume``'s grid) as a BINARY SEG, one segment per manifest segment.

    UIDs derive from ``uid_root``, ``run_key`` and the model's name and version, so the same run
    always gives the same SEG. ``content_datetime`` fixes every date and time written (the default
    is now); with it, a rebuild is byte for byte the same.

    Raises
    ------
    ValueError
        When ``labels`` does not match the volume or holds a value no manifest segment describes,
        or the volume spans several multi-frame instances.
    TypeError
        When ``labels`` is not an integer or boolean array.
    """
    pixels = _source_order(volume, _segment_numbers(as_label_map(labels, volume.hu.shape), manifest))
    uids = derived_uids(uid_root, run_key, manifest.name, manifest.version, "SEG")
    seg = hd.seg.Segmentation(
        source_images=conformant_sources(volume),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **_common(manifest, device, uid_root, run_key, uids, series_number, content_datetime),
    )
    return _finish(seg, manifest, uid_root, run_key, ("SEG",), content_datetime)


def build_fractional_seg(
    volume: Volume,
    probabilities: NDArray[np.uint8],
    manifest: Manifest,
    device: DeviceIdentity,
    uid_root: str,
    run_key: str,
    series_number: int = DEFAULT_SEG_SERIES_NUMBER,
    *,
    content_datetime: dt.datetime | None = None,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Dataset:
    """Encode per-segment probabilities as a FRACTIONAL (PROBABILITY) SEG, max fractional value 255.

    ``probabilities`` is (segments, z, y, x) uint8 on ``volume``'s grid, ``round(255 * p)``, one
    plane per manifest segment in manifest order (see
    :func:`inference.predict.segment_with_probabilities`). Frames that are 0 throughout are omitted.
    UIDs and times as for :func:`build_seg`, from a different object kind, so a BINARY and a
    FRACTIONAL SEG of one run are different objects. ``transfer_syntax_uid`` may be a lossless
    compressed one (JPEG-LS, RLE, JPEG 2000 lossless); the appliance stores Explicit VR Little
    Endian and compresses per destination (:mod:`dicom_router.transcode`).

    Raises
    ------
    ValueError
        When ``probabilities`` does not match the volume and the manifest, or the volume spans
        several multi-frame instances.
    TypeError
        When ``probabilities`` is not uint8.
    """
    n = len(manifest.output.segments)
    if probabilities.dtype != np.uint8:
        raise TypeError(f"probabilities must be uint8 (0..255), not {probabilities.dtype}")
    if probabilities.shape != (n, *volume.hu.shape):
        raise ValueError(f"probabilities have shape {probabilities.shape}; expected {(n, *volume.hu.shape)}")
    # (z, y, x, segments) as highdicom wants it, as a view: each frame stays one contiguous plane
    pixels = _source_order(volume, np.moveaxis(probabilities, 0, -1))
    uids = derived_uids(uid_root, run_key, manifest.name, manifest.version, "SEG-FRACTIONAL")
    seg = _ScaledFractional(
        source_images=conformant_sources(volume),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        transfer_syntax_uid=transfer_syntax_uid,
        **_common(manifest, device, uid_root, run_key, uids, series_number, content_datetime),
    )
    return _finish(seg, manifest, uid_root, run_key, ("SEG-FRACTIONAL",), content_datetime)


def _common(manifest: Manifest, device: DeviceIdentity, uid_root: str, run_key: str, uids: DerivedUids,
            series_number: int, content_datetime: dt.datetime | None) -> dict[str, Any]:
    """The Segmentation keyword arguments BINARY and FRACTIONAL share."""
    return dict(
        segment_descriptions=segment_descriptions(manifest, uid_root, run_key),
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        **device_attributes(device),
        institution_name=device.institution_name,
        content_description=lo(f"AI segmentation by {manifest.title} {manifest.version}"),
        content_label=content_label(manifest),
        series_description=lo(f"AI SEG {manifest.title} {manifest.version}"),
        content_qualification=content_qualification(manifest),
        omit_empty_frames=True,
        content_date=content_datetime.date() if content_datetime else None,
        content_time=content_datetime.time() if content_datetime else None,
        series_date=content_datetime.date() if content_datetime else None,
        series_time=content_datetime.time() if content_datetime else None,
    )


def _finish(seg: Dataset, manifest: Manifest, uid_root: str, run_key: str, kind: tuple[str, ...],
            content_datetime: dt.datetime | None) -> Dataset:
    # highdicom draws a random dimension organisation UID; derive it so a rebuild is the same object
    dimension_uid = derive_uid(uid_root, run_key, manifest.name, manifest.version, *kind, "dimensions")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = dimension_uid
    pin_times(seg, content_datetime)
    logger.info("built %s SEG %s: %d segment(s), %d frame(s)", seg.SegmentationType,
                str(seg.SOPInstanceUID)[-12:], len(manifest.output.segments), int(seg.NumberOfFrames))
    return seg
