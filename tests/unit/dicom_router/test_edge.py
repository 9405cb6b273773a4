"""The edge's settings bounds, its refusal counting, and the per-PDU limits of an admitted socket."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

from dicom_router.edge import MAX_KINDS_PER_WINDOW, Refusal, RefusalCount, RefusalLog
from dicom_router.edge_socket import MAX_CONTROL_PDU, EdgeAssociationSocket, PduTooLarge
from dicom_router.settings import DimseDestination, RouterSettings


@pytest.mark.parametrize("value", [0, 4095, 16 * 2**20 + 1])
def test_max_pdu_has_sane_bounds(value: int) -> None:
    with pytest.raises(ValidationError):
        RouterSettings(max_pdu=value)
    with pytest.raises(ValidationError):
        DimseDestination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, max_pdu=value)


def test_refusals_are_logged_once_per_kind_and_reported_as_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_router.edge")
    reported: list[RefusalCount] = []
    log = RefusalLog(window=3600, report=reported.extend)
    for _ in range(100):
        log.refused(Refusal.UNKNOWN_ADDRESS, "10.0.0.9")
    log.refused(Refusal.UNKNOWN_AE, "10.0.0.1", "calling AE 'X'")
    assert log.flush() == []  # the window is not over
    lines = [r for r in caplog.records if "refused a DICOM connection" in r.getMessage()]
    assert len(lines) == 2
    assert "[unknown_address]" in lines[0].getMessage()
    summary = log.flush(force=True)
    assert reported == summary
    assert {(r.reason, r.address, r.count) for r in summary} == {
        (Refusal.UNKNOWN_ADDRESS, "10.0.0.9", 100), (Refusal.UNKNOWN_AE, "10.0.0.1", 1)}
    assert "refused 100 DICOM connections from 10.0.0.9" in caplog.text
    assert log.flush(force=True) == []  # a new window starts empty


def test_a_peer_varying_its_details_cannot_grow_the_counts_without_bound() -> None:
    log = RefusalLog(window=3600)
    for n in range(MAX_KINDS_PER_WINDOW * 3):
        log.refused(Refusal.UNKNOWN_AE, "10.0.0.9", f"calling AE 'A{n}'")
    summary = log.flush(force=True)
    assert len(summary) == MAX_KINDS_PER_WINDOW + 1
    assert sum(r.count for r in summary) == MAX_KINDS_PER_WINDOW * 3


def test_a_failing_report_does_not_raise() -> None:
    def broken(counts: list[RefusalCount]) -> None:
        raise RuntimeError("database gone")

    log = RefusalLog(window=0, report=broken)
    log.refused(Refusal.PENDING_LIMIT, "10.0.0.9")
    assert len(log.flush()) == 1


@pytest.fixture
def edge_socket() -> tuple[EdgeAssociationSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    assoc = Association(AE(ae_title="T"), MODE_ACCEPTOR)
    return EdgeAssociationSocket(assoc, ours, prefix=b"\x01\x00\x00\x00\x00\x02ab", max_pdu=16384,
                                 read_timeout=5), theirs


def test_the_prefix_is_read_first(edge_socket: tuple[EdgeAssociationSocket, socket.socket]) -> None:
    sock, theirs = edge_socket
    assert sock.ready
    theirs.sendall(b"cd")
    assert bytes(sock.recv(6)) == b"\x01\x00\x00\x00\x00\x02"
    assert bytes(sock.recv(4)) == b"abcd"  # the rest of the prefix, then the socket
    assert sock.take_prefix() is None


@pytest.mark.parametrize(("pdu_type", "length", "refused"), [
    (0x04, 16384, False), (0x04, 16385, True), (0x05, MAX_CONTROL_PDU, False), (0x07, MAX_CONTROL_PDU + 1, True),
])
def test_pdu_lengths_are_checked_before_the_body_is_read(edge_socket: tuple[EdgeAssociationSocket, socket.socket],
                                                         pdu_type: int, length: int, refused: bool) -> None:
    sock, theirs = edge_socket
    sock.take_prefix()
    header = struct.pack(">BBL", pdu_type, 0, length)
    if refused:
        with pytest.raises(PduTooLarge):
            sock.check_header(header)
    else:
        sock.check_header(header)
    # pynetdicom's own DUL: a 6-byte header read, then the body
    theirs.sendall(header)
    assert bytes(sock.recv(6)) == header
    if refused:
        with pytest.raises(PduTooLarge):
            sock.recv(length)
    else:
        theirs.sendall(b"\0" * length)
        assert len(sock.recv(length)) == length
