"""The listener's edge against a stranger on the same network: each attack of issue #8, on both reactors.

Our StorageSCP on real loopback sockets. Strangers connect from 127.0.0.2 (on no allow-list),
a misbehaving allow-listed host from 127.0.0.3, the real modality from 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.edge import Refusal, RefusalCount
from dicom_router.scp import StorageSCP
from dicom_router.settings import EdgeSettings, Peer, RouterSettings
from tests.support.net import free_port
from tests.support.peers import NOISY, STRANGER, connect, echo
from tests.support.polling import wait_for
from tests.unit.dicom_router.memory_sink import FolderSink

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


@dataclass
class Running:
    scp: StorageSCP
    sink: FolderSink
    port: int
    reports: list[RefusalCount] = field(default_factory=list)


def settings_for(port: int, **edge: float) -> RouterSettings:
    return RouterSettings(
        ae_title="PORTICO", port=port,
        peers=(Peer(ae_title="ECHOSCU"), Peer(ae_title="PYSCU"), Peer(ae_title="NOISY", hosts=(NOISY,))),
        edge=EdgeSettings.model_validate({"associate_timeout": 3.0, "report_seconds": 3600, **edge}),
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[StorageSCP] = []

    def make(event_driven: bool = True, **edge: float) -> Running:
        port = free_port()
        reports: list[RefusalCount] = []
        scp = StorageSCP(settings_for(port, **edge), FolderSink(tmp_path), event_driven=event_driven,
                         report_refusals=reports.extend)
        scp.start()
        started.append(scp)
        return Running(scp, FolderSink(tmp_path), port, reports)

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture(params=[True, False], ids=["event-driven", "stock-pynetdicom"])
def scp(request: pytest.FixtureRequest, start: Callable[..., Running]) -> Running:
    return start(event_driven=request.param)




def associated(port: int) -> tuple[Association, socket.socket]:
    """An established association from PYSCU, and its raw socket (to send what pynetdicom would not)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PORTICO")
    assert assoc.is_established
    assert assoc.dul.socket is not None
    raw = assoc.dul.socket.socket
    assert raw is not None
    return assoc, raw


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_strangers_are_closed_at_accept_without_a_word(scp: Running) -> None:
    with connect(scp.port, STRANGER) as sock:
        sock.settimeout(2)
        assert sock.recv(16) == b""  # closed by the listener before reading anything
    wait_for(lambda: scp.scp.gate.pending == 0, timeout=5, message="the pending count to drop")


def test_slow_connections_do_not_take_the_slots_of_a_real_sender(scp: Running) -> None:
    """50 slow sockets from a stranger and 50 from an allow-listed host: the modality is still answered."""
    with ExitStack() as stack:
        for source in (STRANGER, NOISY):
            for _ in range(50):
                try:
                    sock = stack.enter_context(connect(scp.port, source))
                    sock.sendall(b"\x01")
                except OSError:
                    pass  # a stranger's socket may already be gone
        assert scp.scp.gate.pending <= EdgeSettings().max_pending_per_address
        started = time.monotonic()
        assert echo(scp.port, timeout=2.0)
        assert time.monotonic() - started < 2.0
    # slow ones that were let in are dropped at the associate deadline
    wait_for(lambda: scp.scp.gate.pending == 0, timeout=10, message="the slow sockets to be dropped")


def test_bare_connections_that_close_cost_nothing(scp: Running) -> None:
    """Health checks and port scans: 40 connect-and-close from an allowed host, then a real association."""
    for _ in range(40):
        connect(scp.port, "127.0.0.1").close()
    wait_for(lambda: scp.scp.gate.pending == 0, timeout=5, message="closed connections to be forgotten")
    assert echo(scp.port)


def test_a_half_sent_request_times_out(start: Callable[..., Running]) -> None:
    running = start(associate_timeout=0.5)
    with connect(running.port, NOISY) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x00\x80")  # header of a 128-byte A-ASSOCIATE-RQ, then nothing
        sock.settimeout(5)
        assert sock.recv(16) == b""
    running.scp.gate.refusals.flush(force=True)
    assert (Refusal.ASSOCIATE_TIMEOUT, NOISY) in {(r.reason, r.address) for r in running.reports}


def test_an_oversized_associate_request_is_dropped_unread(scp: Running) -> None:
    before = rss_bytes()
    sent = 0
    with connect(scp.port, NOISY) as sock:
        sock.settimeout(5)
        sock.sendall(struct.pack(">BBL", 1, 0, 1 << 30))  # declares 1 GiB
        chunk = b"\0" * (1 << 20)
        with pytest.raises(OSError):
            for _ in range(400):
                sock.sendall(chunk)
                sent += len(chunk)
    assert sent < 100 << 20  # the listener closed the connection long before 400 MiB
    assert rss_bytes() - before < 50 << 20
    scp.scp.gate.refusals.flush(force=True)
    assert (Refusal.OVERSIZED, NOISY) in {(r.reason, r.address) for r in scp.reports}
    assert echo(scp.port)


def test_an_oversized_p_data_pdu_closes_the_association(scp: Running) -> None:
    assoc, raw = associated(scp.port)
    before = rss_bytes()
    with pytest.raises(OSError):
        raw.sendall(struct.pack(">BBL", 4, 0, 1 << 30))
        chunk = b"\0" * (1 << 20)
        for _ in range(400):
            raw.sendall(chunk)
    assert rss_bytes() - before < 50 << 20
    wait_for(lambda: not assoc.is_established, timeout=10, message="the association to end")
    assert echo(scp.port)


def test_the_called_ae_title_must_be_ours(scp: Running, caplog: pytest.LogCaptureFixture) -> None:
    if shutil.which("echoscu") is None:
        pytest.skip("DCMTK not installed")
    caplog.set_level(logging.WARNING)
    done = subprocess.run(["echoscu", "-aet", "ECHOSCU", "-aec", "ANYTHING", "127.0.0.1", str(scp.port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stderr
    assert any(Refusal.WRONG_CALLED_AE.value in r.getMessage() for r in caplog.records)


def test_association_caps_answer_local_limit_exceeded(start: Callable[..., Running],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    running = start(max_associations_per_address=2)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", running.port, ae_title="PORTICO") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", running.port, ae_title="PORTICO")
        assert third.is_rejected
        assert "association limit" in caplog.text and Refusal.ASSOCIATION_LIMIT.value in caplog.text
        assert "not allow-listed" not in caplog.text
    finally:
        for a in held:
            a.release()
    wait_for(lambda: running.scp.gate.associations == 0, timeout=10, message="slots to be freed")
    assert echo(running.port)


def test_refusals_are_counted_not_logged_one_by_one(scp: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_router.edge")
    for _ in range(20):
        with suppress(OSError):
            connect(scp.port, STRANGER).close()

    def reported() -> int:
        scp.scp.gate.refusals.flush(force=True)
        return sum(r.count for r in scp.reports if (r.reason, r.address) == (Refusal.UNKNOWN_ADDRESS, STRANGER))

    wait_for(lambda: reported() >= 20, timeout=5, message="the refusals to be reported")
    assert reported() == 20
    assert all(r.count > 1 for r in scp.reports[:1])  # counted in one row, not one per connection
    per_connection = [r for r in caplog.records if "refused a DICOM connection" in r.getMessage()]
    assert len(per_connection) <= len(scp.reports)  # one line per window and kind, not per connection


def test_stop_is_quick_with_stuck_connections_and_open_associations(start: Callable[..., Running]) -> None:
    running = start()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="PORTICO")
    assert assoc.is_established
    stuck = [connect(running.port, NOISY) for _ in range(5)]
    wait_for(lambda: running.scp.gate.pending == 5, timeout=5, message="pending connections")
    started = time.monotonic()
    stopper = threading.Thread(target=running.scp.stop)
    stopper.start()
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert time.monotonic() - started < 3.0
    for sock in stuck:
        sock.close()
    wait_for(lambda: not assoc.is_established, timeout=10, message="the association to end")


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_a_pdu_that_stops_arriving_midway_ends_the_association(start: Callable[..., Running],
                                                               event_driven: bool) -> None:
    running = start(event_driven=event_driven, pdu_timeout=1.0)
    _assoc, raw = associated(running.port)
    raw.sendall(struct.pack(">BBL", 4, 0, 1000) + b"\0" * 10)  # a P-DATA-TF that never finishes
    wait_for(lambda: running.scp.gate.associations == 0, timeout=10, message="the stalled association to end")
    assert echo(running.port)
