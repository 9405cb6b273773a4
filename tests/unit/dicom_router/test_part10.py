"""The fast Part 10 helpers agree with pydicom (and pynetdicom) on every encoding we accept."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_router import part10
from dicom_router.part10 import UnreadableHeader, file_meta, read_uids

UIDS = ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6.7", "1.2.3.4", "1.2.3.4.5")


def make_dataset(nested: bool = True) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = UIDS
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    if nested:
        # sequences before the UIDs we look for, some nested, to be skipped
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D4000", "SRT", "Abdomen"
        inner = Dataset()
        inner.ReferencedSOPClassUID = CTImageStorage
        inner.ReferencedSOPInstanceUID = "9.9.9"
        inner.ReferencedFrameNumber = [1, 2]
        code.ReferencedImageSequence = Sequence([inner])
        ds.ProcedureCodeSequence = Sequence([code, code])
        ds.ReferencedStudySequence = Sequence([])
    ds.PatientName = "PHANTOM^DEMO"
    ds.PatientID = "ID-1"
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00" * 8
    return ds


def encode(ds: Dataset, *, implicit: bool, little: bool, undefined_lengths: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    if undefined_lengths:
        for seq_kw in ("ProcedureCodeSequence", "ReferencedStudySequence"):
            if seq_kw in ds:
                ds[seq_kw].is_undefined_length = True
                for item in ds[seq_kw].value:
                    item.is_undefined_length_sequence_item = True
                    if "ReferencedImageSequence" in item:
                        item["ReferencedImageSequence"].is_undefined_length = True
    write_dataset(buffer, ds)
    return bytes(buffer.getvalue())


@pytest.mark.parametrize("undefined_lengths", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize(("ts", "implicit"), [(ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True),
                                              (RLELossless, False)])
def test_read_uids_walks_little_endian(ts: str, implicit: bool, undefined_lengths: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*args: object) -> None:
        raise AssertionError("the walk should not need pydicom here")

    monkeypatch.setattr(part10, "_read_with_pydicom", no_fallback)
    data = encode(make_dataset(), implicit=implicit, little=True, undefined_lengths=undefined_lengths)
    assert read_uids(data, ts) == UIDS
    assert read_uids(memoryview(data), ts) == UIDS


def test_big_endian_and_deflate_go_through_pydicom() -> None:
    big = encode(make_dataset(), implicit=False, little=False, undefined_lengths=False)
    assert read_uids(big, ExplicitVRBigEndian) == UIDS
    ds = make_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(UIDS[0])
    ds.file_meta.MediaStorageSOPInstanceUID = UID(UIDS[1])
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    raw = out.getvalue()
    # the deflated dataset follows the meta, whose group length (after 128+4+8 bytes) says where
    group_length = int.from_bytes(raw[140:144], "little")
    body = raw[144 + group_length:]
    assert read_uids(body, DeflatedExplicitVRLittleEndian) == UIDS


def test_missing_uid_is_reported_as_missing() -> None:
    ds = make_dataset()
    del ds.SeriesInstanceUID
    data = encode(ds, implicit=False, little=True, undefined_lengths=True)
    with pytest.raises(UnreadableHeader) as info:
        read_uids(data, ExplicitVRLittleEndian)
    assert info.value.missing and "SeriesInstanceUID" in info.value.reason


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
@pytest.mark.parametrize("data", [bytes(range(256)) * 4, b"\x00" * 100, b"", b"\x08\x00\x16\x00UI\xff\xff1.2"])
def test_garbage_is_unreadable(data: bytes) -> None:
    with pytest.raises(UnreadableHeader):
        read_uids(data, ExplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uids_that_could_be_paths_are_refused() -> None:
    ds = make_dataset()
    ds.SOPInstanceUID = "../../etc/passwd"
    data = encode(ds, implicit=False, little=True, undefined_lengths=False)
    with pytest.raises(UnreadableHeader, match="malformed SOPInstanceUID"):
        read_uids(data, ExplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("study", ["1..2", "1.02", "1.2.", ".1.2", "1" * 65])
@pytest.mark.parametrize("implicit", [False, True])
def test_uids_of_digits_and_dots_that_are_not_uids_are_refused(study: str, implicit: bool) -> None:
    # 1..2 used to pass here and fail in the store: C-STORE answered 0xC211 and nothing was quarantined
    ds = make_dataset()
    ds.StudyInstanceUID = study
    data = encode(ds, implicit=implicit, little=True, undefined_lengths=False)
    with pytest.raises(UnreadableHeader, match="malformed StudyInstanceUID") as info:
        read_uids(data, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert not info.value.missing and study not in info.value.reason


def test_the_file_meta_uids_are_checked_too() -> None:
    body = encode(make_dataset(), implicit=False, little=True, undefined_lengths=False)
    assert part10.read_file_meta(file_meta(UIDS[0], UIDS[1], ExplicitVRLittleEndian) + body)[:3] == (
        UIDS[0], UIDS[1], ExplicitVRLittleEndian)
    with pytest.raises(UnreadableHeader, match="malformed"):
        part10.read_file_meta(file_meta(UIDS[0], "1..2", ExplicitVRLittleEndian) + body)


def test_a_beginning_of_the_dataset_is_enough_and_the_source_file_is_the_fallback() -> None:
    data = encode(make_dataset(), implicit=False, little=True, undefined_lengths=True)
    end = data.rindex(UIDS[3].encode()) + len(UIDS[3]) + 1  # the padded Series Instance UID's end
    assert read_uids(data[:end], ExplicitVRLittleEndian) == UIDS  # the walk stops there
    whole = BytesIO(file_meta(UIDS[0], UIDS[1], ExplicitVRBigEndian)
                    + encode(make_dataset(), implicit=False, little=False, undefined_lengths=False))
    # big endian is not walked: pydicom reads the whole file, not the 40-byte beginning it was given
    assert read_uids(b"\x00" * 40, ExplicitVRBigEndian, source=whole) == UIDS


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_truncated_dataset_falls_back_to_pydicom_and_is_refused() -> None:
    data = encode(make_dataset(), implicit=False, little=True, undefined_lengths=True)
    with pytest.raises(UnreadableHeader):
        read_uids(data[:60], ExplicitVRLittleEndian)


@pytest.mark.parametrize("source", [None, "STORESCU", "ODD"])
def test_file_meta_reads_back_like_pynetdicoms(source: str | None) -> None:
    body = encode(make_dataset(), implicit=False, little=True, undefined_lengths=False)
    meta = file_meta(UIDS[0], UIDS[1], ExplicitVRLittleEndian, source)
    ds = dcmread(BytesIO(meta + body))
    assert ds.file_meta.MediaStorageSOPClassUID == UIDS[0]
    assert ds.file_meta.MediaStorageSOPInstanceUID == UIDS[1]
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.get("SourceApplicationEntityTitle") == source
    assert ds.SeriesInstanceUID == UIDS[3] and ds.PatientName == "PHANTOM^DEMO"
    if source is None:
        theirs = encode_file_meta(create_file_meta(sop_class_uid=UID(UIDS[0]), sop_instance_uid=UID(UIDS[1]),
                                                   transfer_syntax=ExplicitVRLittleEndian))
        assert meta == b"\x00" * 128 + b"DICM" + theirs


def test_a_meta_for_a_quarantined_copy_can_carry_any_uid() -> None:
    meta = file_meta(UIDS[0], "1.2.é", ExplicitVRLittleEndian)
    assert b"1.2.?" in meta
