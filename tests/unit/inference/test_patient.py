"""Patient and study attributes made conformant for the derived objects: one test per rule, then a CT
whose patient module does not conform still gets a SEG, an SR and key images that do."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from appliance.demo_study import write_ct_series
from inference.measurements import measure
from inference.phantom import make_phantom
from inference.results.patient import (
    PATIENT_STUDY_KEYWORDS,
    conform,
    normalise_age,
    normalise_code_string,
    normalise_date,
    normalise_datetime,
    normalise_decimal,
    normalise_integer,
    normalise_person_name,
    normalise_sex,
    normalise_text,
    normalise_time,
)
from inference.results.seg import build_seg
from inference.results.sr import build_sr
from inference.results.summary import build_summary
from inference.volume import Volume, load_series
from tests.unit.inference.test_results import DEVICE, ROOT, manifest

NAME = "ZZPHIFAMILY^ZZPHIGIVEN"


def raw(ds: Dataset, keyword: str, text: str, vr: str | None = None) -> None:
    """``keyword`` as a file would carry it: bytes, not yet converted (or validated) by pydicom."""
    value = text.encode("latin-1")
    value += b" " if len(value) % 2 else b""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr or dictionary_VR(keyword), len(value), value, 0, False, True)


@pytest.fixture(autouse=True)
def no_warnings() -> Iterator[None]:
    """Normalising must never make pydicom or highdicom warn: their warnings quote the values."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- one rule at a time ---------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    ("19800714", "19800714"), ("1980-07-14", "19800714"), ("1980.07.14", "19800714"), ("1980/07/14", "19800714"),
    (" 19800714 ", "19800714"), ("1980-02-30", ""), ("19801301", ""), ("00000000", ""), ("14.07.1980", ""),
    ("1980", ""), ("unknown", ""), ("", ""),
])
def test_dates_lose_their_separators_and_impossible_ones_are_blank(given: str, expected: str) -> None:
    assert normalise_date(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("093015", "093015"), ("09:30:15", "093015"), ("09:30", "0930"), ("09", "09"), ("093015.123456", "093015.123456"),
    ("09:30:15.5", "093015.5"), ("24:00:00", ""), ("09:60", ""), ("9:30", ""), ("noon", ""), ("093015.1234567", ""),
])
def test_times_lose_their_colons_and_impossible_ones_are_blank(given: str, expected: str) -> None:
    assert normalise_time(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("20260131093015", "20260131093015"), ("2026", "2026"), ("20260131093015.5+0100", "20260131093015.5+0100"),
    ("20260231", ""), ("2026-01-31T09:30", ""),
])
def test_date_times_are_kept_when_valid(given: str, expected: str) -> None:
    assert normalise_datetime(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("F", "F"), ("f", "F"), ("F ", "F"), ("female", "F"), ("Female", "F"), ("M", "M"), ("Male", "M"),
    ("MALE", "M"), ("O", "O"), ("other", "O"), ("W", ""), ("unknown", ""), ("", ""),
])
def test_patient_sex_is_m_f_o_or_blank(given: str, expected: str) -> None:
    assert normalise_sex(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    (NAME, NAME), ("ZZSINGLEPHI", "ZZSINGLEPHI"), ("Doe^John^^^", "Doe^John"), ("Doe ^ John", "Doe^John"),
    ("A^B^C^D^E^F^G", "A^B^C^D^E"), ("a=b=c=d", "a=b=c"), ("Doe\x01^John", "Doe^John"),
    ("X" * 70 + "^Y", "X" * 64), ("^^^^", ""),
])
def test_person_names_are_kept_within_the_vr(given: str, expected: str) -> None:
    assert normalise_person_name(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("045Y", "045Y"), ("45y", "045Y"), ("3 M", "003M"), ("1234Y", ""), ("45", ""), ("old", ""),
])
def test_ages_are_nnn_and_a_unit(given: str, expected: str) -> None:
    assert normalise_age(given) == expected


@pytest.mark.parametrize(("given", "expected"), [
    ("72.5", "72.5"), ("72,5", "72.5"), (" 1.75 ", "1.75"), ("1e3", "1e3"),
    ("0.123456789012345678", "0.12345678901235"), ("nan", ""), ("heavy", ""),
])
def test_decimals_fit_ds(given: str, expected: str) -> None:
    out = normalise_decimal(given)
    assert out == expected and len(out) <= 16


@pytest.mark.parametrize(("given", "expected"), [("12", "12"), ("+7", "7"), ("1.5", ""), ("99999999999", "")])
def test_integers_fit_is(given: str, expected: str) -> None:
    assert normalise_integer(given) == expected


@pytest.mark.parametrize(("given", "expected"), [("YES", "YES"), ("yes", "YES"), ("A-B", ""), ("X" * 17, "")])
def test_code_strings_are_upper_case_or_blank(given: str, expected: str) -> None:
    assert normalise_code_string(given) == expected


def test_text_is_cut_to_the_vr_and_loses_control_characters() -> None:
    assert normalise_text("P" * 80, "LO") == "P" * 64
    assert normalise_text("A" * 20, "SH") == "A" * 16
    assert normalise_text("two\x00words ", "LO") == "two words"
    assert normalise_text("line one\r\nline two", "LT") == "line one\r\nline two"
    assert normalise_text("x" * 2000, "ST") == "x" * 1024


def test_every_keyword_is_known_to_pydicom() -> None:
    assert all(tag_for_keyword(k) is not None for k in PATIENT_STUDY_KEYWORDS)


# --- a whole reference dataset ----------------------------------------------------------------------

def messy() -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    raw(ds, "SpecificCharacterSet", "ISO_IR 100")
    raw(ds, "PatientName", "Müller^Jürgen^A^B^C^D=x=y=z")
    raw(ds, "PatientID", "I" * 80)
    raw(ds, "PatientBirthDate", "1980-07-14")
    raw(ds, "PatientSex", "female")
    raw(ds, "StudyDate", "2026.01.31")
    raw(ds, "StudyTime", "09:30:15")
    raw(ds, "AccessionNumber", "A" * 20)
    raw(ds, "StudyID", "S" * 20)
    raw(ds, "PatientAge", "45y")
    raw(ds, "PatientWeight", "72,5")
    raw(ds, "OtherPatientNames", "A^B\\" + "C" * 70)
    raw(ds, "StudyDescription", "CT abdomen")
    raw(ds, "Modality", "ct")  # not a patient or study attribute: left as it is
    return ds


def test_conform_fixes_a_copy_and_names_only_the_keywords() -> None:
    source = messy()
    out = conform(source)
    ds = out.dataset
    assert (ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime) == ("19800714", "F", "20260131", "093015")
    assert str(ds.PatientName) == "Müller^Jürgen^A^B^C=x=y"
    assert ds.PatientID == "I" * 64 and ds.AccessionNumber == "A" * 16 and ds.StudyID == "S" * 16
    assert (ds.PatientAge, ds.PatientWeight) == ("045Y", 72.5)
    assert [str(n) for n in ds.OtherPatientNames] == ["A^B", "C" * 64]
    assert ds.StudyDescription == "CT abdomen" and ds.Modality == "ct"
    assert set(out.changed) == {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                                "StudyTime", "AccessionNumber", "StudyID", "PatientAge", "PatientWeight",
                                "OtherPatientNames"}
    # the source is untouched, and not even converted
    tags = [t for t in source.keys() if t != Tag("SOPInstanceUID")]  # noqa: SIM118 (iterating converts)
    assert all(isinstance(source.get_item(t), RawDataElement) for t in tags)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    again = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    assert str(again.PatientName) == "Müller^Jürgen^A^B^C=x=y" and again.PatientBirthDate == "19800714"


def test_a_conformant_dataset_changes_nothing() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    raw(ds, "PatientName", NAME)
    raw(ds, "PatientBirthDate", "19800714")
    raw(ds, "PatientSex", "F")
    raw(ds, "PatientID", "")
    out = conform(ds)
    assert out.changed == ()
    assert str(out.dataset.PatientName) == NAME and out.dataset.PatientID == ""


def test_elements_pydicom_already_converted_are_normalised_alike() -> None:
    ds = Dataset()
    for keyword, vr, value in (("PatientName", "PN", "ZZPHI^" + "N" * 70), ("PatientBirthDate", "DA", "1980.07.14"),
                               ("PatientSex", "CS", "Male"), ("StudyTime", "TM", "09:30")):
        ds.add(DataElement(keyword, vr, value, validation_mode=config.IGNORE))
    out = conform(ds)
    assert str(out.dataset.PatientName) == ("ZZPHI^" + "N" * 70)[:64]
    assert (out.dataset.PatientBirthDate, out.dataset.PatientSex, out.dataset.StudyTime) == ("19800714", "M", "0930")
    assert ds.PatientBirthDate == "1980.07.14"


# --- derived objects from a non-conformant source ----------------------------------------------------

@pytest.fixture(scope="module")
def messy_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, NDArray[np.uint8]]:
    phantom = make_phantom((8, 64, 64), (2.5, 3.7, 3.7), seed=5)
    written = write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("messy"),
                              patient_name="ZZSINGLEPHI^" + "G" * 70, patient_id="P" * 70,
                              patient_birth_date="1980-07-14", patient_sex="female")
    for path in written.paths:
        ds = pydicom.dcmread(path)
        raw(ds, "StudyDate", "2026-01-01")
        raw(ds, "StudyTime", "09:00:00")
        raw(ds, "AccessionNumber", "ACC" * 7)
        raw(ds, "StudyID", "STUDY" * 4)
        ds.save_as(path)
    return load_series(written.paths), phantom.labels


def test_seg_sr_and_key_images_of_a_non_conformant_source_conform(messy_case: tuple[Volume, NDArray[np.uint8]],
                                                                   tmp_path: Path) -> None:
    volume, labels = messy_case
    m = manifest()
    seg = build_seg(volume, labels, m, DEVICE, ROOT, "run-messy")
    sr = build_sr(seg, volume, measure(labels, volume, m.output.segments), m, DEVICE, ROOT, "run-messy")
    images = build_summary(volume, labels, measure(labels, volume, m.output.segments), m, DEVICE, ROOT, "run-messy",
                           key_slices=1)
    for ds in (seg, sr, *images):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        again = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert again.PatientBirthDate == "19800714" and again.PatientSex == "F"
        assert str(again.PatientName) == ("ZZSINGLEPHI^" + "G" * 70)[:64]
        assert again.PatientID == "P" * 64
        assert (again.StudyDate, again.StudyTime) == ("20260101", "090000")
        assert again.AccessionNumber == ("ACC" * 7)[:16] and again.StudyID == ("STUDY" * 4)[:16]
        assert again.StudyInstanceUID == volume.study_instance_uid
    # the volume's own headers are as the files say
    assert volume.datasets[0].get_item(Tag("PatientBirthDate")).value.startswith(b"1980-07-14")


@pytest.fixture(scope="module")
def messier_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, NDArray[np.uint8]]:
    """Issue #10's deliberately messy source: separators in dates, lower-case codes, Type 2 attributes missing."""
    phantom = make_phantom((8, 64, 64), (2.5, 3.7, 3.7), seed=6)
    written = write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("messier"),
                              patient_birth_date="1980.07.14", patient_sex="f")
    for path in written.paths:
        ds = pydicom.dcmread(path)
        raw(ds, "StudyDate", "2026/01/01")
        raw(ds, "SeriesDate", "2026-01-01")
        raw(ds, "BodyPartExamined", "partialbody")
        raw(ds, "Laterality", "r")
        for keyword in ("ReferringPhysicianName", "AccessionNumber", "StudyID", "PatientName"):
            if keyword in ds:
                del ds[keyword]
        ds.save_as(path)
    return load_series(written.paths), phantom.labels


def test_derived_objects_of_a_messy_source_pass_dciodvfy(messier_case: tuple[Volume, NDArray[np.uint8]],
                                                         tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    volume, labels = messier_case
    m = manifest()
    measurements = measure(labels, volume, m.output.segments)
    seg = build_seg(volume, labels, m, DEVICE, ROOT, "run-messier")
    sr = build_sr(seg, volume, measurements, m, DEVICE, ROOT, "run-messier")
    images = build_summary(volume, labels, measurements, m, DEVICE, ROOT, "run-messier", key_slices=1)
    for name, ds in (("sr", sr), *((f"sc{n}", sc) for n, sc in enumerate(images))):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"
    # the SEG: dciodvfy (2022) predates some SEG attributes, so only errors about the copied modules count
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    copied = ("Patient", "Study", "Date", "Time", "Laterality", "BodyPart", "Accession", "Referring")
    errors = [line for line in (run.stdout + run.stderr).splitlines()
              if line.startswith("Error") and any(word in line for word in copied)]
    assert not errors, errors
