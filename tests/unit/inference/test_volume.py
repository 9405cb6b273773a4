"""Series → volume: slice order, compression, multi-frame, geometry refusals, real CT."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from appliance.demo_study import write_ct_series
from inference.errors import SeriesError
from inference.volume import Volume, load_series

SPACING = (2.5, 1.5, 1.25)


@pytest.fixture(scope="module")
def hu() -> NDArray[np.float32]:
    rng = np.random.default_rng(7)
    return rng.integers(-1000, 1500, size=(12, 40, 48)).astype(np.float32)


@pytest.fixture(scope="module")
def series(hu: NDArray[np.float32], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_series(hu, SPACING, tmp_path_factory.mktemp("plain")).paths


def edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def copy_series(paths: list[Path], out: Path) -> list[Path]:
    out.mkdir()
    copies = []
    for p in paths:
        target = out / p.name
        target.write_bytes(p.read_bytes())
        copies.append(target)
    return copies


def test_loads_in_hu_with_geometry(series: list[Path], hu: NDArray[np.float32]) -> None:
    volume = load_series(series)
    assert volume.hu.dtype == np.float32
    assert volume.shape == hu.shape
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing == pytest.approx(SPACING)
    nz, ny, nx = hu.shape
    assert volume.origin == pytest.approx((-nx * SPACING[2] / 2, -ny * SPACING[1] / 2, -nz * SPACING[0]))
    np.testing.assert_allclose(volume.direction, np.eye(3))
    assert volume.modality == "CT"
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == list(range(1, nz + 1))
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert not volume.is_multiframe
    # the affine maps the last voxel to the last slice's position
    last = volume.affine @ np.array([nz - 1, ny - 1, nx - 1, 1.0])
    ipp = np.array([float(v) for v in volume.datasets[-1].ImagePositionPatient])
    np.testing.assert_allclose(last[:3], ipp + np.array([(nx - 1) * SPACING[2], (ny - 1) * SPACING[1], 0.0]))


def test_file_order_does_not_matter(hu: NDArray[np.float32], series: list[Path], tmp_path: Path) -> None:
    order = list(np.random.default_rng(3).permutation(hu.shape[0]))
    shuffled = write_ct_series(hu, SPACING, tmp_path, order=order).paths
    reference = load_series(series)
    rng = np.random.default_rng(5)
    volume = load_series([shuffled[i] for i in rng.permutation(len(shuffled))])
    np.testing.assert_array_equal(volume.hu, reference.hu)
    assert volume.origin == reference.origin
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in reference.datasets]


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["j2k", "rle"])
def test_compressed_equals_uncompressed(hu: NDArray[np.float32], series: list[Path], tmp_path: Path,
                                        syntax: str) -> None:
    compressed = write_ct_series(hu, SPACING, tmp_path, transfer_syntax=syntax).paths
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(compressed).hu, load_series(series).hu)


def test_enhanced_multiframe_equals_classic(series: list[Path], tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in reversed(series)]
    multiframe = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 3, generate_uid(), 1)
    path = tmp_path / "mf.dcm"
    multiframe.save_as(path)
    classic = load_series(series)
    volume = load_series([path])
    np.testing.assert_array_equal(volume.hu, classic.hu)
    assert volume.spacing == pytest.approx(classic.spacing)
    assert volume.origin == pytest.approx(classic.origin)
    assert volume.is_multiframe and len(volume.datasets) == 1
    assert sorted(f.frame for f in volume.frames) == list(range(1, len(series) + 1))


def test_rescale_slope_and_intercept(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")

    def rescale(ds: Dataset) -> None:
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-10"
    edit(paths[4], rescale)
    raw = pydicom.dcmread(paths[4]).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(load_series(paths).hu[4], raw * 0.5 - 10)


def refused(paths: list[Path], *words: str) -> str:
    with pytest.raises(SeriesError) as info:
        load_series(paths)
    message = str(info.value)
    for word in words:
        assert word in message
    return message


def test_refuses_gantry_tilt(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")
    shift = SPACING[0] * math.tan(math.radians(15))
    for k, path in enumerate(paths):
        def tilt(ds: Dataset, k: int = k) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + k * shift, z]
        edit(path, tilt)
    assert "15.00°" in refused(paths, "gantry tilt")


def test_refuses_missing_slice(series: list[Path]) -> None:
    refused(series[:5] + series[6:], "missing slices", "1 slice")


def test_refuses_uneven_spacing(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")

    def nudge(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.4]
    edit(paths[6], nudge)
    refused(paths, "uneven slice spacing")


def test_accepts_rounding_within_tolerance(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")

    def nudge(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 0.004, y, z + 0.005]
    edit(paths[6], nudge)
    assert load_series(paths).spacing[0] == pytest.approx(SPACING[0])


def test_refuses_mixed_orientation(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))

    def rotate(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [c, s, 0, -s, c, 0]
    edit(paths[3], rotate)
    refused(paths, "mixed orientations")


def test_refuses_duplicate_positions(series: list[Path], tmp_path: Path) -> None:
    paths = copy_series(series, tmp_path / "s")
    extra = tmp_path / "s" / "dup.dcm"
    extra.write_bytes(paths[2].read_bytes())

    def new_uid(ds: Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    edit(extra, new_uid)
    refused([*paths, extra], "duplicate slice positions")


def test_refuses_mixed_image_sizes(series: list[Path], tmp_path: Path) -> None:
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    other = write_ct_series(np.zeros((1, 20, 48), np.float32), SPACING, tmp_path,
                            study_instance_uid=first.StudyInstanceUID,
                            series_instance_uid=first.SeriesInstanceUID).paths
    refused([*series, *other], "mixed image sizes (Rows)")


def test_refuses_non_image_objects(series: list[Path], tmp_path: Path) -> None:
    report = tmp_path / "sr.dcm"
    ds = pydicom.dcmread(series[0], stop_before_pixels=True)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.34")
    ds.Modality = "SR"
    ds.save_as(report)
    refused([*series, report], "not an image")


def test_refuses_unreadable_and_missing_pixels(series: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    refused([*series, junk], "not a readable DICOM file")
    paths = copy_series(series, tmp_path / "s")

    def strip(ds: Dataset) -> None:
        del ds.PixelData
    edit(paths[1], strip)
    refused(paths, "pixel data cannot be decoded")


def test_refuses_empty_and_mixed_series(series: list[Path], tmp_path: Path) -> None:
    refused([], "no instances")
    blank = np.zeros((2, 40, 48), np.float32)
    other = write_ct_series(blank, SPACING, tmp_path, series_description="x").paths
    refused([*series, *other], "mixed series")


def test_real_ct_example(real_data: Path) -> None:
    paths = sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir())
    volume: Volume = load_series(paths[::-1])
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.hu.min() == -1024.0  # outside the field of view: intercept applied
    body = volume.hu[:, 200:300, 200:300]
    assert -200 < float(np.median(body)) < 200
    zs = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert zs == sorted(zs) and volume.origin[2] == zs[0]
    # the data set blanks SOP Instance UIDs; they come back from the file meta
    assert all(ds.SOPInstanceUID for ds in volume.datasets)


def test_real_transfer_syntaxes_decode_identically(real_data: Path) -> None:
    folder = real_data / "dcm_qa_ts"
    volumes = [load_series([folder / f"{i}.dcm"]) for i in range(1, 10)]
    for volume in volumes[1:]:
        np.testing.assert_array_equal(volume.hu, volumes[0].hu)
    assert volumes[0].modality == "MR" and volumes[0].shape[0] == 1
