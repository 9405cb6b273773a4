"""STOW-RS ingest: multipart framing, every part stored or refused (quarantined) on its own."""

from __future__ import annotations

import errno
import logging
import tempfile
from io import BytesIO
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import dcmread, dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_router.part10 import file_meta
from dicom_router.ports import ReceivedInstance, StoreOutcome
from dicom_router.settings import RouterSettings
from dicom_router.stow import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DOES_NOT_MATCH,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    LOGGED_REFUSALS,
    StowIngest,
    StowLimits,
    StowRequestError,
    StowResult,
    boundary_of,
    store_instances,
)
from dicom_router.stow_budget import QuarantineBudget
from tests.support.stow import BOUNDARY, CONTENT_TYPE, PATIENT_NAME, ct_instance, multipart
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


# --- streaming, spooling and caps ----------------------------------------------------------------

def _ingest(sink: FolderSink, body: bytes, chunk: int = 65536, *, study_uid: str | None = None,
            limits: StowLimits | None = None, budget: QuarantineBudget | None = None) -> StowResult:
    ingest = StowIngest(CONTENT_TYPE, sink, "PACSWEB", "10.0.0.5", study_uid, limits=limits, budget=budget)
    try:
        for i in range(0, len(body), chunk):
            ingest.feed([body[i:i + chunk]])
        return ingest.finish()
    finally:
        ingest.close()


SMALL_MEMORY = StowLimits(memory_part_bytes=4096)


def test_parts_are_stored_as_they_arrive(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    parts = [ct_instance(STUDY, SERIES, n) for n in range(3)]
    body = multipart(*parts)
    ingest = StowIngest(CONTENT_TYPE, sink, "PACSWEB", "10.0.0.5")
    delimiter = f"--{BOUNDARY}".encode()
    cut = body.index(delimiter, len(parts[0])) + len(delimiter)  # just past the first part's closing delimiter
    ingest.feed([body[:cut]])
    assert len(sink.instances) == 1  # stored before the rest of the body has come
    ingest.feed([body[cut:]])
    assert ingest.finish().http_status == 200 and len(sink.instances) == 3


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_big_parts_are_spooled_to_a_file_and_moved_in(tmp_path: Path, chunk: int) -> None:
    sink = _sink(tmp_path)
    big, small = ct_instance(STUDY, SERIES, 1, rows=64), ct_instance(STUDY, SERIES, 2)
    result = _ingest(sink, multipart(small, big), chunk, limits=SMALL_MEMORY)
    assert result.http_status == 200 and len(sink.instances) == 2 and sink.files_taken == 1
    uid = str(dcmread(BytesIO(big)).SOPInstanceUID)
    stored = dcmread(tmp_path / f"{uid}.dcm")
    assert stored.file_meta.SourceApplicationEntityTitle == "PACSWEB"  # the meta rebuilt in the spool file
    assert stored.PixelData == dcmread(BytesIO(big)).PixelData
    # the same bytes as the in-memory path would have stored
    memory_sink = FolderSink(tmp_path / "memory")
    memory_sink.root.mkdir()
    _ingest(memory_sink, multipart(big))
    assert (tmp_path / f"{uid}.dcm").read_bytes() == (memory_sink.root / f"{uid}.dcm").read_bytes()
    assert not list(sink.spool_dir.iterdir())


def test_spooled_parts_that_cannot_be_accepted_are_quarantined_from_the_file(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    other_study = ct_instance(generate_uid(), SERIES, 1, rows=64)
    junk = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"x" * 10000
    not_dicom = b"y" * 10000
    result = _ingest(sink, multipart(other_study, junk, not_dicom, ct_instance(STUDY, SERIES, 2, rows=64)),
                     1000, study_uid=STUDY, limits=SMALL_MEMORY)
    assert result.http_status == 202 and len(result.stored) == 1
    assert [f.reason for f in result.failed] == [FAILURE_DOES_NOT_MATCH, FAILURE_CANNOT_UNDERSTAND,
                                                 FAILURE_CANNOT_UNDERSTAND]
    assert [q.size for q in sink.quarantined][1:] == [len(junk), len(not_dicom)]  # kept as received
    assert not list(sink.spool_dir.iterdir())


def test_a_part_over_the_part_cap_is_refused_not_kept_and_the_rest_go_on(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    big = ct_instance(STUDY, SERIES, 1, rows=64)  # 8 KB of pixels
    result = _ingest(sink, multipart(big, ct_instance(STUDY, SERIES, 2)), 1000,
                     limits=StowLimits(max_part_bytes=4000, memory_part_bytes=1024))
    assert result.http_status == 202 and len(result.stored) == 1
    assert result.failed[0].reason == FAILURE_OUT_OF_RESOURCES and "stow_max_part_mb" in result.failed[0].message
    assert not sink.quarantined and not list(sink.spool_dir.iterdir())


def test_too_many_parts_stop_the_request_with_what_was_stored(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    parts = [ct_instance(STUDY, SERIES, n) for n in range(5)]
    result = _ingest(sink, multipart(*parts), limits=StowLimits(max_parts=3))
    assert result.http_status == 413 and result.refusal is not None and result.refusal.code == "too_many_parts"
    assert len(result.stored) == 3 and len(sink.instances) == 3
    assert "stow_max_parts" in result.warnings[0]
    assert len(result.as_dicom_json()["00081199"]["Value"]) == 3


def test_broken_framing_after_stored_parts_reports_them(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    body = multipart(ct_instance(STUDY, SERIES, 1), ct_instance(STUDY, SERIES, 2))
    truncated = body[: body.rindex(f"--{BOUNDARY}".encode())]  # the second part never ends
    result = _ingest(sink, truncated)
    assert result.http_status == 400 and len(result.stored) == 1
    assert "part in progress was not stored" in result.warnings[0]


def test_the_quarantine_budget_caps_files_and_says_so_once(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    now = [1000.0]
    spent: list[str] = []
    budget = QuarantineBudget(10 * 2**20, 5, on_spent=spent.append, clock=lambda: now[0])
    junk = multipart(*[b"junk %d" % i for i in range(200)])
    first = _ingest(sink, junk, budget=budget)
    assert first.http_status == 409 and len(first.failed) == 200
    assert len(sink.quarantined) == first.quarantined == 5 and first.not_kept == 195 and spent == ["PACSWEB"]
    assert "quarantine budget" in first.warnings[0]
    second = _ingest(sink, junk, budget=budget)
    assert len(sink.quarantined) == 5 and second.not_kept == 200 and spent == ["PACSWEB"]
    now[0] += 3601  # an hour later the sender may be quarantined again
    _ingest(sink, junk, budget=budget)
    assert len(sink.quarantined) == 10 and spent == ["PACSWEB", "PACSWEB"]
    assert len(list(tmp_path.glob("*.quarantine"))) == 10


def test_the_quarantine_budget_counts_bytes_per_sender() -> None:
    budget = QuarantineBudget(1000, 100)
    assert budget.take("A", 600) and not budget.take("A", 600) and budget.take("A", 400)
    assert budget.take("B", 1000) and not budget.take("B", 1)
    assert not QuarantineBudget(0, 100).take("A", 1) and not QuarantineBudget(1000, 0).take("A", 1)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_malformed_study_uid_is_refused_and_quarantined(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    result = _ingest(sink, multipart(ct_instance("1..2", SERIES, 1), ct_instance(STUDY, SERIES, 2)))
    assert result.http_status == 202 and len(result.stored) == 1
    assert result.failed[0].reason == FAILURE_CANNOT_UNDERSTAND and "StudyInstanceUID" in result.failed[0].message
    assert len(sink.quarantined) == 1


class _BrokenSink(FolderSink):
    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        if instance.sop_instance_uid.endswith(".666"):
            raise RuntimeError("a bug")
        return super().store(instance)


def test_any_error_with_one_part_refuses_that_part_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = _BrokenSink(tmp_path)
    parts = [ct_instance(STUDY, SERIES, 1), ct_instance(STUDY, SERIES, 2, sop_instance_uid="1.2.3.666"),
             ct_instance(STUDY, SERIES, 3)]
    result = _ingest(sink, multipart(*parts))
    assert result.http_status == 202 and len(result.stored) == 2
    assert result.failed[0].reason == FAILURE_PROCESSING
    assert "unexpected error handling a part" in caplog.text and PATIENT_NAME not in caplog.text


def test_a_full_disk_while_spooling_is_out_of_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    sink = _sink(tmp_path)
    result = _ingest(sink, multipart(ct_instance(STUDY, SERIES, 1, rows=64), ct_instance(STUDY, SERIES, 2)),
                     limits=SMALL_MEMORY)
    assert result.http_status == 202 and result.failed[0].reason == FAILURE_OUT_OF_RESOURCES


def test_closing_mid_part_removes_its_spool_file(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    body = multipart(ct_instance(STUDY, SERIES, 1, rows=64))
    ingest = StowIngest(CONTENT_TYPE, sink, "PACSWEB", "127.0.0.1", limits=SMALL_MEMORY)
    ingest.feed([body[: len(body) // 2]])
    assert len(list(sink.spool_dir.iterdir())) == 1
    ingest.close()  # the client went away
    assert not list(sink.spool_dir.iterdir()) and not sink.instances


def test_refused_parts_are_logged_a_bounded_number_of_times(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_router.stow")
    _ingest(_sink(tmp_path), multipart(*[b"junk"] * 100))
    refusals = [r for r in caplog.records if "part refused" in r.getMessage()]
    assert len(refusals) == LOGGED_REFUSALS
    assert "100 refused" in caplog.records[-1].getMessage()


def test_caps_come_from_the_router_settings() -> None:
    settings = RouterSettings(stow_max_part_mb=2, stow_max_parts=7, stow_quarantine_mb_per_hour=1,
                              stow_quarantine_parts_per_hour=3)
    assert StowLimits.from_settings(settings) == StowLimits(max_part_bytes=2 * 2**20, max_parts=7)
    budget = QuarantineBudget.from_settings(settings)
    assert budget.take("A", 2**20) and not budget.take("A", 1)
    defaults = RouterSettings()
    assert (defaults.stow_max_part_mb, defaults.stow_max_parts, defaults.stow_max_concurrent,
            defaults.stow_quarantine_mb_per_hour, defaults.stow_quarantine_parts_per_hour) == (1024, 10000, 4, 256, 100)
    for bad in ({"stow_max_part_mb": 0}, {"stow_max_parts": 0}, {"stow_max_concurrent": 0},
                {"stow_quarantine_mb_per_hour": -1}):
        with pytest.raises(ValidationError):
            RouterSettings.model_validate(bad)
