"""STOW-RS ingest: multipart framing, every part stored or refused (quarantined) on its own."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_router.part10 import file_meta
from dicom_router.stow import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DOES_NOT_MATCH,
    FAILURE_OUT_OF_RESOURCES,
    StowRequestError,
    boundary_of,
    store_instances,
)
from tests.support.stow import BOUNDARY, CONTENT_TYPE, ct_instance, multipart
from tests.unit.dicom_router.memory_sink import FolderSink

STUDY, SERIES = generate_uid(), generate_uid()


def _sink(tmp_path: Path) -> FolderSink:
    return FolderSink(tmp_path)


def test_every_part_is_stored_with_its_own_file_meta(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    parts = [ct_instance(STUDY, SERIES, n) for n in range(3)]
    result = store_instances(multipart(*parts), CONTENT_TYPE, sink, "PACSWEB", "10.0.0.5")
    assert result.http_status == 200 and not result.failed
    assert len(result.stored) == 3 and len(sink.instances) == 3
    stored = next(iter(sink.instances.values()))
    assert stored.calling_ae_title == "PACSWEB" and stored.peer_address == "10.0.0.5"
    assert (stored.study_instance_uid, stored.series_instance_uid) == (STUDY, SERIES)
    ds = dcmread(tmp_path / f"{stored.sop_instance_uid}.dcm")
    assert ds.file_meta.SourceApplicationEntityTitle == "PACSWEB"  # meta rebuilt by us
    assert int(ds.pixel_array[0, 0]) in (0, 1, 2)
    body = result.as_dicom_json()
    assert [i["00081155"]["Value"][0] for i in body["00081199"]["Value"]] == [uid for _, uid in result.stored]
    assert "00081198" not in body


def test_a_bad_part_is_quarantined_and_the_others_stored(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    good = [ct_instance(STUDY, SERIES, n) for n in range(2)]
    garbage = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f"  # an element running past the end
    result = store_instances(multipart(good[0], garbage, good[1], b"not dicom at all"), CONTENT_TYPE, sink,
                             "PACSWEB", "127.0.0.1")
    assert result.http_status == 202
    assert len(result.stored) == 2 and len(sink.instances) == 2
    assert [f.reason for f in result.failed] == [FAILURE_CANNOT_UNDERSTAND] * 2
    assert len(sink.quarantined) == 2 and "damaged" in sink.quarantined[0].reason
    failed = result.as_dicom_json()["00081198"]["Value"]
    assert failed[0]["00081197"] == {"vr": "US", "Value": [FAILURE_CANNOT_UNDERSTAND]}


def test_parts_of_another_study_than_the_url_are_refused(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    other = generate_uid()
    result = store_instances(multipart(ct_instance(other, SERIES, 1)), CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1",
                             study_uid=STUDY)
    assert result.http_status == 409 and not sink.instances
    assert result.failed[0].reason == FAILURE_DOES_NOT_MATCH and result.failed[0].sop_instance_uid
    assert len(sink.quarantined) == 1


def test_meta_that_contradicts_the_data_set_is_refused(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    ds = dcmread(BytesIO(ct_instance(STUDY, SERIES, 1)))
    body = BytesIO()
    del ds.file_meta
    ds.preamble = None
    dcmwrite(body, ds, implicit_vr=False, little_endian=True)  # the data set alone, no meta
    forged = file_meta(str(ds.SOPClassUID), generate_uid(), ExplicitVRLittleEndian) + body.getvalue()
    result = store_instances(multipart(forged), CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    assert [f.reason for f in result.failed] == [FAILURE_DOES_NOT_MATCH]
    assert not sink.instances


def test_duplicates_are_stored_once_and_reported_as_stored(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    part = ct_instance(STUDY, SERIES, 1)
    first = store_instances(multipart(part), CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    again = store_instances(multipart(part, part), CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    assert first.http_status == again.http_status == 200
    assert again.duplicates == 2 and len(sink.instances) == 1


def test_a_full_sink_answers_out_of_resources(tmp_path: Path) -> None:
    sink = FolderSink(tmp_path, full=True)
    result = store_instances(multipart(ct_instance(STUDY, SERIES, 1)), CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    assert result.http_status == 409 and result.failed[0].reason == FAILURE_OUT_OF_RESOURCES


def test_other_part_types_are_refused_per_part(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    result = store_instances(multipart(b"{}", content_type="application/dicom+json"), CONTENT_TYPE, sink,
                             "PACSWEB", "127.0.0.1")
    assert result.http_status == 409 and "application/dicom+json" in result.failed[0].message


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/dicom", 415),
    ('multipart/related; type="application/dicom+xml"; boundary=x', 415),
    ('multipart/related; type="application/dicom"', 400),
])
def test_unreadable_requests_are_refused_whole(content_type: str, status: int) -> None:
    with pytest.raises(StowRequestError) as err:
        boundary_of(content_type)
    assert err.value.status == status


def test_framing_errors_store_nothing(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    body = multipart(ct_instance(STUDY, SERIES, 1))
    truncated = body[: body.rindex(f"--{BOUNDARY}".encode())]  # no closing delimiter
    with pytest.raises(StowRequestError, match="closing boundary"):
        store_instances(truncated, CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    with pytest.raises(StowRequestError, match="boundary"):
        store_instances(b"nothing here", CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1")
    assert not sink.instances and not sink.quarantined


def test_quoted_boundary_and_type_parameters() -> None:
    assert boundary_of('Multipart/Related; boundary="a b;c"; type="application/dicom"') == "a b;c"
