"""Series → oriented volume: sort slices along the normal, check the geometry, decode to modality units.

Classic one-file-per-slice series and enhanced multi-frame instances (per-frame functional groups)
are both read. Headers are parsed first without pixel data; the geometry is checked before any pixel
is decoded, then every slice is decoded straight into one preallocated array: float32, or with
``compact=True`` int16 when every slice's modality values are integers that fit (CT in HU nearly
always), half the memory for the same values.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import iter_pixels, pixel_array

from inference.charset import honour_character_set
from inference.errors import SeriesError

logger = logging.getLogger(__name__)

#: absolute tolerance (mm) on slice spacing, in-plane drift and duplicate positions
POSITION_TOL_MM = 0.01
#: relative tolerance on slice spacing (fraction of the median spacing)
SPACING_TOL = 0.01
#: allowed in-plane drift per mm along the normal (about 0.11°); more is a gantry tilt or shear
TILT_TOL = 2e-3
#: tolerance on direction cosines when comparing orientations: the one test of "same orientation".
#: Slices within it are one orientation, and :func:`load_series` gives them all the same
#: ImageOrientationPatient so the derived objects (whose writers demand identical values) agree
ORIENTATION_TOL = 1e-4

#: SOP classes that carry no image volume even though some have pixel-like attributes
NON_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
})
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC"})

#: a volume's voxels in modality units: float32, or int16 when loaded compact (same values). Typed
#: loosely on purpose: readers of ``Volume.hu`` that need floats convert, as numpy does for them
Voxels = NDArray[Any]
#: rescale slopes and intercepts a compact volume accepts: integers this small keep the float32
#: arithmetic of the float path exact (|stored × slope| < 2**24), so both paths give the same values
_COMPACT_RESCALE_MAX = 2**15


class SourceFrame(NamedTuple):
    """Where one slice of a volume came from."""

    #: index into :attr:`Volume.datasets`
    instance: int
    #: 1-based frame number within that instance (1 for single-frame images)
    frame: int


@dataclass(frozen=True, eq=False)
class Volume:
    """One series as a (z, y, x) array on a regular, right-handed grid.

    ``z`` runs along the slice normal (row direction × column direction), ``y`` down the rows and
    ``x`` along the columns of each image.
    """

    #: (z, y, x) in modality units (rescale slope and intercept applied; HU for CT): float32, or
    #: int16 holding the same values when loaded with ``compact=True``
    hu: Voxels
    #: voxel spacing (z, y, x) in mm
    spacing: tuple[float, float, float]
    #: LPS position (mm) of the centre of voxel (0, 0, 0)
    origin: tuple[float, float, float]
    #: 3x3; columns are the x (row), y (column) and z (normal) unit vectors in LPS
    direction: NDArray[np.float64]
    #: source headers without pixel data: one per slice in z order for classic series, one per
    #: instance for multi-frame series (see ``frames``)
    datasets: list[Dataset]
    modality: str
    #: for each z, the instance and frame it was decoded from
    frames: tuple[SourceFrame, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        nz, ny, nx = self.hu.shape
        return nz, ny, nx

    @property
    def is_multiframe(self) -> bool:
        return any(f.frame != 1 for f in self.frames) or len(self.datasets) != len(self.frames)

    @property
    def affine(self) -> NDArray[np.float64]:
        """4x4 mapping array indices ``(z, y, x, 1)`` to LPS mm (highdicom's convention)."""
        out = np.eye(4)
        sz, sy, sx = self.spacing
        out[:3, 0] = self.direction[:, 2] * sz
        out[:3, 1] = self.direction[:, 1] * sy
        out[:3, 2] = self.direction[:, 0] * sx
        out[:3, 3] = self.origin
        return out

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].get("StudyInstanceUID", ""))

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].get("SeriesInstanceUID", ""))

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))


@dataclass(frozen=True)
class _Plane:
    instance: int
    frame: int  # 1-based
    position: NDArray[np.float64]
    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


class _NotCompact(Exception):
    """A slice's modality values are not int16 integers: the volume is decoded as float32 instead."""


def load_series(paths: Sequence[Path], *, compact: bool = False) -> Volume:
    """Read one series (any file order) into a :class:`Volume`.

    With ``compact``, ``hu`` is int16 when every slice's modality values are integers in int16's
    range (integer pixels, integer rescale slope and intercept), float32 otherwise; the values are
    the same either way. A 600-slice 512×512 CT then takes 300 MB instead of 600.

    Raises
    ------
    SeriesError
        When the files are not one regular image stack: unreadable or non-image objects, mixed
        modality, size, pixel spacing or orientation, gantry tilt, duplicate positions, missing
        slices or uneven spacing, or pixel data that cannot be decoded.
    """
    if not paths:
        raise SeriesError("no instances in the series")
    headers = [_read_header(path, k) for k, path in enumerate(paths)]
    modality = _common(headers, "Modality", "modalities")
    rows = int(_common(headers, "Rows", "image sizes (Rows)"))
    cols = int(_common(headers, "Columns", "image sizes (Columns)"))
    _common(headers, "SeriesInstanceUID", "series (SeriesInstanceUID)")
    _common(headers, "FrameOfReferenceUID", "frames of reference")
    planes = [plane for k, ds in enumerate(headers) for plane in _planes(ds, k)]
    planes, spacing_z = _sort_and_check(planes, headers[0])
    _one_orientation(headers)
    row_dir, col_dir = planes[0].row_dir, planes[0].col_dir
    normal = np.cross(row_dir, col_dir)

    # headers in order of first appearance along z, so classic series come out in z order
    order: dict[int, int] = {}
    for plane in planes:
        order.setdefault(plane.instance, len(order))
    datasets = [headers[k] for k in order]
    frames = tuple(SourceFrame(order[p.instance], p.frame) for p in planes)

    z_of = {(p.instance, p.frame): z for z, p in enumerate(planes)}
    hu: Voxels
    if compact and all(_integral_rescale(p) for p in planes):
        hu = np.empty((len(planes), rows, cols), dtype=np.int16)
        try:
            for k in order:
                _decode_into(hu, paths[k], k, headers[k], planes, z_of, (rows, cols))
        except _NotCompact:  # found out only by decoding: start again in float32
            del hu
            hu = _decode_float(paths, headers, order, planes, z_of, (rows, cols))
    else:
        hu = _decode_float(paths, headers, order, planes, z_of, (rows, cols))

    direction = np.stack([row_dir, col_dir, normal], axis=1)
    origin = planes[0].position
    volume = Volume(
        hu=hu,
        spacing=(spacing_z, planes[0].pixel_spacing[0], planes[0].pixel_spacing[1]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=direction,
        datasets=datasets,
        modality=modality,
        frames=frames,
    )
    logger.debug("loaded %s volume %s from %d instance(s)", modality, volume.shape, len(datasets))
    return volume


def _one_orientation(headers: Sequence[Dataset]) -> None:
    """Give every slice the series' most common ImageOrientationPatient, as written.

    Called once :func:`_sort_and_check` has found them all within :data:`ORIENTATION_TOL`: scanners
    round direction cosines differently slice by slice (``0.0038759`` and ``0.00387589``), and the
    SEG writer demands identical values across the images it references (for a multi-frame image:
    one orientation in its shared functional groups). Only these in-memory headers change; the
    stored files stay as they arrived.
    """
    written: list[tuple[str, ...]] = []
    for ds in headers:
        if "PerFrameFunctionalGroupsSequence" not in ds:
            if "ImageOrientationPatient" in ds:
                written.append(_as_written(ds.ImageOrientationPatient))
            continue
        for item in ds.PerFrameFunctionalGroupsSequence:
            orientation = _group(item, None, "PlaneOrientationSequence")
            if orientation is not None and "ImageOrientationPatient" in orientation:
                written.append(_as_written(orientation.ImageOrientationPatient))
    if not written:
        return
    counts = Counter(written)
    chosen = max(counts, key=lambda value: counts[value])  # ties go to the first in file order
    changed = len(written) - counts[chosen]
    for ds in headers:
        if "PerFrameFunctionalGroupsSequence" not in ds:
            if "ImageOrientationPatient" in ds and _as_written(ds.ImageOrientationPatient) != chosen:
                ds.ImageOrientationPatient = list(chosen)
        elif any("PlaneOrientationSequence" in item for item in ds.PerFrameFunctionalGroupsSequence):
            _share_orientation(ds, chosen)
    if changed:
        logger.info("ImageOrientationPatient of %d of %d slice(s) differed by rounding only; the series' "
                    "single orientation is used for them", changed, len(written))


def _as_written(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _share_orientation(ds: Dataset, orientation: tuple[str, ...]) -> None:
    """Move a multi-frame header's per-frame orientation (all within tolerance) into its shared groups."""
    for item in ds.PerFrameFunctionalGroupsSequence:
        if "PlaneOrientationSequence" in item:
            del item.PlaneOrientationSequence
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = [Dataset()]
    plane = Dataset()
    plane.ImageOrientationPatient = list(orientation)
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [plane]


def _read_header(path: Path, k: int) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise SeriesError(f"instance {k}: not a readable DICOM file ({type(exc).__name__})") from exc
    honour_character_set(ds, k)  # before any text value is decoded
    meta = getattr(ds, "file_meta", None)
    # anonymised exports sometimes blank these in the data set but keep them in the file meta
    if meta is not None:
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    # the message names only values from our own lists, never what the file says otherwise
    if sop_class in NON_IMAGE_SOP_CLASSES:
        raise SeriesError(f"instance {k}: not an image (SOP class {sop_class})")
    if modality in NON_IMAGE_MODALITIES:
        raise SeriesError(f"instance {k}: not an image (modality {modality})")
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesError(f"instance {k}: not an image (no Rows/Columns)")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")
                                                         ).startswith("MONOCHROME"):
        raise SeriesError(f"instance {k}: not a grayscale image")
    return ds


def _common(headers: Sequence[Dataset], keyword: str, what: str) -> str:
    values = {str(ds.get(keyword, "")) for ds in headers}
    if len(values) > 1:
        raise SeriesError(f"mixed {what} in one series: {len(values)} different values")
    return values.pop()


def _floats(value: Any, n: int, what: str, k: int) -> NDArray[np.float64]:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"instance {k}: unreadable {what}") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise SeriesError(f"instance {k}: {what} must have {n} finite values")
    return out


def _unit(v: NDArray[np.float64], k: int) -> NDArray[np.float64]:
    norm = float(np.linalg.norm(v))
    if abs(norm - 1.0) > 1e-2:
        raise SeriesError(f"instance {k}: ImageOrientationPatient is not made of unit vectors")
    return v / norm


def _plane(k: int, frame: int, position: Any, orientation: Any, pixel_spacing: Any, slope: Any,
           intercept: Any) -> _Plane:
    if position is None or orientation is None or pixel_spacing is None:
        raise SeriesError(f"instance {k} frame {frame}: no image plane geometry "
                          "(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)")
    iop = _floats(orientation, 6, "ImageOrientationPatient", k)
    row_dir, col_dir = _unit(iop[:3], k), _unit(iop[3:], k)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise SeriesError(f"instance {k}: ImageOrientationPatient row and column are not orthogonal")
    ps = _floats(pixel_spacing, 2, "PixelSpacing", k)
    if np.any(ps <= 0):
        raise SeriesError(f"instance {k}: PixelSpacing must be positive")
    return _Plane(
        instance=k,
        frame=frame,
        position=_floats(position, 3, "ImagePositionPatient", k),
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_spacing=(float(ps[0]), float(ps[1])),
        slope=_rescale(slope, 1.0, "RescaleSlope", k),
        intercept=_rescale(intercept, 0.0, "RescaleIntercept", k),
    )


def _rescale(value: Any, default: float, what: str, k: int) -> float:
    if value in (None, ""):
        return default
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:  # float()'s message quotes the value
        raise SeriesError(f"instance {k}: unreadable {what}") from exc
    if not np.isfinite(out):
        raise SeriesError(f"instance {k}: {what} must be finite")
    return out


def _group(item: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for source in (item, shared):
        if source is not None and keyword in source and len(source[keyword].value) > 0:
            first: Dataset = source[keyword].value[0]
            return first
    return None


def _planes(ds: Dataset, k: int) -> list[_Plane]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        if n_frames != 1:
            raise SeriesError(f"instance {k}: multi-frame image without per-frame functional groups")
        if "ModalityLUTSequence" in ds:
            raise SeriesError(f"instance {k}: Modality LUT sequences are not supported")
        return [_plane(k, 1, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                       ds.get("PixelSpacing"), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))]
    if len(per_frame) != n_frames:
        raise SeriesError(f"instance {k}: {len(per_frame)} per-frame functional groups for {n_frames} frames")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    out = []
    for f, item in enumerate(per_frame, start=1):
        position = _group(item, shared, "PlanePositionSequence")
        orientation = _group(item, shared, "PlaneOrientationSequence")
        measures = _group(item, shared, "PixelMeasuresSequence")
        transform = _group(item, shared, "PixelValueTransformationSequence")
        out.append(_plane(
            k, f,
            position.get("ImagePositionPatient") if position is not None else None,
            orientation.get("ImageOrientationPatient") if orientation is not None else None,
            measures.get("PixelSpacing") if measures is not None else None,
            transform.get("RescaleSlope") if transform is not None else None,
            transform.get("RescaleIntercept") if transform is not None else None,
        ))
    return out


def _sort_and_check(planes: list[_Plane], first: Dataset) -> tuple[list[_Plane], float]:
    """Sort planes along the normal; check they form one regular stack; return the z spacing."""
    ref = planes[0]
    for p in planes[1:]:
        if (np.abs(p.row_dir - ref.row_dir).max() > ORIENTATION_TOL
                or np.abs(p.col_dir - ref.col_dir).max() > ORIENTATION_TOL):
            raise SeriesError("mixed orientations: ImageOrientationPatient differs between slices")
        if max(abs(a - b) for a, b in zip(p.pixel_spacing, ref.pixel_spacing, strict=True)) > 1e-4 * max(
                ref.pixel_spacing):
            raise SeriesError("mixed pixel spacing between slices")
    normal = np.cross(ref.row_dir, ref.col_dir)
    distance = np.array([float(p.position @ normal) for p in planes])
    order = np.argsort(distance, kind="stable")
    planes = [planes[i] for i in order]
    distance = distance[order]
    if len(planes) == 1:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        return planes, float(thickness)

    # drift across the plane means the stack is sheared (gantry tilt): refuse, never resample
    offsets = np.stack([p.position - planes[0].position for p in planes])
    along = distance - distance[0]
    residual = np.linalg.norm(offsets - along[:, None] * normal[None, :], axis=1)
    if np.any(residual > POSITION_TOL_MM + TILT_TOL * along):
        angle = float(np.degrees(np.arctan2(residual[-1], along[-1])))
        raise SeriesError(f"gantry tilt: slice positions are not along the slice normal ({angle:.2f}° off); "
                          "tilted or sheared stacks are not supported")

    gaps = np.diff(distance)
    if np.any(gaps <= POSITION_TOL_MM):
        at = float(distance[int(np.argmax(gaps <= POSITION_TOL_MM))])
        raise SeriesError(f"duplicate slice positions ({int(np.sum(gaps <= POSITION_TOL_MM))} duplicate(s), "
                          f"first at {at:.2f} mm along the normal)")
    step = float(np.median(gaps))
    tol = max(POSITION_TOL_MM, SPACING_TOL * step)
    bad = np.abs(gaps - step) > tol
    if np.any(bad):
        i = int(np.argmax(np.abs(gaps - step)))
        multiple = round(float(gaps[i]) / step)
        if multiple >= 2 and abs(gaps[i] - multiple * step) <= tol * multiple:
            raise SeriesError(f"missing slices: gap of {gaps[i]:.2f} mm (about {multiple - 1} slice(s)) "
                              f"at {distance[i]:.2f} mm along the normal, where the spacing is {step:.2f} mm")
        raise SeriesError(f"uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
                          f"(median {step:.3f} mm)")
    return planes, float((distance[-1] - distance[0]) / (len(planes) - 1))


def _integral_rescale(plane: _Plane) -> bool:
    return all(float(v).is_integer() and abs(v) <= _COMPACT_RESCALE_MAX for v in (plane.slope, plane.intercept))


def _decode_float(paths: Sequence[Path], headers: Sequence[Dataset], order: dict[int, int], planes: Sequence[_Plane],
                  z_of: dict[tuple[int, int], int], shape: tuple[int, int]) -> NDArray[np.float32]:
    hu = np.empty((len(planes), *shape), dtype=np.float32)
    for k in order:
        _decode_into(hu, paths[k], k, headers[k], planes, z_of, shape)
    return hu


def _to_int16(arr: NDArray[Any], plane: _Plane) -> NDArray[np.int32]:
    """``arr`` rescaled in exact integer arithmetic; :class:`_NotCompact` when it does not fit int16."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        raise _NotCompact
    values = arr.astype(np.int32)
    if plane.slope != 1.0:
        values *= int(plane.slope)
    if plane.intercept != 0.0:
        values += int(plane.intercept)
    if values.size and (int(values.min()) < -(2**15) or int(values.max()) >= 2**15):
        raise _NotCompact
    return values


def _decode_into(hu: Voxels, path: Path, k: int, header: Dataset, planes: Sequence[_Plane],
                 z_of: dict[tuple[int, int], int], shape: tuple[int, int]) -> None:
    """Decode every frame of instance ``k`` into its slices of ``hu``, rescaled.

    Into an int16 ``hu``, raises :class:`_NotCompact` for a frame whose values do not fit it.
    """
    by_frame = {p.frame: p for p in planes if p.instance == k}
    try:
        frames: Iterator[tuple[int, NDArray[Any]]]
        if "PerFrameFunctionalGroupsSequence" in header:
            frames = enumerate(iter_pixels(path), start=1)
        else:
            frames = iter([(1, pixel_array(path))])
        decoded = 0
        for frame, arr in frames:
            decoded += 1
            if arr.shape != shape:
                raise SeriesError(f"instance {k} frame {frame}: decoded shape {arr.shape} is not {shape}")
            plane = by_frame[frame]
            out = hu[z_of[(k, frame)]]
            if out.dtype == np.int16:
                out[...] = _to_int16(arr, plane)
                continue
            out[...] = arr
            if plane.slope != 1.0:
                out *= np.float32(plane.slope)
            if plane.intercept != 0.0:
                out += np.float32(plane.intercept)
        if decoded != len(by_frame):
            raise SeriesError(f"instance {k}: {decoded} frame(s) of pixel data for {len(by_frame)} declared")
    except (SeriesError, _NotCompact):
        raise
    except Exception as exc:  # decoders raise many types; all mean "this pixel data is unusable"
        # the decoder's type only: its message may quote header values
        raise SeriesError(f"instance {k}: pixel data cannot be decoded ({type(exc).__name__})") from exc
