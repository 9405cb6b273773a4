"""Measurements, deterministic UIDs, SEG and TID 1500 SR: round trips through bytes and second readers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.demo_study import DEMO_PATIENT_ID, DEMO_PATIENT_NAME, write_ct_series
from inference.measurements import SegmentMeasurement, measure
from inference.packages import Manifest, Measurement
from inference.phantom import ADIPOSE, BONE, MUSCLE, make_phantom
from inference.results import build_seg, build_sr, derive_uid, derived_uids, make_run_key
from inference.settings import DeviceIdentity
from inference.volume import Volume, load_series

ROOT = "1.2.826.0.1.3680043.8.498."
Case = tuple[Volume, NDArray[np.uint8]]
Built = tuple[Dataset, Dataset, list[SegmentMeasurement]]
DEVICE = DeviceIdentity(serial_number="TEST-42", software_version="9.9.9")
TISSUE = {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"}
SEGMENTS = [
    {"label": ADIPOSE, "name": "Adipose tissue", "category": TISSUE, "colour": (255, 255, 0),
     "type": {"value": "55603005", "scheme": "SCT", "meaning": "Adipose tissue"}},
    {"label": MUSCLE, "name": "Skeletal muscle", "category": TISSUE, "colour": (255, 0, 0),
     "type": {"value": "127954009", "scheme": "SCT", "meaning": "Skeletal muscle tissue"}},
    {"label": BONE, "name": "Bone", "category": TISSUE, "colour": (255, 255, 255),
     "type": {"value": "56329008", "scheme": "SCT", "meaning": "Bone tissue"}},
]


def manifest(segments: list[dict[str, Any]] = SEGMENTS, version: str = "1.2.0") -> Manifest:
    return Manifest.model_validate({
        "name": "body-composition", "version": version, "task": "segmentation", "title": "Body composition",
        "algorithm_family": {"value": "123110", "scheme": "DCM", "meaning": "Artificial Intelligence"},
        "input": {"modality": "CT", "intensity": {"low": -200, "high": 300}, "patch_size": (16, 64, 64)},
        "output": {"segments": segments, "measurements": [m.value for m in Measurement]},
        "files": {},
    })


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, NDArray[np.uint8]]:
    phantom = make_phantom((16, 96, 96), (2.5, 3.7, 3.7), seed=3)
    written = write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("ct"))
    volume = load_series(written.paths)
    return volume, phantom.labels


@pytest.fixture(scope="module")
def built(phantom_case: Case) -> Built:
    volume, labels = phantom_case
    m = manifest()
    found = measure(labels, volume, m.output.segments)
    seg = build_seg(volume, labels, m, DEVICE, ROOT, "run-1")
    sr = build_sr(seg, volume, found, m, DEVICE, ROOT, "run-1")
    return seg, sr, found


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(ds))
    return path


# --- measurements -----------------------------------------------------------------------------

def test_measure_known_values() -> None:
    hu = np.zeros((2, 3, 4), np.float32)
    hu[0, 0, :2] = [10.0, 30.0]
    labels = np.zeros(hu.shape, np.uint8)
    labels[0, 0, :2] = 1
    volume = Volume(hu=hu, spacing=(2.0, 5.0, 10.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                    datasets=[], modality="CT", frames=())
    found = measure(labels, volume, manifest().output.segments)
    first, second = found[0], found[1]
    assert first.voxel_count == 2
    assert first.volume_ml == pytest.approx(0.2)
    assert (first.mean, first.stddev, first.min, first.max) == (20.0, 10.0, 10.0, 30.0)
    assert second == SegmentMeasurement(MUSCLE, "Skeletal muscle", 0, 0.0, None, None, None, None)
    with pytest.raises(ValueError, match="shape"):
        measure(labels[:1], volume, manifest().output.segments)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        measure(labels.astype(np.int32) + 300, volume, manifest().output.segments)
    with pytest.raises(TypeError):
        measure(labels.astype(np.float32), volume, manifest().output.segments)
    assert measure(labels.astype(np.int64), volume, manifest().output.segments) == found


def test_measure_phantom_matches_numpy(phantom_case: Case) -> None:
    volume, labels = phantom_case
    for found in measure(labels, volume, manifest().output.segments):
        values = volume.hu[labels == found.label].astype(np.float64)
        assert found.voxel_count == values.size > 0
        assert found.volume_ml == pytest.approx(values.size * np.prod(volume.spacing) / 1000)
        assert found.mean == pytest.approx(values.mean())
        assert found.stddev == pytest.approx(values.std())
        assert (found.min, found.max) == (values.min(), values.max())


# --- UIDs -------------------------------------------------------------------------------------

def test_derive_uid_is_valid_and_deterministic() -> None:
    uid = derive_uid(ROOT, "a", "b")
    assert uid == derive_uid(ROOT.rstrip("."), "a", "b")
    assert len(uid) <= 64 and re.fullmatch(r"[0-9.]+", uid) and uid.startswith(ROOT)
    assert pydicom.uid.UID(uid).is_valid
    assert derive_uid(ROOT, "ab", "c") != derive_uid(ROOT, "a", "bc")
    assert derive_uid(ROOT, "a") != derive_uid("1.2.3", "a")
    with pytest.raises(ValueError):
        derive_uid("1.02.3", "a")
    with pytest.raises(ValueError):
        derive_uid("1." * 25, "a")
    with pytest.raises(ValueError):
        derive_uid(ROOT)


def test_run_key_and_derived_uids() -> None:
    key = make_run_key("1.2.3", ["1.2.3.2", "1.2.3.1"], "m", "1.0.0")
    assert key == make_run_key("1.2.3", ["1.2.3.1", "1.2.3.2"], "m", "1.0.0")
    assert key != make_run_key("1.2.3", ["1.2.3.1", "1.2.3.2"], "m", "1.0.0", run_version=2)
    seg, sr = derived_uids(ROOT, key, "m", "1.0.0", "SEG"), derived_uids(ROOT, key, "m", "1.0.0", "SR")
    uids = {seg.series_instance_uid, seg.sop_instance_uid, sr.series_instance_uid, sr.sop_instance_uid}
    assert len(uids) == 4


def test_builds_are_deterministic(phantom_case: Case,
                                  built: Built) -> None:
    volume, labels = phantom_case
    seg, sr, found = built
    m = manifest()
    seg2 = build_seg(volume, labels, m, DEVICE, ROOT, "run-1")
    sr2 = build_sr(seg2, volume, found, m, DEVICE, ROOT, "run-1")
    for first, second in ((seg, seg2), (sr, sr2)):
        assert first.SOPInstanceUID == second.SOPInstanceUID
        assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    other = build_seg(volume, labels, manifest(version="1.3.0"), DEVICE, ROOT, "run-1")
    assert other.SOPInstanceUID != seg.SOPInstanceUID
    assert build_seg(volume, labels, m, DEVICE, ROOT, "run-2").SOPInstanceUID != seg.SOPInstanceUID


def test_rebuild_with_fixed_time_is_byte_identical(phantom_case: Case, built: Built) -> None:
    volume, labels = phantom_case
    found, m = built[2], manifest()
    when = dt.datetime(2026, 3, 4, 5, 6, 7)
    first, second = (build_seg(volume, labels, m, DEVICE, ROOT, "run-1", content_datetime=when) for _ in "ab")
    assert to_bytes(first) == to_bytes(second)
    assert str(first.ContentDate) == "20260304" and str(first.SeriesTime) == "050607"
    sr = [to_bytes(build_sr(first, volume, found, m, DEVICE, ROOT, "run-1", content_datetime=when))
          for _ in "ab"]
    assert sr[0] == sr[1]


def test_logs_carry_no_patient_identifiers(phantom_case: Case, caplog: pytest.LogCaptureFixture) -> None:
    volume, labels = phantom_case
    m = manifest()
    with caplog.at_level(logging.DEBUG):
        load_series([Path(ds.filename) for ds in volume.datasets])
        found = measure(labels, volume, m.output.segments)
        build_sr(build_seg(volume, labels, m, DEVICE, ROOT, "log"), volume, found, m, DEVICE, ROOT, "log")
    assert caplog.records
    assert DEMO_PATIENT_NAME not in caplog.text and DEMO_PATIENT_ID not in caplog.text


# --- SEG --------------------------------------------------------------------------------------

def test_seg_round_trip(phantom_case: Case,
                        built: Built) -> None:
    volume, labels = phantom_case
    seg = hd.seg.segread(io.BytesIO(to_bytes(built[0])))
    m = manifest()
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.number_of_segments == 3
    for number, segment in enumerate(m.output.segments, start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == segment.name
        assert desc.segmented_property_type.value == segment.type.value
        assert desc.segmented_property_category.value == segment.category.value
        assert desc.algorithm_type.value == "AUTOMATIC"
        assert desc.algorithm_identification is not None
        algo = desc.algorithm_identification[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("Body composition", "1.2.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert (seg.Manufacturer, seg.DeviceSerialNumber, seg.SoftwareVersions) == ("Portico", "TEST-42", "9.9.9")
    assert seg.SeriesDescription.startswith("AI ") and seg.ContentLabel == "BODY_COMPOSITION"
    assert seg.ContentQualification == "RESEARCH"
    assert seg.StudyInstanceUID == volume.study_instance_uid
    # pixels come back per source instance, exactly as the label map
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, labels)
    # empty frames are omitted: one frame per (slice, segment) with content
    with_content = [int((labels == s.label).any(axis=(1, 2)).sum()) for s in m.output.segments]
    assert int(seg.NumberOfFrames) == sum(with_content)


def test_seg_renumbers_labels_and_keeps_empty_segments(phantom_case: Case) -> None:
    volume, labels = phantom_case
    remapped = np.zeros_like(labels)
    remapped[labels == BONE] = 7
    remapped[labels == ADIPOSE] = 4
    segments = [dict(SEGMENTS[2], label=7), dict(SEGMENTS[0], label=4), dict(SEGMENTS[1], label=9)]
    m = manifest(segments)
    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(volume, remapped, m, DEVICE, ROOT, "r"))))
    assert seg.number_of_segments == 3  # the empty third segment is listed, with no frames
    assert [seg.get_segment_description(n).segment_label for n in (1, 2, 3)] == ["Bone", "Adipose tissue",
                                                                                "Skeletal muscle"]
    referenced = {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {1, 2}
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back == 1, labels == BONE)
    np.testing.assert_array_equal(back == 2, labels == ADIPOSE)

    found = measure(remapped, volume, m.output.segments)
    sr = hd.sr.srread(io.BytesIO(to_bytes(build_sr(build_seg(volume, remapped, m, DEVICE, ROOT, "r"), volume,
                                                   found, m, DEVICE, ROOT, "r"))))
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    empty = groups[2]
    assert [x.name.meaning for x in empty.get_measurements()] == ["Volume"]
    assert empty.get_measurements()[0].value == 0

    with pytest.raises(ValueError, match="no manifest segment"):
        build_seg(volume, labels, m, DEVICE, ROOT, "r")


def test_seg_on_multiframe_source(phantom_case: Case, tmp_path: Path) -> None:
    volume, labels = phantom_case
    paths = write_ct_series(volume.hu, volume.spacing, tmp_path / "ct").paths
    datasets = [pydicom.dcmread(p) for p in reversed(paths)]
    multiframe = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 3, generate_uid(), 1)
    mf_volume = load_series([write(multiframe, tmp_path / "mf.dcm")])
    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(mf_volume, labels, manifest(), DEVICE, ROOT, "mf"))))
    frames = [f.frame for f in mf_volume.frames]
    back = seg.get_pixels_by_source_frame(multiframe.SOPInstanceUID, frames, combine_segments=True,
                                          skip_overlap_checks=True)
    np.testing.assert_array_equal(back, labels)


# --- SR ---------------------------------------------------------------------------------------

def test_sr_round_trip(phantom_case: Case,
                       built: Built) -> None:
    volume, _ = phantom_case
    seg, sr_ds, found = built
    sr = hd.sr.srread(io.BytesIO(to_bytes(sr_ds)))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "PARTIAL")
    assert sr.SeriesDescription.startswith("AI ") and sr.ContentQualification == "RESEARCH"
    assert sr.content.template_id == "1500" if hasattr(sr.content, "template_id") else True
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    evidence |= {item.ReferencedSOPInstanceUID
                 for study in sr.get("PertinentOtherEvidenceSequence", [])
                 for series in study.ReferencedSeriesSequence
                 for item in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, *(ds.SOPInstanceUID for ds in volume.datasets)}

    assert sr.content[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    device = sr.content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    attributes = device[0].observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.serial_number == "TEST-42"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    for number, (group, expect, segment) in enumerate(zip(groups, found, manifest().output.segments,
                                                          strict=True), start=1):
        assert group.referenced_segment is not None
        segment_item, series_item = group.referenced_segment
        assert segment_item.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment_item.referenced_segment_numbers == [number]
        assert series_item.value == volume.series_instance_uid
        assert group.finding_type is not None and group.finding_type.value == segment.type.value
        assert group.finding_category is not None and group.finding_category.value == segment.category.value
        assert group.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
        by_name: dict[str, float] = {}
        for item in group.get_measurements():
            derivation = item.derivation.meaning if item.derivation is not None else ""
            by_name[f"{item.name.meaning}/{derivation}"] = float(item.value)
            assert item.unit.value in ("cm3", "[hnsf'U]")
        assert by_name["Volume/"] == pytest.approx(expect.volume_ml, rel=1e-6)
        assert by_name["Attenuation Coefficient/Mean"] == pytest.approx(expect.mean, rel=1e-6)
        assert by_name["Attenuation Coefficient/Standard Deviation"] == pytest.approx(expect.stddev, rel=1e-6)
        assert by_name["Attenuation Coefficient/Minimum"] == expect.min
        assert by_name["Attenuation Coefficient/Maximum"] == expect.max


# --- second readers ---------------------------------------------------------------------------

def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_dcmtk_reads_both(built: Built, tmp_path: Path) -> None:
    seg, sr, _ = built
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        path = write(ds, tmp_path / name)
        run = subprocess.run([tool("dcmdump"), str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert not re.search(r"^[EW]:", run.stderr, re.MULTILINE), run.stderr
    run = subprocess.run([tool("dsrdump"), "-ll", "info", str(tmp_path / "sr.dcm")], capture_output=True,
                         text=True)
    assert run.returncode == 0 and not re.search(r"^[EW]:", run.stderr, re.MULTILINE), run.stderr
    assert "Imaging Measurement Report" in run.stdout and "Attenuation Coefficient" in run.stdout


def test_dciodvfy_finds_no_errors(built: Built,
                                  tmp_path: Path) -> None:
    seg, sr, _ = built
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        run = subprocess.run([tool("dciodvfy"), str(write(ds, tmp_path / name))], capture_output=True,
                             text=True)
        lines = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert not lines, f"{name}: {lines}"


# --- geometry on real CT ----------------------------------------------------------------------

@pytest.mark.slow
def test_real_seg_maps_voxel_for_voxel(real_data: Path) -> None:
    nib = pytest.importorskip("nibabel", reason="nibabel reads the NIfTI mask")
    folder = real_data / "totalsegmentator"
    volume = load_series(sorted((folder / "example_ct_dicom").iterdir()))
    nii = np.asarray(nib.load(folder / "example_seg_dicom.nii.gz").dataobj).astype(np.uint8)
    mask = np.ascontiguousarray(nii[:, ::-1, :].transpose(2, 1, 0))  # mask[z,row,col] = nii[col, 511-row, z]
    # the export blanks study and series UIDs; give it stand-ins so a SEG can reference it
    study, series = generate_uid(), generate_uid()
    headers = []
    for ds in volume.datasets:
        copy = Dataset(ds)
        copy.StudyInstanceUID, copy.SeriesInstanceUID = study, series
        headers.append(copy)
    volume = dataclasses.replace(volume, datasets=headers)
    values = [int(v) for v in np.unique(mask) if v]
    segments = [{"label": v, "name": f"structure {v}", "category": TISSUE,
                 "type": {"value": f"S{v}", "scheme": "99PORTICO", "meaning": f"structure {v}"}}
                for v in values]
    m = manifest(segments)
    liver = next(f for f in measure(mask, volume, m.output.segments) if f.label == 5)
    assert liver.mean is not None and 60 < liver.mean < 120  # the mapping puts liver on liver

    seg = hd.seg.segread(io.BytesIO(to_bytes(build_seg(volume, mask, m, DEVICE, ROOT, "real"))))
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False,
                                             skip_overlap_checks=True)
    expected = np.zeros_like(mask)
    for number, value in enumerate(values, start=1):
        expected[mask == value] = number
    np.testing.assert_array_equal(back, expected)
    # and by geometry alone: the SEG's own volume lands on the CT grid (highdicom may flip an axis)
    seg_volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    to_ct = np.linalg.solve(volume.affine, seg_volume.affine)  # SEG indices → CT indices
    signs = np.round(np.diag(to_ct[:3, :3]))
    np.testing.assert_allclose(to_ct[:3, :3], np.diag(signs), atol=1e-6)
    assert set(np.abs(signs)) == {1.0}
    array = seg_volume.array
    start = []
    for axis, sign in enumerate(signs):
        first = float(to_ct[axis, 3])
        assert abs(first - round(first)) < 1e-4
        if sign < 0:
            array = np.flip(array, axis=axis)
            first -= array.shape[axis] - 1
        start.append(round(first))
    z0, y0, x0 = start
    nz, ny, nx = array.shape
    np.testing.assert_array_equal(array, expected[z0:z0 + nz, y0:y0 + ny, x0:x0 + nx])
