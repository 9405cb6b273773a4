"""Secondary Capture summary images: key slices, overlay, identity, UIDs, and validity (dciodvfy)."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from appliance.demo_study import DEMO_PATIENT_ID, write_ct_series
from inference.measurements import SegmentMeasurement, measure
from inference.packages import Manifest, Measurement
from inference.phantom import ADIPOSE, BONE, MUSCLE, make_phantom
from inference.results.seg import build_fractional_seg, build_seg
from inference.results.summary import (
    CLINICAL_BANNER,
    RESEARCH_BANNER,
    build_summary,
    key_slice_indices,
    labels_from_seg,
)
from inference.results.uids import derived_uids
from inference.settings import DeviceIdentity
from inference.volume import Volume, load_series

ROOT = "1.2.826.0.1.3680043.8.498."
DEVICE = DeviceIdentity(serial_number="TEST-42", software_version="9.9.9", institution_name="Test Hospital")
WHEN = dt.datetime(2026, 2, 3, 4, 5, 6)
TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
COLOURS = {ADIPOSE: (255, 214, 0), MUSCLE: (214, 40, 40), BONE: (40, 90, 240)}
SEGMENTS = [
    {"label": ADIPOSE, "name": "Adipose tissue", "category": TISSUE, "colour": COLOURS[ADIPOSE],
     "type": {"value": "55603005", "scheme": "SCT", "meaning": "Adipose tissue"}},
    {"label": MUSCLE, "name": "Skeletal muscle", "category": TISSUE, "colour": COLOURS[MUSCLE],
     "type": {"value": "127954009", "scheme": "SCT", "meaning": "Skeletal muscle tissue"}},
    {"label": BONE, "name": "Bone", "category": TISSUE, "colour": COLOURS[BONE],
     "type": {"value": "56329008", "scheme": "SCT", "meaning": "Bone tissue"}},
]
Case = tuple[Volume, NDArray[np.uint8], list[SegmentMeasurement]]


def manifest(clinical: bool = False) -> Manifest:
    return Manifest.model_validate({
        "name": "body-composition", "version": "1.2.0", "task": "segmentation", "title": "Body composition",
        "clinical_use": clinical,
        "input": {"modality": "CT", "intensity": {"low": -200, "high": 300}, "patch_size": (16, 64, 64)},
        "output": {"segments": SEGMENTS, "measurements": [m.value for m in Measurement]},
        "files": {},
    })


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    phantom = make_phantom((16, 96, 96), (2.5, 3.7, 3.7), seed=3)
    labels = phantom.labels.copy()
    labels[:3] = 0  # an unlabelled end, so the labelled range is not the whole volume
    volume = load_series(write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("ct")).paths)
    return volume, labels, measure(labels, volume, manifest().output.segments)


@pytest.fixture(scope="module")
def summary(case: Case) -> list[Dataset]:
    volume, labels, found = case
    return build_summary(volume, labels, found, manifest(), DEVICE, ROOT, "run-1", content_datetime=WHEN)


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


# --- key slices -------------------------------------------------------------------------------

def test_key_slices_spread_over_the_labelled_range_at_the_largest_area() -> None:
    labels = np.zeros((20, 8, 8), dtype=np.uint8)
    labels[5:15, :2, :2] = 1
    labels[7, :, :] = 1  # the largest slice of the first third
    labels[14, :4, :4] = 2
    chosen = key_slice_indices(labels, 3)
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert 7 in chosen and 14 in chosen
    assert all(5 <= z < 15 for z in chosen)


def test_key_slices_without_labels_are_evenly_spaced_and_never_more_than_the_slices() -> None:
    assert key_slice_indices(np.zeros((9, 4, 4), dtype=np.uint8), 3) == [2, 4, 6]
    assert key_slice_indices(np.zeros((1, 4, 4), dtype=np.uint8), 3) == [0]
    one = np.zeros((5, 4, 4), dtype=np.uint8)
    one[2, 1, 1] = 1
    assert key_slice_indices(one, 3) == [2]
    with pytest.raises(ValueError, match="at least 1"):
        key_slice_indices(one, 0)


# --- the objects ------------------------------------------------------------------------------

def test_secondary_capture_in_the_source_study_with_device_identity(case: Case, summary: list[Dataset]) -> None:
    volume, _, _ = case
    source = volume.datasets[0]
    assert len(summary) == 3
    series = {ds.SeriesInstanceUID for ds in summary}
    assert len(series) == 1 and series != {source.SeriesInstanceUID}
    for number, ds in enumerate(map(reread, summary), start=1):
        assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "OT"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID == DEMO_PATIENT_ID and ds.PatientName == source.PatientName
        assert ds.InstanceNumber == number and ds.SeriesNumber == 9903
        assert ds.ConversionType == "WSD" and ds.BurnedInAnnotation == "YES"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert ds.Manufacturer == "Portico" and ds.ManufacturerModelName == DEVICE.model_name
        assert ds.DeviceSerialNumber == "TEST-42" and ds.SoftwareVersions == "9.9.9"
        assert ds.InstitutionName == "Test Hospital"
        assert ds.SeriesDescription.startswith("AI summary")
        assert ds.ImageComments == RESEARCH_BANNER
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {d.SOPInstanceUID for d in volume.datasets}
        assert "PixelSpacing" not in ds  # burned-in panels: the frame is not a calibrated image


def test_uids_are_derived_and_a_rebuild_is_byte_identical(case: Case, summary: list[Dataset]) -> None:
    volume, labels, found = case
    m = manifest()
    assert summary[0].SeriesInstanceUID == derived_uids(ROOT, "run-1", m.name, m.version, "SC").series_instance_uid
    for n, ds in enumerate(summary, start=1):
        assert ds.SOPInstanceUID == derived_uids(ROOT, "run-1", m.name, m.version, f"SC-{n}").sop_instance_uid
    again = build_summary(volume, labels, found, m, DEVICE, ROOT, "run-1", content_datetime=WHEN)
    assert [to_bytes(a) for a in again] == [to_bytes(b) for b in summary]
    other = build_summary(volume, labels, found, m, DEVICE, ROOT, "run-2", content_datetime=WHEN)
    assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in summary}


def test_pixels_show_the_ct_the_segment_colours_and_the_banner(case: Case, summary: list[Dataset]) -> None:
    volume, labels, _ = case
    for ds in summary:
        pixels = reread(ds).pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns, 3) and ds.Columns >= 512
        top = pixels[2]  # the banner row: dark red, not grey
        assert int(np.median(top[:, 0])) > 120 and int(np.median(top[:, 1])) < 60
        flat = pixels.reshape(-1, 3)
        for label, colour in COLOURS.items():
            z = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            slice_z = [d.SOPInstanceUID for d in volume.datasets].index(z)
            if (labels[slice_z] == label).any():  # the outline is drawn in the exact colour
                assert (flat == np.asarray(colour, dtype=np.uint8)).all(axis=1).any(), label
        grey = flat[(flat[:, 0] == flat[:, 1]) & (flat[:, 1] == flat[:, 2])]
        assert len(np.unique(grey[:, 0])) > 20  # windowed CT grey levels survive under the overlay


def test_clinical_models_get_the_clinical_banner(case: Case) -> None:
    volume, labels, found = case
    images = build_summary(volume, labels, found, manifest(clinical=True), DEVICE, ROOT, "run-1", key_slices=1)
    assert len(images) == 1 and images[0].ImageComments == CLINICAL_BANNER


def test_an_empty_result_still_gives_key_images(case: Case) -> None:
    volume, labels, _ = case
    empty = np.zeros_like(labels)
    found = measure(empty, volume, manifest().output.segments)
    images = build_summary(volume, empty, found, manifest(), DEVICE, ROOT, "run-1", key_slices=2)
    assert len(images) == 2


def test_bad_labels_are_refused(case: Case) -> None:
    volume, labels, found = case
    with pytest.raises(ValueError, match="shape"):
        build_summary(volume, labels[1:], found, manifest(), DEVICE, ROOT, "run-1")
    with pytest.raises(TypeError):
        build_summary(volume, labels.astype(np.float32), found, manifest(), DEVICE, ROOT, "run-1")


def test_labels_read_back_from_the_seg_match(case: Case) -> None:
    volume, labels, _ = case
    seg = build_seg(volume, labels, manifest(), DEVICE, ROOT, "run-1")
    assert np.array_equal(labels_from_seg(reread(seg), volume, manifest()), labels)
    assert np.array_equal(labels_from_seg(seg, volume, manifest()), labels)


def test_labels_read_back_from_a_fractional_seg_are_the_most_probable(case: Case) -> None:
    """Each voxel: the most probable of the segments and the background (1 - their sum); a tie goes up."""
    volume, labels, _ = case
    m = manifest()
    probabilities = np.zeros((len(m.output.segments), *labels.shape), dtype=np.uint8)
    for i, segment in enumerate(m.output.segments):
        probabilities[i][labels == segment.label] = 200
    expected = labels.copy()
    first, second = m.output.segments[0].label, m.output.segments[1].label
    probabilities[:, 0, :4, :4] = 0
    probabilities[0, 0, :2, :2] = 100  # alone at 100/255: the background (155) is likelier
    expected[0, :2, :2] = 0
    probabilities[0, 0, 2:4, 2:4] = 100  # two at 100, background 55: a tie between them goes up
    probabilities[1, 0, 2:4, 2:4] = 100
    expected[0, 2:4, 2:4] = second
    probabilities[0, 0, :2, 2:4] = 120  # 120 against 90 and a background of 45
    probabilities[1, 0, :2, 2:4] = 90
    expected[0, :2, 2:4] = first
    expected[0, 2:4, :2] = 0
    seg = build_fractional_seg(volume, probabilities, m, DEVICE, ROOT, "run-1")
    assert seg.SegmentationType == "FRACTIONAL"
    assert np.array_equal(labels_from_seg(reread(seg), volume, m), expected)


def test_labels_from_seg_refuses_a_seg_of_other_slices(case: Case, tmp_path: Path) -> None:
    volume, labels, _ = case
    seg = build_seg(volume, labels, manifest(), DEVICE, ROOT, "run-1")
    phantom = make_phantom((16, 96, 96), (2.5, 3.7, 3.7), seed=4)
    other = load_series(write_ct_series(phantom.hu, phantom.spacing, tmp_path, seed=4).paths)
    with pytest.raises(ValueError, match="does not have"):
        labels_from_seg(seg, other, manifest())


# --- second readers ---------------------------------------------------------------------------

def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_dciodvfy_finds_no_errors_or_warnings(summary: list[Dataset], tmp_path: Path) -> None:
    for n, ds in enumerate(summary):
        path = tmp_path / f"sc{n}.dcm"
        path.write_bytes(to_bytes(ds))
        run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True)
        lines = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line or "Warning" in line]
        assert not lines, f"{path.name}: {lines}"


def test_dcmtk_reads_it(summary: list[Dataset], tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(summary[0]))
    run = subprocess.run([tool("dcmdump"), "+E", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and "W:" not in run.stderr and "E:" not in run.stderr
    assert "SecondaryCaptureImageStorage" in run.stdout

