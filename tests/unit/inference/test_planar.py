"""Planar measurements in the SR: reference slice, area and outline per segment (TID 1410)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage

from appliance.demo_study import write_ct_series
from inference.measurements import measure
from inference.packages import Manifest, Measurement
from inference.phantom import ADIPOSE, BONE, MUSCLE, make_phantom
from inference.results import build_seg, build_sr
from inference.results.planar import outline, planar_regions, reference_slice
from inference.settings import DeviceIdentity
from inference.volume import Volume, load_series

Case = tuple[Volume, NDArray[np.uint8], Dataset]
ROOT = "1.2.826.0.1.3680043.8.498."
DEVICE = DeviceIdentity(serial_number="TEST-42", software_version="9.9.9")
TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}


def manifest() -> Manifest:
    segments = [
        {"label": ADIPOSE, "name": "Adipose tissue", "category": TISSUE, "colour": (255, 214, 0),
         "type": {"value": "55603005", "scheme": "SCT", "meaning": "Adipose tissue"}},
        {"label": MUSCLE, "name": "Non-adipose soft tissue", "category": TISSUE, "colour": (214, 40, 40),
         "type": {"value": "87784001", "scheme": "SCT", "meaning": "Soft tissue"}},
        {"label": BONE, "name": "Bone", "category": TISSUE, "colour": (240, 240, 220),
         "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone tissue"}},
    ]
    return Manifest.model_validate({
        "name": "body-composition", "version": "1.2.0", "task": "segmentation", "title": "Body composition",
        "algorithm_family": {"value": "123110", "scheme": "DCM", "meaning": "Artificial Intelligence"},
        "input": {"modality": "CT", "intensity": {"low": -200, "high": 300}, "patch_size": (16, 64, 64)},
        "output": {"segments": segments, "measurements": [m.value for m in Measurement]},
        "files": {},
    })


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def polygon_area(points: NDArray[np.float32]) -> float:
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_outline_of_a_rectangle_is_its_pixel_edges() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:9] = True
    points = outline(mask)
    assert points.tolist() == [[3, 2], [9, 2], [9, 6], [3, 6], [3, 2]]  # (column, row), closed


def test_outline_takes_the_largest_region_with_holes_filled() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 5:30] = True
    mask[10:20, 10:20] = False  # a hole: filled for the outline
    mask[33:36, 33:36] = True   # a smaller region: left out
    mask[30, 30] = True         # touches the big square only at a corner: not part of it
    points = outline(mask)
    assert np.array_equal(points[0], points[-1])
    assert polygon_area(points) == pytest.approx(25 * 25)
    assert points.min() >= 5 and points.max() <= 30


def test_outline_of_a_disc_stays_on_its_edge_and_is_bounded() -> None:
    yy, xx = np.mgrid[:300, :300]
    disc = (yy - 150) ** 2 + (xx - 140) ** 2 < 120**2
    points = outline(disc)
    assert len(points) <= 1000
    assert polygon_area(points) == pytest.approx(float(disc.sum()), rel=0.01)


def test_reference_slice_is_the_largest_and_empty_is_none() -> None:
    mask = np.zeros((4, 8, 8), dtype=bool)
    assert reference_slice(mask) is None
    mask[1, :2, :2] = True
    mask[2, :3, :3] = True
    mask[3, :3, :3] = True
    assert reference_slice(mask) == 2  # ties go to the lower index


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    phantom = make_phantom((16, 96, 96), (2.5, 3.7, 3.7), seed=3)
    volume = load_series(write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("ct")).paths)
    m = manifest()
    seg = build_seg(volume, phantom.labels, m, DEVICE, ROOT, "planar")
    sr = build_sr(seg, volume, measure(phantom.labels, volume, m.output.segments), m, DEVICE, ROOT, "planar",
                  labels=phantom.labels)
    return volume, phantom.labels, sr


def test_sr_has_a_planar_group_per_segment_on_its_reference_slice(case: Case) -> None:
    volume, labels, sr_ds = case
    sr = hd.sr.srread(io.BytesIO(to_bytes(sr_ds)))
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 3  # kept
    planar = sr.content.get_planar_roi_measurement_groups()
    segments = manifest().output.segments
    assert len(planar) == len(segments)
    for group, segment in zip(planar, segments, strict=True):
        mask = labels == segment.label
        z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        assert group.roi is not None and group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        image = group.roi.ContentSequence[0].ReferencedSOPSequence[0]  # the IMAGE the SCOORD selects from
        assert image.ReferencedSOPInstanceUID == volume.datasets[z].SOPInstanceUID
        points = group.roi.value
        assert np.array_equal(points[0], points[-1])
        assert points[:, 0].max() <= volume.shape[2] and points[:, 1].max() <= volume.shape[1]
        assert points.min() >= 0
        filled = ndimage.binary_fill_holes(mask[z])
        assert polygon_area(points) <= float(filled.sum()) * 1.02  # the largest region, never more
        (area,) = group.get_measurements()
        assert area.name.meaning == "Area" and area.unit.value == "cm2"
        expected = mask[z].sum() * volume.spacing[1] * volume.spacing[2] / 100
        assert float(area.value) == pytest.approx(expected, rel=1e-4)
        assert group.finding_type is not None and group.finding_type.value == segment.type.value
        # the same tracked finding as the segment's volumetric group (OHIF merges them by this UID)
        (volumetric,) = [g for g in sr.content.get_volumetric_roi_measurement_groups()
                         if g.tracking_uid == group.tracking_uid]
        assert volumetric.referenced_segment is not None


def test_empty_segment_gets_no_planar_group() -> None:
    labels = np.zeros((3, 10, 10), dtype=np.uint8)
    labels[1, 2:5, 2:5] = 2
    regions = planar_regions(labels, [1, 2, 3], (0.5, 0.5))
    assert list(regions) == [2]
    assert regions[2].slice_index == 1 and regions[2].area_cm2 == pytest.approx(9 * 0.25 / 100)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_second_readers_accept_the_planar_sr(case: Case, tmp_path: Path) -> None:
    _, _, sr = case
    path = tmp_path / "sr.dcm"
    path.write_bytes(to_bytes(sr))
    run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line or "Warning" in line]
    assert not problems, problems
    run = subprocess.run([tool("dsrdump"), "-ll", "info", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and not re.search(r"^[EW]:", run.stderr, re.MULTILINE), run.stderr
    assert run.stdout.count('SCOORD:(,,"Image Region")=(POLYLINE') == 3
    assert run.stdout.count('NUM:(,,"Area")') == 3


def test_names_and_colours_a_viewer_shows(case: Case, tmp_path: Path) -> None:
    """Series descriptions say AI and the model; each segment's CIELab is the manifest colour's."""
    volume, labels, sr = case
    m = manifest()
    seg = build_seg(volume, labels, m, DEVICE, ROOT, "planar")
    assert seg.SeriesDescription == "AI SEG Body composition 1.2.0"
    assert sr.SeriesDescription == "AI measurements Body composition 1.2.0"
    for item, segment in zip(seg.SegmentSequence, m.output.segments, strict=True):
        lab = hd.color.CIELabColor.from_rgb(*segment.colour)
        assert list(item.RecommendedDisplayCIELabValue) == list(lab.value)
        assert item.SegmentLabel == segment.name
