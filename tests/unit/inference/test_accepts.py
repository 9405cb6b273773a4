"""Real-data robustness: one orientation tolerance, the source's character set, what a model accepts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError

from appliance.demo_study import write_ct_series
from appliance.jobs import PERMANENT
from inference.accepts import check_accepts, refusals
from inference.charset import DEFAULT_CHARACTER_SET
from inference.errors import SeriesError, SeriesNotAcceptedError
from inference.measurements import measure
from inference.packages import InputSpec, ModelPackage, load_package
from inference.phantom import make_phantom
from inference.pipeline import run_segmentation
from inference.results import build_seg, build_sr
from inference.settings import InferenceSettings
from inference.volume import ORIENTATION_TOL, load_series

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "models" / "ct-body-composition"
#: as a real GE MR had them: the same direction cosine written two ways
ROUNDED = ("0.99999249", "0.0038759", "0", "-0.0038759", "0.99999249", "0")
ROUNDED_OTHER = ("0.99999249", "0.00387589", "0", "-0.00387589", "0.99999249", "0")


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(SHIPPED)


def series(tmp_path: Path, slices: int = 6, spacing: tuple[float, float, float] = (2.5, 4.0, 4.0),
           edit: Any = None) -> list[Path]:
    phantom = make_phantom((slices, 48, 48), spacing, seed=4)
    paths = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "ct").paths
    if edit is not None:
        for k, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            edit(k, ds)
            ds.save_as(path)
    return paths


def labels_for(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[:, 10:20, 10:20] = 1
    labels[:, 25:30, 25:30] = 3
    return labels


def build_both(paths: list[Path], package: ModelPackage) -> None:
    volume = load_series(paths)
    settings = InferenceSettings()
    labels = labels_for(volume.shape)
    seg = build_seg(volume, labels, package.manifest, settings.device, settings.uid_root, "run")
    build_sr(seg, volume, measure(labels, volume, package.manifest.output.segments), package.manifest,
             settings.device, settings.uid_root, "run")


# ---- orientation ------------------------------------------------------------------------------

def test_rounding_differences_get_the_series_single_orientation(tmp_path: Path, package: ModelPackage) -> None:
    """17 slices one way, 3 the other (as the GE MR): one orientation in the derived objects."""
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = list(ROUNDED_OTHER if k in (3, 9, 15) else ROUNDED)

    paths = series(tmp_path, slices=20, edit=edit)
    volume = load_series(paths)
    assert {tuple(str(v) for v in ds.ImageOrientationPatient) for ds in volume.datasets} == {ROUNDED}
    # the stored files are left as they arrived
    assert tuple(str(v) for v in pydicom.dcmread(paths[3]).ImageOrientationPatient) == ROUNDED_OTHER
    build_both(paths, package)  # highdicom demands identical orientations: it used to fail here


def test_orientations_beyond_the_tolerance_are_refused_permanently(tmp_path: Path) -> None:
    tilt = 10 * ORIENTATION_TOL

    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 2:
            ds.ImageOrientationPatient = [f"{np.sqrt(1 - tilt**2):.8f}", f"{tilt:.8f}", "0",
                                          f"{-tilt:.8f}", f"{np.sqrt(1 - tilt**2):.8f}", "0"]

    with pytest.raises(SeriesError, match="mixed orientations") as caught:
        load_series(series(tmp_path, edit=edit))
    assert isinstance(caught.value, PERMANENT) and caught.value.code == "series_unusable"


# ---- character set -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Unknown encoding")  # pydicom, when the test writes the bad term
@pytest.mark.parametrize("charset", ["", "ISO_IR 999", "NOT A TERM"])
def test_an_empty_or_invalid_character_set_is_replaced_with_a_warning(
        tmp_path: Path, package: ModelPackage, caplog: pytest.LogCaptureFixture, charset: str) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset

    paths = series(tmp_path, edit=edit)
    with caplog.at_level(logging.WARNING, logger="inference.charset"):
        volume = load_series(paths)
    assert all(ds.SpecificCharacterSet == DEFAULT_CHARACTER_SET for ds in volume.datasets)
    assert "SpecificCharacterSet is empty or not a defined term" in caplog.text
    build_both(paths, package)  # never a failed job


@pytest.mark.parametrize(("charset", "expected"), [
    ("ISO_IR 192", "ISO_IR 192"), ("ISO_IR 100", "ISO_IR 100"), ("ISO_IR 6", None),
    (["", "ISO 2022 IR 100"], ["ISO 2022 IR 6", "ISO 2022 IR 100"]),
])
def test_a_valid_character_set_is_honoured(tmp_path: Path, package: ModelPackage, charset: Any,
                                           expected: Any) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = charset

    paths = series(tmp_path, edit=edit)
    volume = load_series(paths)
    got = volume.datasets[0].get("SpecificCharacterSet")
    assert (list(got) if isinstance(got, pydicom.multival.MultiValue) else got) == expected
    build_both(paths, package)


def test_latin1_names_decode_with_the_source_character_set(tmp_path: Path) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Abdomen süß"

    volume = load_series(series(tmp_path, edit=edit))
    assert volume.datasets[0].SeriesDescription == "Abdomen süß"


# ---- what a model accepts ------------------------------------------------------------------------

def test_the_shipped_model_declares_what_it_accepts(package: ModelPackage) -> None:
    spec = package.manifest.input
    assert spec.modality == "CT" and "ABDOMEN" in spec.body_parts
    assert spec.min_slices == 2  # volumes need a measured slice spacing (see the model card)
    assert spec.slice_spacing_mm == (0.5, 10.0) and spec.pixel_spacing_mm == (0.4, 8.0)
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "Single-slice series are refused (`min_slices: 2`)" in card


def test_ranges_must_be_ordered_and_positive() -> None:
    base = {"modality": "CT", "intensity": {"low": 0, "high": 1}, "patch_size": [1, 8, 8]}
    with pytest.raises(ValidationError, match="above upper bound"):
        InputSpec.model_validate({**base, "slice_spacing_mm": [5, 1]})
    with pytest.raises(ValidationError):
        InputSpec.model_validate({**base, "pixel_spacing_mm": [0, 1]})
    assert InputSpec.model_validate({**base, "body_parts": ["abdomen "]}).body_parts == ("ABDOMEN",)


def test_a_fitting_series_is_accepted(tmp_path: Path, package: ModelPackage) -> None:
    volume = load_series(series(tmp_path))
    assert refusals(volume, package.manifest.input) == []
    check_accepts(volume, package.manifest.input)


@pytest.mark.parametrize(("keyword", "value", "reason"), [
    ("Modality", "MR", "modality MR is not CT"),
    ("BodyPartExamined", "HEAD", "body part examined is none of ABDOMEN"),
])
def test_a_series_outside_the_manifest_is_refused_with_a_reason(
        tmp_path: Path, package: ModelPackage, keyword: str, value: str, reason: str) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)

    volume = load_series(series(tmp_path, edit=edit))
    with pytest.raises(SeriesNotAcceptedError, match=reason) as caught:
        check_accepts(volume, package.manifest.input)
    assert caught.value.code == "series_not_accepted" and isinstance(caught.value, PERMANENT)
    assert "HEAD" not in str(caught.value)  # the source's value is not quoted


@pytest.mark.parametrize("part", ["PARTIALBODY", "WHOLEBODY", ""])
def test_an_unspecific_body_part_neither_matches_nor_refuses(tmp_path: Path, package: ModelPackage,
                                                            part: str) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.BodyPartExamined = part

    assert refusals(load_series(series(tmp_path, edit=edit)), package.manifest.input) == []


def test_slices_and_spacing_limits(tmp_path: Path, package: ModelPackage) -> None:
    one = load_series(series(tmp_path / "one", slices=1))
    assert refusals(one, package.manifest.input) == ["1 slice(s); at least 2 needed"]
    coarse = load_series(series(tmp_path / "coarse", slices=3, spacing=(12.0, 9.0, 9.0)))
    assert refusals(coarse, package.manifest.input) == [
        "slice spacing 12 mm is outside [0.5, 10] mm", "pixel spacing 9 mm is outside [0.4, 8] mm"]


class NoModel:
    """A session cache that fails the test if the model is ever loaded."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model ran on a series it does not accept")


def test_the_pipeline_refuses_before_inference(tmp_path: Path, package: ModelPackage) -> None:
    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.Modality = "MR"

    with pytest.raises(SeriesNotAcceptedError, match="modality MR is not CT"):
        run_segmentation(series(tmp_path, edit=edit), package, NoModel(),  # type: ignore[arg-type]
                         InferenceSettings(), "run")


def test_real_mr_is_refused_by_the_ct_model_and_real_ct_accepted(real_data: Path, package: ModelPackage) -> None:
    mr = load_series([real_data / "dcm_qa_ts" / "1.dcm"])
    assert refusals(mr, package.manifest.input)[:2] == ["modality MR is not CT", "1 slice(s); at least 2 needed"]
    ct = load_series(sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir()))
    assert ct.datasets[0].BodyPartExamined == "PARTIALBODY"
    assert refusals(ct, package.manifest.input) == []


def test_real_ct_with_rounded_orientations_and_empty_charset_builds(real_data: Path, tmp_path: Path,
                                                                    package: ModelPackage) -> None:
    """The real CT, as the field sent it twice: rounding in ImageOrientationPatient, an empty charset."""
    paths = []
    for k, src in enumerate(sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir())):
        ds = pydicom.dcmread(src)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        if k % 7 == 3:  # a last-digit difference, well within the tolerance
            iop[1] += 1e-7
        ds.ImageOrientationPatient = [f"{v:.8g}" for v in iop]
        ds.SpecificCharacterSet = ""
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1])
    build_both(paths, package)


def test_a_multiframe_image_with_rounded_per_frame_orientations_builds(tmp_path: Path,
                                                                       package: ModelPackage) -> None:
    import highdicom as hd
    from pydicom.uid import generate_uid

    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.ImageOrientationPatient = list(ROUNDED_OTHER if k % 2 else ROUNDED)

    paths = series(tmp_path, edit=edit)
    multiframe = hd.legacy.LegacyConvertedEnhancedCTImage([pydicom.dcmread(p) for p in paths], generate_uid(), 3,
                                                          generate_uid(), 1)
    assert "PlaneOrientationSequence" in multiframe.PerFrameFunctionalGroupsSequence[0]  # not shared
    path = tmp_path / "mf.dcm"
    multiframe.save_as(path, enforce_file_format=True)
    volume = load_series([path])
    shared = volume.datasets[0].SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert tuple(str(v) for v in shared.ImageOrientationPatient) in (ROUNDED, ROUNDED_OTHER)
    build_both([path], package)
