"""The listener's :data:`~dicom_router.ports.AssociationObserver`: accepted, refused by the edge, on real sockets."""

from __future__ import annotations

import threading
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.edge import Refusal, RefusalLog
from dicom_router.ports import AssociationOutcome
from dicom_router.scp import StorageSCP
from dicom_router.settings import Peer, RouterSettings
from tests.support.net import free_port
from tests.support.polling import wait_for
from tests.unit.dicom_router.memory_sink import FolderSink


class Seen:
    def __init__(self) -> None:
        self.events: list[tuple[AssociationOutcome, str]] = []
        self._lock = threading.Lock()

    def __call__(self, outcome: AssociationOutcome, reason: str) -> None:
        with self._lock:
            self.events.append((outcome, reason))


def test_refusals_are_observed_as_they_happen_and_a_failing_observer_is_harmless() -> None:
    seen = Seen()
    log = RefusalLog(window=3600, observe=seen)
    log.refused(Refusal.UNKNOWN_ADDRESS, "10.0.0.9")
    assert seen.events == [(AssociationOutcome.REFUSED, "unknown_address")]

    def broken(outcome: AssociationOutcome, reason: str) -> None:
        raise RuntimeError("metrics gone")

    RefusalLog(window=3600, observe=broken).refused(Refusal.PENDING_LIMIT, "10.0.0.9")


def test_the_listener_reports_accepted_and_refused_associations(tmp_path: Path) -> None:
    seen = Seen()
    settings = RouterSettings(port=free_port(), peers=(Peer(ae_title="MODALITY", hosts=("127.0.0.1",)),))
    scp = StorageSCP(settings, FolderSink(tmp_path), observe=seen)
    scp.start()
    try:
        host, port = scp.address
        for calling, expect_ok in (("MODALITY", True), ("STRANGER", False)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate(host, port, ae_title="PORTICO")
            assert assoc.is_established is expect_ok
            if assoc.is_established:
                assert assoc.send_c_echo().Status == 0
                assoc.release()
        wait_for(lambda: len(seen.events) >= 2, timeout=10, message="both outcomes observed")
    finally:
        scp.stop()
    assert (AssociationOutcome.ACCEPTED, "") in seen.events
    assert (AssociationOutcome.REFUSED, "unknown_calling_ae") in seen.events
