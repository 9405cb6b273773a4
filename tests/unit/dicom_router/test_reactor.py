"""The event-driven association's pause handshake: a sender that pauses the reactor owns the queue."""

from __future__ import annotations

import os
import platform
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_REQUESTOR

from dicom_router import reactor
from dicom_router.scp import tune_allocator
from tests.support.polling import wait_for


def test_installed_pynetdicom_is_supported() -> None:
    # the overrides follow pynetdicom 3.0's internals; a new version must be re-checked
    assert reactor.supported()


@pytest.fixture
def assoc() -> Iterator[reactor.EventDrivenAssociation]:
    association = reactor.EventDrivenAssociation(AE(ae_title="T"), MODE_REQUESTOR)
    yield association
    dul = association.dul
    assert isinstance(dul, reactor._EventDrivenDUL)
    # never started, so its reactor never closed the wake-up pipe
    os.close(dul._wake_r)
    os.close(dul._wake_w)


def test_pause_point_blocks_while_a_sender_holds_the_reactor(assoc: reactor.EventDrivenAssociation) -> None:
    assoc._reactor_checkpoint.clear()  # a sender is busy
    done = threading.Event()
    def reactor_side() -> None:
        assoc._pause_point()
        done.set()

    thread = threading.Thread(target=reactor_side, daemon=True)
    thread.start()
    wait_for(lambda: assoc._is_paused, timeout=5, message="the reactor to pause")
    assert not done.wait(0.05)
    assoc._reactor_checkpoint.set()
    assert done.wait(5)
    assert assoc._is_paused is False


def test_sender_clearing_in_the_window_is_not_missed(assoc: reactor.EventDrivenAssociation) -> None:
    """pynetdicom's race: the sender clears the checkpoint just after the reactor's wait returned.

    The stock reactor would go on to take the sender's response off the queue; ours pauses again.
    """
    checkpoint = assoc._reactor_checkpoint
    original_wait = checkpoint.wait
    cleared_once = threading.Event()

    def wait_then_sender_clears(timeout: float | None = None) -> bool:
        result = original_wait(timeout)
        if not cleared_once.is_set():
            # the sender sees _is_paused still True from the line before, clears and goes ahead
            assert assoc._is_paused
            checkpoint.clear()
            cleared_once.set()
        return result

    checkpoint.wait = wait_then_sender_clears  # type: ignore[method-assign]
    done = threading.Event()
    def reactor_side() -> None:
        assoc._pause_point()
        done.set()

    thread = threading.Thread(target=reactor_side, daemon=True)
    thread.start()
    assert cleared_once.wait(5)
    # the reactor must not come out while the sender holds the checkpoint
    assert not done.wait(0.1)
    assert assoc._is_paused
    checkpoint.set()  # the sender is done
    assert done.wait(5)


def test_pdu_read_in_pieces_and_bogus_lengths(assoc: reactor.EventDrivenAssociation) -> None:
    dul = assoc.dul
    assert isinstance(dul, reactor._EventDrivenDUL)
    left, right = socket.socketpair()
    with left, right:
        body = bytes(range(256)) * 1000
        header = struct.pack(">BBL", 4, 0, len(body))
        def send_in_pieces() -> None:
            for i in range(0, len(body), 7777):
                right.sendall(body[i:i + 7777])

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        assert dul._receive_pdu_bytes(left, header, len(body)) == header + body
        sender.join()
        # a peer announcing 4 GiB and sending 10 bytes: nothing that size is allocated up front
        huge = struct.pack(">BBL", 4, 0, 0xFFFFFFF0)
        right.sendall(b"x" * 10)
        right.shutdown(socket.SHUT_WR)
        assert dul._receive_pdu_bytes(left, huge, 0xFFFFFFF0) == huge + b"x" * 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_allocator_on_glibc() -> None:
    assert tune_allocator() is True
