"""The local cohort: which stored series train, which validate, and their labels.

The appliance (which owns the store) lists candidate series through :class:`StudySource`;
:func:`build_index` applies a :class:`~fl_client.settings.CohortRule` and writes a cohort index
file. The trainer, inside NVFlare's job process, reads only that index: a job names a cohort, never
a path. Labels come from SEGs (approved in review or imported alongside the study; the rule's
``labels`` says which), mapped to the package's label values by their segmented property type codes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict
from pydicom.dataset import Dataset

from fl_client.errors import CohortError
from fl_client.layout import read_json, write_json
from fl_client.settings import CohortRule, LabelSource
from inference.packages import Manifest
from inference.volume import Volume, load_series

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateSeries:
    """One stored image series and the label SEGs that reference it."""

    study_uid: str
    series_uid: str
    #: header (no pixel data) of one of its instances, for the cohort rule
    header: Dataset
    image_paths: Sequence[Path]
    #: SEGs stored alongside the study (imported from the PACS) that reference the series
    seg_paths: Sequence[Path]
    #: SEGs the appliance made on the series whose job a reviewer approved
    approved_seg_paths: Sequence[Path] = ()


class StudySource(Protocol):
    """What the appliance offers: the image series in its store, each with its eligible SEGs."""

    def series(self) -> Iterable[CandidateSeries]: ...


class SeriesRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    study_uid: str
    series_uid: str
    split: Literal["train", "val"]
    image_paths: tuple[str, ...]
    seg_paths: tuple[str, ...]
    #: a one-way key of the PatientID (counted for the privacy floor; the ID itself is not kept here)
    patient: str = ""


class CohortIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    rule: CohortRule
    created: float
    series: tuple[SeriesRecord, ...]

    def split(self, which: Literal["train", "val"]) -> list[SeriesRecord]:
        return [s for s in self.series if s.split == which]


def label_paths(rule: CohortRule, candidate: CandidateSeries) -> Sequence[Path]:
    """The SEGs that label ``candidate`` under ``rule.labels``.

    ``any`` takes the imported SEGs where there are some (a person drew them) and the approved ones
    otherwise, so two label maps of one series are never mixed.
    """
    if rule.labels is LabelSource.IMPORTED:
        return candidate.seg_paths
    if rule.labels is LabelSource.APPROVED:
        return candidate.approved_seg_paths
    return candidate.seg_paths or candidate.approved_seg_paths


def matches(rule: CohortRule, candidate: CandidateSeries) -> bool:
    h = candidate.header
    if str(getattr(h, "Modality", "")).upper() != rule.modality:
        return False
    if rule.body_parts and str(getattr(h, "BodyPartExamined", "")).upper() not in \
            {b.upper() for b in rule.body_parts}:
        return False
    if rule.series_description is not None and \
            not re.search(rule.series_description, str(getattr(h, "SeriesDescription", ""))):
        return False
    return len(candidate.image_paths) >= rule.min_slices and bool(label_paths(rule, candidate))


def split_of(study_uid: str, validation_fraction: float) -> Literal["train", "val"]:
    """Deterministic per study (crc32, not the salted ``hash``), so a study never changes side."""
    return "val" if (zlib.crc32(study_uid.encode()) % 10_000) / 10_000 < validation_fraction else "train"


def patient_key(header: Dataset) -> str:
    """sha256 of the PatientID (first 16 hex digits); empty when the header has none."""
    pid = str(getattr(header, "PatientID", "") or "")
    return hashlib.sha256(pid.encode()).hexdigest()[:16] if pid else ""


def build_index(name: str, rule: CohortRule, source: StudySource, out: Path) -> CohortIndex:
    """Apply ``rule`` to ``source`` and write the cohort index to ``out``."""
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,31}$", name):
        raise CohortError(f"cohort name {name!r} is not valid")
    chosen = [c for c in source.series() if matches(rule, c)]
    chosen.sort(key=lambda c: (c.study_uid, c.series_uid))
    if rule.max_series is not None:
        chosen = chosen[:rule.max_series]
    records = [SeriesRecord(study_uid=c.study_uid, series_uid=c.series_uid,
                            split=split_of(c.study_uid, rule.validation_fraction),
                            image_paths=tuple(str(p) for p in c.image_paths),
                            seg_paths=tuple(str(p) for p in label_paths(rule, c)),
                            patient=patient_key(c.header)) for c in chosen]
    # every cohort with two or more series validates on at least one and trains on at least one
    if len(records) >= 2 and rule.validation_fraction > 0:
        splits = {r.split for r in records}
        if splits != {"train", "val"}:
            flip = "val" if splits == {"train"} else "train"
            records[-1] = records[-1].model_copy(update={"split": flip})
    index = CohortIndex(name=name, rule=rule, created=time.time(), series=tuple(records))
    write_json(out, index.model_dump(mode="json"))
    log.info("cohort %s: %d series (%d train, %d val)", name, len(records), len(index.split("train")),
             len(index.split("val")))
    return index


def read_index(path: Path) -> CohortIndex:
    data = read_json(path)
    if data is None:
        raise CohortError(f"cohort index {path.name} is missing (portico fl cohort refresh)")
    return CohortIndex.model_validate(data)


#: a FRACTIONAL SEG's voxel belongs to its most probable segment from this probability on
FRACTIONAL_THRESHOLD = 0.5


# ---- labels --------------------------------------------------------------------------------------

def _code_key(code: Any) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def seg_labels(seg_path: Path, volume: Volume, manifest: Manifest) -> NDArray[np.uint8]:
    """A SEG as a label map on ``volume``'s grid, segments mapped to the manifest's labels by code."""
    seg = hd.seg.segread(seg_path)
    by_code = {(s.type.value, s.type.scheme): s.label for s in manifest.output.segments}
    mapping: dict[int, int] = {}
    for number in seg.get_segment_numbers():
        desc = seg.get_segment_description(number)
        label = by_code.get(_code_key(desc.segmented_property_type))
        if label is not None:
            mapping[number] = label
    if not mapping:
        raise CohortError(f"SEG {seg_path.name} has no segment this model knows (by property type code)")
    if volume.is_multiframe:
        raise CohortError("multi-frame image series are not supported for training yet")
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    labels: NDArray[np.uint8]
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        labels = _fractional_labels(seg, uids, mapping)
    else:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=sorted(mapping), combine_segments=True,
            relabel=False, assert_missing_frames_are_empty=True)
        lut = np.zeros(max(mapping) + 1, np.uint8)
        for number, label in mapping.items():
            lut[number] = label
        labels = lut[np.asarray(pixels, dtype=np.int64)]
    if labels.shape != volume.hu.shape:
        raise CohortError(f"SEG {seg_path.name} does not cover the series grid")
    return labels


def _fractional_labels(seg: hd.seg.Segmentation, uids: list[str], mapping: dict[int, int]) -> NDArray[np.uint8]:
    """A FRACTIONAL SEG as a label map: each voxel gets its most probable segment, if at least 0.5."""
    numbers = sorted(mapping)
    fractions = np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=False,
        assert_missing_frames_are_empty=True, rescale_fractional=True), dtype=np.float32)
    best = fractions.argmax(axis=-1)
    labels: NDArray[np.uint8] = np.asarray([mapping[n] for n in numbers], np.uint8)[best]
    labels[fractions.max(axis=-1) < FRACTIONAL_THRESHOLD] = 0
    return labels


# ---- arrays for training -------------------------------------------------------------------------

@dataclass(frozen=True)
class Slices:
    """2D training samples: image (n, 1, s, s) in [0, 1], labels (n, s, s)."""

    image: NDArray[np.float32]
    labels: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.image.shape[0])


def to_grid(array: NDArray[Any], spacing_yx: tuple[float, float], target_mm: float, size: int, *,
            nearest: bool) -> NDArray[Any]:
    """Resample (z, y, x) in-plane to ``target_mm`` pixels, then centre-crop or zero-pad to ``size``."""
    import torch

    ny = max(1, round(array.shape[1] * spacing_yx[0] / target_mm))
    nx = max(1, round(array.shape[2] * spacing_yx[1] / target_mm))
    t = torch.from_numpy(np.ascontiguousarray(array))[:, None].float()
    resized = torch.nn.functional.interpolate(t, size=(ny, nx), mode="nearest" if nearest else "area")[:, 0]
    out = torch.zeros((array.shape[0], size, size), dtype=resized.dtype)
    sy, sx = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    dy, dx = max(0, (size - ny) // 2), max(0, (size - nx) // 2)
    h, w = min(ny, size), min(nx, size)
    out[:, dy:dy + h, dx:dx + w] = resized[:, sy:sy + h, sx:sx + w]
    result: NDArray[Any] = out.numpy()
    return result


def load_slices(records: Sequence[SeriesRecord], manifest: Manifest, size: int, spacing_mm: float) -> Slices:
    """Read, label and window every slice of ``records``; ``spacing_mm`` pixels, ``size`` x ``size``."""
    low, high = manifest.input.intensity.low, manifest.input.intensity.high
    images, labels = [], []
    for record in records:
        volume = load_series([Path(p) for p in record.image_paths])
        label = np.zeros(volume.hu.shape, np.uint8)
        for seg_path in record.seg_paths:
            found = seg_labels(Path(seg_path), volume, manifest)
            label = np.where(found > 0, found, label)
        windowed = (np.clip(volume.hu, low, high) - low) / (high - low)
        yx = (volume.spacing[1], volume.spacing[2])
        images.append(to_grid(windowed, yx, spacing_mm, size, nearest=False).astype(np.float32))
        labels.append(to_grid(label, yx, spacing_mm, size, nearest=True).astype(np.int64))
    if not images:
        return Slices(np.zeros((0, 1, size, size), np.float32), np.zeros((0, size, size), np.int64))
    return Slices(np.concatenate(images)[:, None], np.concatenate(labels))
