"""FRACTIONAL SEG: the manifest option, probabilities from the sliding window, the SEG's content
(round trip through bytes, highdicom, dcmdump and dciodvfy) and the pipeline choosing it."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from numpy.typing import NDArray
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from inference.errors import PackageError
from inference.packages import MANIFEST_NAME, SegType, load_package, read_manifest, write_manifest
from inference.pipeline import run_segmentation
from inference.predict import segment, segment_with_probabilities, window
from inference.results.seg import build_fractional_seg, build_seg
from inference.runtime.onnxruntime import SessionCache
from inference.settings import DeviceIdentity, InferenceSettings
from inference.volume import Volume, load_series
from tests.support.packages import make_package
from tests.support.segs import ROOT, WHEN, SegFiles, seg_manifest, write_segs
from tests.unit.inference.test_predict import Threshold, _ball, blobs, manifest

DEVICE = DeviceIdentity(serial_number="TEST-7")


# --- manifest -----------------------------------------------------------------------------------

def test_seg_type_defaults_to_binary_and_is_validated(tmp_path: Path) -> None:
    root = make_package(tmp_path / "pkg")
    manifest_path = root / MANIFEST_NAME
    assert "seg_type" not in manifest_path.read_text()  # the default is not written: rebuilds stay identical
    package = load_package(root)
    assert package.manifest.output.seg_type == SegType.BINARY

    data = yaml.safe_load(manifest_path.read_text())
    data["output"]["seg_type"] = "fractional"
    manifest_path.write_text(yaml.safe_dump(data))
    parsed, _ = read_manifest(root)
    assert parsed.output.seg_type == SegType.FRACTIONAL
    write_manifest(root, parsed)
    assert "seg_type: fractional" in manifest_path.read_text()

    data["output"]["seg_type"] = "labelmap"
    manifest_path.write_text(yaml.safe_dump(data))
    with pytest.raises(PackageError, match="seg_type"):
        read_manifest(root)


# --- probabilities from the sliding window ------------------------------------------------------

def expected_probabilities(hu: NDArray[np.float32]) -> NDArray[np.float64]:
    x = window(hu, -100, 100).astype(np.float64)
    logits = np.stack([np.zeros_like(x), (x - 0.3) * 10, (x - 0.6) * 20])
    e = np.exp(logits - logits.max(axis=0))
    out: NDArray[np.float64] = 255 * e / e.sum(axis=0)
    return out


@pytest.mark.parametrize(("patch", "overlap"), [((13, 37, 41), 0.25), ((4, 16, 16), 0.5), ((3, 37, 7), 0.25)])
def test_probabilities_are_the_blended_softmax_quantised(patch: tuple[int, int, int], overlap: float) -> None:
    hu = blobs((13, 37, 41), seed=2)
    labels, probabilities = segment_with_probabilities(hu, (2.0, 1.0, 1.0), manifest(patch=patch, overlap=overlap),
                                                       Threshold(), batch_size=3)
    assert probabilities.dtype == np.uint8 and probabilities.shape == (2, *hu.shape)
    # a pointwise model: every blend of the same probability is that probability
    assert np.abs(probabilities - expected_probabilities(hu)[1:]).max() <= 0.51
    np.testing.assert_array_equal(labels, segment(hu, (2.0, 1.0, 1.0), manifest(patch=patch), Threshold()))


def test_probabilities_are_resampled_back_to_the_native_grid() -> None:
    hu = blobs((16, 40, 40), seed=4)
    m = manifest(patch=(4, 16, 16), spacing=(1.0, 1.6, 1.6))
    labels, probabilities = segment_with_probabilities(hu, (2.0, 0.8, 0.8), m, Threshold())
    assert probabilities.shape == (2, *hu.shape)
    np.testing.assert_array_equal(labels, segment(hu, (2.0, 0.8, 0.8), m, Threshold()))
    # linear interpolation of a smooth field: close to the probabilities computed on the native grid
    assert np.abs(probabilities.astype(float) - expected_probabilities(hu)[1:]).mean() < 8


def test_postprocessing_zeroes_the_probability_of_removed_components() -> None:
    hu = np.full((6, 32, 32), -100.0, np.float32)
    hu[_ball(hu.shape, (3, 16, 16), 8)] = 100.0
    hu[_ball(hu.shape, (3, 3, 3), 2)] = 100.0
    labels, probabilities = segment_with_probabilities(hu, (1.0, 1.0, 1.0), manifest(post=("largest_component",)),
                                                       Threshold())
    assert labels[3, 3, 3] == 0 and probabilities[:, 3, 3, 3].max() == 0  # removed with its component
    assert labels[3, 16, 16] == 2  # kept, with the model's probabilities
    assert np.abs(probabilities[:, 3, 16, 16] - expected_probabilities(hu)[1:, 3, 16, 16]).max() <= 0.51


# --- the FRACTIONAL SEG -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segs(tmp_path_factory: pytest.TempPathFactory) -> SegFiles:
    return write_segs(tmp_path_factory.mktemp("segs"))


def read(path: Path) -> hd.seg.Segmentation:
    return hd.seg.segread(io.BytesIO(path.read_bytes()))


def source_uids(volume: Volume) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in volume.datasets]


def test_fractional_seg_round_trips_through_bytes(segs: SegFiles) -> None:
    seg = read(segs.fractional)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255 and seg.BitsAllocated == 8
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "Adipose tissue", "Muscle", "Bone"]
    stored = seg.get_pixels_by_source_instance(source_uids(segs.volume), rescale_fractional=False,
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(stored, np.moveaxis(segs.probabilities, 0, -1))  # lossless
    scaled = seg.get_pixels_by_source_instance(source_uids(segs.volume), assert_missing_frames_are_empty=True)
    assert np.abs(scaled - np.moveaxis(segs.probabilities, 0, -1) / 255.0).max() < 1e-6
    # empty frames are omitted, like the binary path does
    nonempty = int((segs.probabilities.reshape(3, segs.probabilities.shape[1], -1).max(axis=2) > 0).sum())
    assert seg.NumberOfFrames == nonempty


def test_fractional_seg_has_the_binary_segs_geometry_and_references(segs: SegFiles) -> None:
    fractional, binary = pydicom.dcmread(segs.fractional), pydicom.dcmread(segs.binary)
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "Rows", "Columns", "SharedFunctionalGroupsSequence",
                    "ReferencedSeriesSequence", "SegmentSequence", "ContentLabel"):
        assert fractional[keyword].value == binary[keyword].value, keyword
    assert ([item.DimensionIndexPointer for item in fractional.DimensionIndexSequence]
            == [item.DimensionIndexPointer for item in binary.DimensionIndexSequence])

    def frames(ds: pydicom.Dataset) -> dict[tuple[int, str], tuple[str, list[float]]]:
        out = {}
        for item in ds.PerFrameFunctionalGroupsSequence:
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            ref = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            out[number, ref] = (ref, [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        return out

    positions = {ref: pos for ref, pos in frames(fractional).values()}
    assert all(positions[ref] == pos for ref, pos in frames(binary).values())
    assert set(frames(binary)) <= set(frames(fractional))  # soft rims reach slices the label map does not
    assert fractional.SOPInstanceUID != binary.SOPInstanceUID
    assert fractional.SeriesInstanceUID != binary.SeriesInstanceUID


def test_fractional_seg_is_deterministic_and_compressible_at_build(segs: SegFiles) -> None:
    again = build_fractional_seg(segs.volume, segs.probabilities, seg_manifest(), DeviceIdentity(), ROOT, "run",
                                 content_datetime=WHEN)
    buffer = io.BytesIO()
    again.save_as(buffer, enforce_file_format=True)
    assert buffer.getvalue() == segs.fractional.read_bytes()
    compressed = build_fractional_seg(segs.volume, segs.probabilities, seg_manifest(), DeviceIdentity(), ROOT,
                                      "run", content_datetime=WHEN, transfer_syntax_uid=JPEGLSLossless)
    assert compressed.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(compressed.pixel_array, pydicom.dcmread(segs.fractional).pixel_array)


def test_fractional_seg_rejects_bad_probabilities(segs: SegFiles) -> None:
    m = seg_manifest()
    with pytest.raises(TypeError):
        build_fractional_seg(segs.volume, segs.probabilities.astype(np.float32) / 255,  # type: ignore[arg-type]
                             m, DEVICE, ROOT, "run")
    with pytest.raises(ValueError, match="shape"):
        build_fractional_seg(segs.volume, segs.probabilities[:2], m, DEVICE, ROOT, "run")


def test_fractional_seg_on_a_multiframe_source(segs: SegFiles, tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in reversed(sorted((segs.fractional.parent / "ct").glob("*.dcm")))]
    multiframe = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, pydicom.uid.generate_uid(), 3,
                                                          pydicom.uid.generate_uid(), 1)
    path = tmp_path / "mf.dcm"
    multiframe.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    # the phantom's z order may differ from the frames'; the probabilities follow the volume
    order = [next(i for i, ds in enumerate(segs.volume.datasets)
                  if ds.ImagePositionPatient == multiframe.PerFrameFunctionalGroupsSequence[f.frame - 1]
                  .PlanePositionSequence[0].ImagePositionPatient) for f in volume.frames]
    probabilities = np.ascontiguousarray(segs.probabilities[:, order])
    seg = build_fractional_seg(volume, probabilities, seg_manifest(), DEVICE, ROOT, "mf")
    back = hd.seg.segread(io.BytesIO(to_bytes(seg))).get_pixels_by_source_frame(
        multiframe.SOPInstanceUID, [f.frame for f in volume.frames], rescale_fractional=False,
        assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(back, np.moveaxis(probabilities, 0, -1))


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_dcmdump_and_dciodvfy_accept_the_fractional_seg(segs: SegFiles) -> None:
    run = subprocess.run([tool("dcmdump"), str(segs.fractional)], capture_output=True, text=True)
    assert run.returncode == 0 and "E:" not in run.stderr and "W:" not in run.stderr, run.stderr
    run = subprocess.run([tool("dciodvfy"), str(segs.fractional)], capture_output=True, text=True)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert not errors, errors


# --- the pipeline -------------------------------------------------------------------------------

def test_pipeline_builds_the_seg_type_the_package_asks_for(tmp_path: Path, segs: SegFiles) -> None:
    paths = sorted((segs.fractional.parent / "ct").glob("*.dcm"))
    root = make_package(tmp_path / "pkg")
    settings = InferenceSettings(providers=("CPUExecutionProvider",), device=DEVICE)
    sessions = SessionCache()
    binary = run_segmentation(paths, load_package(root), sessions, settings, "run")
    data = yaml.safe_load((root / MANIFEST_NAME).read_text())
    data["output"]["seg_type"] = "fractional"
    (root / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    fractional = run_segmentation(paths, load_package(root), sessions, settings, "run")
    assert binary.seg.SegmentationType == "BINARY" and fractional.seg.SegmentationType == "FRACTIONAL"
    assert fractional.measurements == binary.measurements  # from the label map either way
    np.testing.assert_array_equal(fractional.labels, binary.labels)
    ref = fractional.sr.ContentSequence
    assert str(fractional.seg.SOPInstanceUID) in str(ref)  # the SR points at the FRACTIONAL SEG
    seg = hd.seg.Segmentation.from_dataset(fractional.seg)
    probabilities = seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in fractional.volume.datasets], rescale_fractional=False,
        assert_missing_frames_are_empty=True)[..., 0]
    foreground = fractional.labels == 1
    assert probabilities[foreground].min() >= 128 and probabilities[~foreground].max() <= 128


def test_binary_build_is_unchanged(segs: SegFiles) -> None:
    labels = np.zeros(segs.volume.hu.shape, np.uint8)
    seg = build_seg(segs.volume, labels, seg_manifest(SegType.BINARY), DEVICE, ROOT, "run",
                    content_datetime=dt.datetime(2024, 1, 1))
    assert seg.SegmentationType == "BINARY" and seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
