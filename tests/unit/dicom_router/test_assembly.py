"""Study completeness: the pure decision, and the C-FIND count against a small in-process Q/R SCP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_router.assembly import count_study_instances, is_complete
from dicom_router.settings import Peer
from tests.support.net import free_port

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize(
    ("received", "last", "now", "quiet", "expected", "complete"),
    [
        (10, 100.0, 101.0, 10.0, 10, True),  # the PACS count is reached: no need to wait
        (12, 100.0, 101.0, 10.0, 10, True),
        (9, 100.0, 101.0, 10.0, 10, False),
        (9, 100.0, 110.0, 10.0, 10, True),  # the quiet timer wins when the count never comes
        (9, 100.0, 109.9, 10.0, None, False),
        (9, 100.0, 110.0, 10.0, None, True),
        (0, 100.0, 500.0, 10.0, None, False),  # nothing received is never complete
        (0, 100.0, 500.0, 10.0, 0, False),
        (3, 100.0, 101.0, 10.0, 0, False),  # a zero count says nothing
    ],
)
def test_is_complete(received: int, last: float, now: float, quiet: float, expected: int | None,
                     complete: bool) -> None:
    assert is_complete(received, last, now, quiet, expected) is complete


class FindSCP:
    """Answers STUDY-level C-FIND with a fixed NumberOfStudyRelatedInstances (or a failure)."""

    def __init__(self, count: int | None, status: int = 0xFF00) -> None:
        self.count = count
        self.status = status
        self.queries: list[Dataset] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.require_called_aet = True
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_FIND, self.on_find)])
        assert server is not None
        self.server = server

    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        self.queries.append(query)
        if self.status != 0xFF00:
            yield self.status, None
            return
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = query.StudyInstanceUID
        if self.count is not None:
            match.NumberOfStudyRelatedInstances = self.count
        yield 0xFF00, match

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pacs() -> Iterator[FindSCP]:
    scp = FindSCP(count=42)
    yield scp
    scp.stop()


def peer_for(port: int | None) -> Peer:
    return Peer(ae_title="PACS", query_host="127.0.0.1" if port else None, query_port=port)


def test_count_from_the_pacs(pacs: FindSCP) -> None:
    assert count_study_instances(peer_for(pacs.port), "PORTICO", STUDY, timeout=5) == 42
    (query,) = pacs.queries
    assert query.QueryRetrieveLevel == "STUDY"
    assert query.StudyInstanceUID == STUDY
    assert "NumberOfStudyRelatedInstances" in query


def test_no_query_address_is_none() -> None:
    assert count_study_instances(peer_for(None), "PORTICO", STUDY, timeout=5) is None


def test_unreachable_pacs_is_none_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    assert count_study_instances(peer_for(free_port()), "PORTICO", STUDY, timeout=2) is None
    assert any("C-FIND" in r.getMessage() for r in caplog.records)


def test_pacs_without_a_count_or_failing_is_none() -> None:
    for scp in (FindSCP(count=None), FindSCP(count=5, status=0xC001)):
        try:
            assert count_study_instances(peer_for(scp.port), "PORTICO", STUDY, timeout=5) is None
        finally:
            scp.stop()


def test_query_ae_title_is_used_when_given(pacs: FindSCP) -> None:
    peer = Peer(ae_title="SENDER", query_host="127.0.0.1", query_port=pacs.port, query_ae_title="PACS")
    assert count_study_instances(peer, "PORTICO", STUDY, timeout=5) == 42
