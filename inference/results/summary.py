"""Secondary Capture key images of a run, for PACS and viewers that cannot display a SEG.

A few key slices are rendered as RGB: the CT windowed for soft tissue, each segment overlaid in its
manifest colour (semi-transparent fill, opaque outline), a banner saying the image is AI output
and not for diagnosis, and a legend with the run's measurements burned in. Each image is a
Secondary Capture Image Storage instance in the source study, in a series of its own, with UIDs
derived from the run (series ``"SC"``, instance ``"SC-<n>"``) so a rebuild is the same object.

Key slices: the labelled z range is cut into ``key_slices`` equal parts and each part gives its
slice with the most segmented area, so the images spread over the finding and show it at its
largest. All text is ASCII in Pillow's bundled font, so the pixels do not depend on system fonts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage

from inference.measurements import SegmentMeasurement, as_label_map
from inference.packages import Manifest
from inference.results.patient import conform, normalise_code_string
from inference.results.seg import device_attributes, lo, pin_times
from inference.results.uids import derived_uids
from inference.settings import DeviceIdentity
from inference.volume import Volume

logger = logging.getLogger(__name__)

DEFAULT_SC_SERIES_NUMBER = 9903
#: width of the rendered image area in pixels (narrower sources are scaled up, wider ones kept)
MIN_WIDTH = 512
MAX_WIDTH = 1024
#: opacity of a segment's fill over the CT
FILL_ALPHA = 0.35
#: soft-tissue window (centre, width) for CT when the source names none
CT_WINDOW = (40.0, 400.0)

CLINICAL_BANNER = "AI OUTPUT - NOT FOR DIAGNOSIS"
RESEARCH_BANNER = "AI-GENERATED, RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
_BANNER_COLOUR = (170, 20, 20)
_PANEL_COLOUR = (24, 24, 24)
_TEXT_COLOUR = (235, 235, 235)
_DIM_TEXT = (170, 170, 170)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Layout:
    width: int
    image_height: int
    font: Font
    small: Font
    line: int
    pad: int


def key_slice_indices(labels: NDArray[np.uint8], count: int) -> list[int]:
    """Up to ``count`` distinct slices to show, in increasing z.

    The z range holding any label is cut into ``count`` equal parts; each part gives its slice
    with the most labelled voxels. With no label at all, slices evenly spaced through the volume.
    """
    if count < 1:
        raise ValueError("key_slices must be at least 1")
    nz = labels.shape[0]
    area = np.array([np.count_nonzero(labels[z]) for z in range(nz)], dtype=np.int64)
    present = np.flatnonzero(area)
    if present.size == 0:
        spaced = np.linspace(0, nz - 1, num=min(count, nz) + 2)[1:-1].round().astype(int)
        return sorted({int(z) for z in spaced}) or [0]
    z0, z1 = int(present[0]), int(present[-1]) + 1
    edges = np.linspace(z0, z1, num=min(count, z1 - z0) + 1).round().astype(int)
    chosen = {int(a) + int(np.argmax(area[a:b])) for a, b in itertools.pairwise(edges) if b > a}
    return sorted(chosen)


def display_window(volume: Volume, z: int) -> tuple[float, float]:
    """(low, high) display limits for slice ``z``: the source's first window, else a default."""
    ds = volume.datasets[volume.frames[z].instance]
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(centre[0] if isinstance(centre, Sequence) and not isinstance(centre, str) else centre)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
        if w > 1:
            return c - w / 2, c + w / 2
    except (TypeError, ValueError, IndexError):
        pass
    if volume.modality == "CT":
        return CT_WINDOW[0] - CT_WINDOW[1] / 2, CT_WINDOW[0] + CT_WINDOW[1] / 2
    low, high = np.percentile(_slice(volume, z), [1, 99])
    return float(low), float(max(high, low + 1))


def _slice(volume: Volume, z: int) -> NDArray[np.float32]:
    """Slice ``z`` as float32 (a compact volume is int16): the same arithmetic, and pixels, either way."""
    plane: NDArray[np.float32] = volume.hu[z].astype(np.float32, copy=False)
    return plane


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _layout(volume: Volume) -> _Layout:
    _, ny, nx = volume.shape
    _, sy, sx = volume.spacing
    width = int(min(max(nx, MIN_WIDTH), MAX_WIDTH))
    height = int(np.clip(round(width * (ny * sy) / (nx * sx)), 64, 2 * MAX_WIDTH))
    size = max(12, width // 36)
    return _Layout(width, height, _font(size), _font(max(10, size - 3)), size + size // 2, size // 2 + 2)


def _overlay(grey: NDArray[np.uint8], labels: NDArray[np.uint8], colours: dict[int, RGB]) -> NDArray[np.uint8]:
    """RGB of ``grey`` with each label filled at :data:`FILL_ALPHA` and outlined in its colour."""
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
    for label, colour in colours.items():
        mask = labels == label
        if not mask.any():
            continue
        edge = mask & ~ndimage.binary_erosion(mask)
        tint = np.asarray(colour, dtype=np.float32)
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * tint
        rgb[edge] = tint
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _render(volume: Volume, labels: NDArray[np.uint8], z: int, manifest: Manifest,
            found: dict[int, SegmentMeasurement], layout: _Layout, caption: str) -> NDArray[np.uint8]:
    low, high = display_window(volume, z)
    grey = np.clip((_slice(volume, z) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    colours = {s.label: s.colour for s in manifest.output.segments}
    image = Image.fromarray(_overlay(grey, labels[z], colours), mode="RGB")
    image = image.resize((layout.width, layout.image_height), Image.Resampling.BILINEAR)

    segments = manifest.output.segments
    line, pad = layout.line, layout.pad
    banner_h = line + 2 * pad
    panel_h = pad + line * (len(segments) + 3) + pad
    canvas = Image.new("RGB", (layout.width, banner_h + layout.image_height + panel_h), _PANEL_COLOUR)
    draw = ImageDraw.Draw(canvas)
    banner = CLINICAL_BANNER if manifest.clinical_use else RESEARCH_BANNER
    draw.rectangle((0, 0, layout.width, banner_h - 1), fill=_BANNER_COLOUR)
    draw.text((layout.width // 2, banner_h // 2), banner, font=layout.font, fill=(255, 255, 255), anchor="mm")
    canvas.paste(image, (0, banner_h))

    y = banner_h + layout.image_height + pad
    draw.text((pad, y), lo(f"{manifest.title} {manifest.version}"), font=layout.font, fill=_TEXT_COLOUR)
    draw.text((layout.width - pad, y), caption, font=layout.small, fill=_DIM_TEXT, anchor="ra")
    y += line
    unit = "HU" if volume.modality == "CT" else "units"
    columns = (pad + line + pad, int(layout.width * 0.50), int(layout.width * 0.68), int(layout.width * 0.84))
    header = ("Segment", "Volume mL", f"Mean {unit}", f"SD {unit}")
    for x, text in zip(columns, header, strict=True):
        draw.text((x, y), text, font=layout.small, fill=_DIM_TEXT)
    y += line
    for segment in segments:
        m = found.get(segment.label)
        swatch = line - pad
        draw.rectangle((pad, y + 2, pad + swatch, y + 2 + swatch - 4), fill=segment.colour)
        values = (segment.name[:40], _fmt(m.volume_ml if m else None, 1), _fmt(m.mean if m else None),
                  _fmt(m.stddev if m else None))
        for x, text in zip(columns, values, strict=True):
            draw.text((x, y), text, font=layout.font, fill=_TEXT_COLOUR)
        y += line
    draw.text((pad, y), "Volumes and statistics cover the whole series, not this slice only.",
              font=layout.small, fill=_DIM_TEXT)
    return np.asarray(canvas, dtype=np.uint8)


def render_key_images(volume: Volume, labels: NDArray[np.integer] | NDArray[np.bool_],
                      measurements: Sequence[SegmentMeasurement], manifest: Manifest,
                      key_slices: int = 3) -> list[tuple[int, NDArray[np.uint8]]]:
    """``(z, RGB pixels)`` of each key slice, rendered as :func:`build_summary` renders them.

    For a screen (the review dashboard) that shows the overlay without a DICOM wrapper.
    """
    label_map = as_label_map(labels, volume.hu.shape)
    chosen = key_slice_indices(label_map, key_slices)
    found = {m.label: m for m in measurements}
    layout = _layout(volume)
    return [(z, _render(volume, label_map, z, manifest, found, layout,
                        f"key image {n}/{len(chosen)}, slice {z + 1}/{volume.shape[0]}"))
            for n, z in enumerate(chosen, start=1)]


def _orientation(vector: NDArray[np.float64]) -> str:
    """The patient direction (DICOM letter) a unit LPS vector points closest to."""
    axis = int(np.argmax(np.abs(vector)))
    return ("L", "P", "H")[axis] if vector[axis] > 0 else ("R", "A", "F")[axis]


def _source_reference(volume: Volume, z: int) -> Dataset:
    frame = volume.frames[z]
    source = volume.datasets[frame.instance]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if volume.is_multiframe:
        item.ReferencedFrameNumber = frame.frame
    return item


def _copy_body_part(source: Dataset, sc: Dataset) -> None:
    """Body part and laterality as in the source, made conformant: the body part an upper-case code
    string (or left out), laterality only when it is ``R`` or ``L`` after the same cleaning. Laterality
    (type 2C) is empty, i.e. unknown, when the source names neither, as a validator cannot tell
    whether the part is paired."""
    body = normalise_code_string(str(source.get("BodyPartExamined") or ""))
    laterality = normalise_code_string(str(source.get("Laterality") or ""))
    if body:
        sc.BodyPartExamined = body
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = ""


def build_summary(
    volume: Volume,
    labels: NDArray[np.integer] | NDArray[np.bool_],
    measurements: Sequence[SegmentMeasurement],
    manifest: Manifest,
    device: DeviceIdentity,
    uid_root: str,
    run_key: str,
    series_number: int = DEFAULT_SC_SERIES_NUMBER,
    key_slices: int = 3,
    *,
    content_datetime: dt.datetime | None = None,
) -> list[Dataset]:
    """Secondary Capture key images of ``labels`` (z, y, x, manifest label values) on ``volume``.

    Returns one dataset per key slice, in increasing z, all in one new series of the source study.
    UIDs derive from ``uid_root``, ``run_key`` and the model's name and version;
    ``content_datetime`` fixes every date and time written (the default is now).

    Raises
    ------
    ValueError
        When ``labels`` does not match the volume or ``key_slices`` is below 1.
    TypeError
        When ``labels`` is not an integer or boolean array.
    """
    label_map = as_label_map(labels, volume.hu.shape)
    chosen = key_slice_indices(label_map, key_slices)
    found = {m.label: m for m in measurements}
    layout = _layout(volume)
    orientation = (_orientation(volume.direction[:, 0]), _orientation(volume.direction[:, 1]))
    series_uid = derived_uids(uid_root, run_key, manifest.name, manifest.version, "SC").series_instance_uid
    when = content_datetime or dt.datetime.now()
    out: list[Dataset] = []
    for number, z in enumerate(chosen, start=1):
        caption = f"key image {number}/{len(chosen)}, slice {z + 1}/{volume.shape[0]}"
        pixels = _render(volume, label_map, z, manifest, found, layout, caption)
        uids = derived_uids(uid_root, run_key, manifest.name, manifest.version, f"SC-{number}")
        source = volume.datasets[volume.frames[z].instance]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=conform(source).dataset,  # its patient and study attributes made conformant
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=number,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **device_attributes(device),
            institution_name=device.institution_name,
            series_description=lo(f"AI summary {manifest.title} {manifest.version}"),
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
        _copy_body_part(source, sc)
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "YES"
        sc.RecognizableVisualFeatures = "NO"
        sc.SecondaryCaptureDeviceManufacturer = lo(device.manufacturer)
        sc.SecondaryCaptureDeviceManufacturerModelName = lo(device.model_name)
        sc.SecondaryCaptureDeviceSoftwareVersions = lo(device.software_version)
        sc.DateOfSecondaryCapture = DA(when.date())
        sc.TimeOfSecondaryCapture = TM(when.time())
        sc.ImageComments = (CLINICAL_BANNER if manifest.clinical_use else RESEARCH_BANNER)
        sc.DerivationDescription = lo(f"{manifest.name} {manifest.version} overlay, slice {z + 1}")[:64]
        sc.SourceImageSequence = DicomSequence([_source_reference(volume, z)])
        pin_times(sc, content_datetime)
        out.append(sc)
    logger.info("built %d summary image(s) %s", len(out), series_uid[-12:])
    return out


def labels_from_seg(seg: Dataset, volume: Volume, manifest: Manifest) -> NDArray[np.uint8]:
    """The label map (manifest label values, on ``volume``'s grid) a SEG of this run encodes.

    BINARY: where segments overlap the higher segment number wins. FRACTIONAL: each voxel gets the
    most probable of the segments and of the background (what the segments leave, 1 − their sum),
    the segment on a tie; with one segment that is "probability at least one half". This is the
    label map the run measured when the fractions are the model's class probabilities (the pipeline
    takes the argmax of the same), so a reviewer sees the regions the SR's numbers come from.
    Frames are unpacked one at a time, so memory stays at a few arrays of the volume's size.

    Raises
    ------
    ValueError
        When ``seg`` is neither BINARY (1 bit) nor FRACTIONAL (8 bits), or a frame references a
        slice or segment not in ``volume`` or ``manifest``.
    """
    kind = seg.get("SegmentationType")
    bits_allocated = int(seg.get("BitsAllocated", 0))
    if not ((kind == "BINARY" and bits_allocated == 1) or (kind == "FRACTIONAL" and bits_allocated == 8)):
        raise ValueError("only BINARY (1 bit) and FRACTIONAL (8 bit) segmentations can be read back")
    nz, ny, nx = volume.shape
    rows, cols = int(seg.Rows), int(seg.Columns)
    if (rows, cols) != (ny, nx):
        raise ValueError(f"SEG frames are {rows}x{cols}, the volume's slices {ny}x{nx}")
    z_of = {(str(volume.datasets[f.instance].SOPInstanceUID), f.frame if volume.is_multiframe else 1): z
            for z, f in enumerate(volume.frames)}
    label_of = {number: s.label for number, s in enumerate(manifest.output.segments, start=1)}
    data = np.frombuffer(seg.PixelData, dtype=np.uint8)
    per_frame = rows * cols
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    fractional = kind == "FRACTIONAL"
    if fractional:
        best = np.zeros((nz, ny, nx), dtype=np.uint8)    # the highest fraction so far
        total = np.zeros((nz, ny, nx), dtype=np.uint16)  # the segments' sum (background is the rest)
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else Dataset()

    def segment_number(item: Dataset) -> int:
        # a SEG with one segment may identify it once, in the shared functional groups
        holder = item if "SegmentIdentificationSequence" in item else shared
        return int(holder.SegmentIdentificationSequence[0].ReferencedSegmentNumber)

    order = sorted(range(len(seg.PerFrameFunctionalGroupsSequence)),
                   key=lambda i: segment_number(seg.PerFrameFunctionalGroupsSequence[i]))
    for i in order:
        item = seg.PerFrameFunctionalGroupsSequence[i]
        number = segment_number(item)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 1) or 1))
        if key not in z_of or number not in label_of:
            raise ValueError(f"SEG frame {i + 1} references a slice or segment this run does not have")
        z = z_of[key]
        if fractional:
            values = data[i * per_frame:(i + 1) * per_frame].reshape(rows, cols)
            wins = (values > 0) & (values >= best[z])  # segments come in number order: a tie goes up
            labels[z][wins] = label_of[number]
            best[z][wins] = values[wins]
            total[z] += values
            continue
        start = i * per_frame
        bits = np.unpackbits(data[start // 8:(start + per_frame + 7) // 8 + 1], bitorder="little")
        mask = bits[start % 8:start % 8 + per_frame].reshape(rows, cols).astype(bool)
        labels[z][mask] = label_of[number]
    if fractional:
        whole = int(seg.get("MaximumFractionalValue", 255))
        background = np.clip(whole - total.astype(np.int32), 0, None)
        labels[best < background] = 0
    return labels
