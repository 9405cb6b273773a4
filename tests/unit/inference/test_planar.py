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


def inside_even_odd(points: NDArray[np.float32], shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Pixels whose centres an even–odd fill of the closed polyline covers (how viewers fill it)."""
    rows, cols = np.mgrid[:shape[0], :shape[1]] + 0.5
    inside = np.zeros(shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(points[:-1].astype(np.float64), points[1:].astype(np.float64), strict=True):
        if y0 == y1:
            continue
        crosses = (rows >= min(y0, y1)) & (rows < max(y0, y1))
        x_at = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (cols < x_at)
    return inside


def test_outline_encloses_every_region_and_leaves_the_holes_out() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:30, 5:30] = True
    mask[10:20, 10:20] = False  # a hole
    mask[33:36, 33:36] = True   # a second region
    mask[30, 30] = True         # touches the big square only at a corner
    mask[2, 37] = True          # a single pixel
    points = outline(mask)
    assert np.array_equal(points[0], points[-1])
    # the shoelace area (what OHIF computes for the polyline) is the segment's pixel area
    assert polygon_area(points) == pytest.approx(float(mask.sum()))
    # and an even-odd fill covers exactly its pixels: the bridges between the loops are zero-width
    assert np.array_equal(inside_even_odd(points, mask.shape), mask)


def test_outline_of_a_ring_has_its_hole() -> None:
    yy, xx = np.mgrid[:200, :200]
    radius = np.hypot(yy - 100, xx - 100)
    ring = (radius < 90) & (radius >= 70)  # subcutaneous fat around the abdomen, say
    points = outline(ring)
    assert polygon_area(points) == pytest.approx(float(ring.sum()), rel=0.01)
    assert not inside_even_odd(points, ring.shape)[100, 100]


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
    planar = sr.content.get_image_measurement_groups()  # TID 1501
    segments = manifest().output.segments
    assert len(planar) == len(segments)
    for group, segment in zip(planar, segments, strict=True):
        mask = labels == segment.label
        z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        (area,) = group.get_measurements()
        assert area.name.meaning == "Area" and area.unit.value == "cm2"
        expected = mask[z].sum() * volume.spacing[1] * volume.spacing[2] / 100
        assert float(area.value) == pytest.approx(expected, rel=1e-4)
        # the area is inferred from the outline on the source image (TID 300 → TID 320)
        (region,) = area.referenced_coordinates
        assert region.relationship_type == hd.sr.RelationshipTypeValues.INFERRED_FROM
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        image = region.ContentSequence[0].ReferencedSOPSequence[0]  # the IMAGE the SCOORD selects from
        assert image.ReferencedSOPInstanceUID == volume.datasets[z].SOPInstanceUID
        points = region.value
        assert np.array_equal(points[0], points[-1])
        assert points[:, 0].max() <= volume.shape[2] and points[:, 1].max() <= volume.shape[1]
        assert points.min() >= 0
        # what the outline encloses is what the area measures (OHIF recomputes it from the outline)
        pixel_area_cm2 = volume.spacing[1] * volume.spacing[2] / 100
        assert polygon_area(points) * pixel_area_cm2 == pytest.approx(float(area.value), rel=0.02)
        assert group.finding_type is not None and group.finding_type.value == segment.type.value
        # the tracking identifier OHIF loads into its PlanarFreehandROI tool, then the segment's name
        tool = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
        assert group.tracking_identifier == f"{tool}:body-composition {segment.name}"
        # the same tracked finding as the segment's volumetric group (OHIF merges them by this UID)
        (volumetric,) = [g for g in sr.content.get_volumetric_roi_measurement_groups()
                         if g.tracking_uid == group.tracking_uid]
        assert volumetric.referenced_segment is not None
        assert volumetric.tracking_identifier == f"body-composition {segment.name}"


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
    assert run.stdout.count('SCOORD:(,,"Source")=(POLYLINE') == 3
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
