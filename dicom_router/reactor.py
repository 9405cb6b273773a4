"""Event-driven associations for pynetdicom 3.0: the same protocol code, without polling sleeps.

pynetdicom runs two threads per association that poll each other with 1 ms sleeps: the
association reactor sleeps before looking for a decoded DIMSE message, and the DUL reactor sleeps
before looking for a PDU to send or for the peer's next PDU. With one C-STORE in flight at a time
(as DCMTK and most PACS send) those sleeps add about 1.5 ms to every instance, and the socket is
read in 4 KiB pieces. Here the same pynetdicom classes wait on what they wait for:

* the association thread blocks on an :class:`threading.Event` set whenever a DIMSE message or a
  DUL primitive (release, abort) is queued for it;
* the DUL thread blocks in ``select`` on the socket and on a wake-up pipe written whenever the
  association queues a primitive to send;
* each PDU is read with ``recv_into`` into one reused buffer and copied once (pynetdicom reads
  4 KiB pieces into fresh buffers and copies each PDU three times); sockets get TCP_NODELAY
  (requestors before they connect).

The association reactor also closes a race in pynetdicom's pause handshake, where a requestor's
reactor could take a C-STORE response off the queue meant for ``send_c_store`` ("Received
unexpected C-STORE service message", then a DIMSE timeout) when its thread was preempted at the
wrong moment.

Every PDU still goes through pynetdicom's state machine, ACSE and DIMSE code. The overrides follow
pynetdicom 3.0.4's private structure (``Association._run_reactor``,
``DULServiceProvider._is_transport_event`` and ``_read_pdu_data``, ``AE.associate``; the acceptor's
side is in :mod:`dicom_router.edge`). pyproject pins that version; :mod:`dicom_router.upstream`
records a hash of each overridden routine's source, and with another version or a changed routine
:func:`supported` is false and callers use pynetdicom's own classes (``router.event_driven: false``
chooses those too).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_router.edge_socket import EdgeAssociationSocket, PduTooLarge
from dicom_router.upstream import PINNED_PYNETDICOM, changed_overrides

LOGGER = logging.getLogger(__name__)

#: how long a reactor waits for work before looking at its timers and flags again
TICK_SECONDS = 0.01
_RECV_CHUNK = 1 << 20
_INITIAL_BUFFER = 1 << 16
#: PDUs up to this size are read into the reused buffer; larger ones only as their data arrives
_PREALLOCATE_LIMIT = 16 << 20
_PDU_HEADER = struct.Struct(">BBL")
_PDU_TYPES = frozenset(range(0x01, 0x08))


def _recv_exact(raw: socket.socket, count: int) -> bytes:
    """``count`` bytes, or fewer when the peer closed the connection."""
    data = raw.recv(count)
    while data and len(data) < count:
        more = raw.recv(count - len(data))
        if not more:
            break
        data += more
    return data


@functools.cache
def unchanged_upstream() -> bool:
    """Whether every pynetdicom routine we override still has the source we read (logged when not)."""
    changed = changed_overrides()
    if changed:
        LOGGER.warning("pynetdicom routines overridden here have changed upstream: %s", ", ".join(changed))
    return not changed


def supported() -> bool:
    """Whether the installed pynetdicom is the one these overrides were written for (exactly).

    The version must be :data:`~dicom_router.upstream.PINNED_PYNETDICOM` and every overridden
    routine's source must hash as recorded in :data:`~dicom_router.upstream.OVERRIDDEN`.
    """
    return pynetdicom.__version__ == PINNED_PYNETDICOM and unchanged_upstream()


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _EventDrivenDUL(DULServiceProvider):
    """DUL provider that waits in ``select`` (socket or wake-up pipe) instead of ``time.sleep``."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _WakingQueue(self.wake)
        # the stock loop sleeps this long after an idle pass; our idle pass already waited in select
        self._run_loop_delay = 0
        self._buffer = bytearray(_INITIAL_BUFFER)

    def wake(self) -> None:
        # a full pipe means a wake-up is already pending; a closed one that the DUL has stopped
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _is_transport_event(self) -> bool:
        sock = self.socket
        raw = sock.socket if sock is not None else None
        if isinstance(sock, EdgeAssociationSocket) and sock.ready_prefix:
            self._read_pdu_data()  # the A-ASSOCIATE-RQ the edge already read
            return True
        if (raw is None or raw.fileno() < 0
                or not getattr(sock, "_is_connected", True) or self._kill_thread
                or self.state_machine.current_state == "Sta13"
                or self.event_queue.qsize() or self.to_provider_queue.qsize()
                or (isinstance(raw, ssl.SSLSocket) and raw.pending())):
            # anything unusual, work already queued, or TLS data already decrypted (select cannot
            # see it): pynetdicom's own non-blocking check
            if super()._is_transport_event():
                return True
            if raw is None or not getattr(sock, "_is_connected", True):
                time.sleep(0.001)  # not connected (yet, or any more): nothing to wait on
            return False
        fileno = raw.fileno()
        try:
            ready, _, _ = select.select([fileno, self._wake_r], [], [], TICK_SECONDS)
        except (OSError, ValueError):
            return bool(super()._is_transport_event())  # closed under us; let pynetdicom report it
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        if fileno in ready:
            self._read_pdu_data()
            return True
        return False

    def _read_pdu_data(self) -> None:
        # pynetdicom 3.0's DUL._read_pdu_data, reading each PDU with recv_into into one reused
        # buffer and copying it once, where pynetdicom reads 4 KiB pieces and copies it three times
        sock = self.socket
        raw = sock.socket if sock is not None else None
        edge = sock if isinstance(sock, EdgeAssociationSocket) else None
        prefix = edge.take_prefix() if edge is not None else None
        if raw is None and prefix is None:
            self.event_queue.put("Evt17")
            return
        try:
            if prefix is not None:
                header, data = prefix[:6], prefix
                pdu_length = len(prefix) - 6
            else:
                assert raw is not None
                header = _recv_exact(raw, 6)
                if len(header) < 6:
                    self.event_queue.put("Evt17")
                    return
                pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
                if pdu_type not in _PDU_TYPES:
                    LOGGER.error("Unknown PDU type received '0x%02X'", pdu_type)
                    self.event_queue.put("Evt19")
                    return
                if edge is not None:
                    try:
                        edge.check_header(header)
                    except PduTooLarge:
                        edge.refuse_oversized()
                        raise
                data = self._receive_pdu_bytes(raw, header, pdu_length)
        except OSError as exc:  # TimeoutError and PduTooLarge included
            LOGGER.error("Connection closed before the entire PDU was received (%s)", exc)
            self.event_queue.put("Evt17")
            return
        if len(data) != 6 + pdu_length:
            LOGGER.error("The received PDU is shorter than expected (%d of %d bytes received)", len(data),
                         6 + pdu_length)
            self.event_queue.put("Evt17")
            return
        try:
            # bytes in: _decode_pdu's own bytes() copy is then a no-op
            pdu, event = self._decode_pdu(cast(bytearray, data))
            self.event_queue.put(event)
        except Exception:
            LOGGER.exception("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _receive_pdu_bytes(self, raw: socket.socket, header: bytes, length: int) -> bytes:
        total = 6 + length
        if total > _PREALLOCATE_LIMIT:
            # grow as the data arrives, as pynetdicom does: a bogus length allocates nothing
            chunks = [header]
            got = 6
            while got < total:
                chunk = raw.recv(min(total - got, _RECV_CHUNK))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)
        if len(self._buffer) < total:
            self._buffer = bytearray(total)
        with memoryview(self._buffer) as view:
            view[:6] = header
            got = 6
            while got < total:
                n = raw.recv_into(view[got:total])
                if n == 0:
                    break
                got += n
            return bytes(view[:got])

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class EventDrivenAssociation(Association):
    """An association whose reactor wakes when the DIMSE or DUL layer queues something for it."""

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self._work = threading.Event()
        self.dul = _EventDrivenDUL(self)
        self.dul.to_user_queue = _WakingQueue(self._work.set)
        self.dimse.msg_queue = _WakingQueue(self._work.set)

    def kill(self) -> None:
        super().kill()
        self._work.set()

    def _pause_point(self) -> None:
        # pynetdicom's handshake: a sender clears the checkpoint, then waits for _is_paused. Setting
        # _is_paused False *before* re-checking the checkpoint means a sender that cleared it in
        # between is either seen here (and we pause again) or waits for our next pass.
        while True:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if self._reactor_checkpoint.is_set() or self._kill:
                return

    def _run_reactor(self) -> None:
        # pynetdicom 3.0's reactor loop with the 1 ms sleep replaced by a wait for queued work
        while not self._kill:
            # waiting touches no queue, so a sender (send_c_store & co.) may go ahead meanwhile
            self._is_paused = True
            self._work.wait(TICK_SECONDS)
            self._work.clear()
            self._pause_point()

            while not self._kill and self._reactor_checkpoint.is_set():
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("association released by the peer")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                LOGGER.info("association aborted (%s)",
                            "A-P-ABORT" if self.acse.is_aborted("a-p-abort") else "A-ABORT")
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def tune_socket(sock: AssociationSocket) -> None:
    """TCP_NODELAY: pynetdicom never sets it, and Nagle costs ~5x on loopback."""
    if sock.socket is not None:
        try:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            LOGGER.debug("TCP_NODELAY not set: %s", exc)


def request_association(ae: AE, host: str, port: int, ae_title: str, max_pdu: int, *,
                        tls: tuple[ssl.SSLContext, str] | None = None,
                        event_driven: bool | None = None) -> Association:
    """Associate with ``ae_title`` at ``host:port`` proposing ``ae.requested_contexts``.

    Like :meth:`AE.associate`, returning an association that may be established or not; with an
    event-driven reactor and TCP_NODELAY when :func:`supported` (and ``event_driven`` is not false).
    ``tls`` is ``(client context, server hostname)`` for DICOM TLS; the handshake happens on connect.
    """
    if not (supported() if event_driven is None else event_driven and supported()):
        assoc = ae.associate(host, port, ae_title=ae_title, max_pdu=max_pdu, tls_args=tls)
        raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if isinstance(raw, socket.socket):
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc
    contexts = copy.deepcopy(ae.requested_contexts)
    if not contexts:
        raise ValueError("no presentation contexts to propose")
    remote = AddressInformation.from_addr_port(host, port)
    local = AddressInformation.from_tuple(("::0", 0) if remote.address_family == socket.AF_INET6 else ("", 0))

    # pynetdicom 3.0's AE.associate with our Association class
    assoc = EventDrivenAssociation(ae, MODE_REQUESTOR)
    assoc.name = f"RequestorThread@{datetime.now():%Y%m%d%H%M%S}"
    sock = AssociationSocket(assoc, address=local)
    tune_socket(sock)
    sock.tls_args = tls
    assoc.set_socket(sock)
    assoc.acceptor.ae_title = ae_title
    assoc.acceptor.address_info = remote
    assoc.requestor.address_info = local
    assoc.requestor.ae_title = ae.ae_title
    assoc.requestor.maximum_length = max_pdu
    assoc.requestor.implementation_class_uid = ae.implementation_class_uid
    assoc.requestor.implementation_version_name = ae.implementation_version_name
    for index, context in enumerate(contexts):
        context.context_id = 2 * index + 1
    assoc.requestor.requested_contexts = contexts
    assoc.request()
    if assoc.is_established:
        assoc.start()
    return assoc
