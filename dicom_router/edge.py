"""The DICOM listener's edge: strangers are refused before they cost a thread's memory or a slot.

pynetdicom accepts every connection, starts an association for it and reads whatever PDU length a
peer declares before any allow-list is consulted. Here a connection goes through three doors first:

1. **At accept** (the listener's own thread, no reads): an address on no peer's ``hosts`` is
   closed at once; pending connections (not yet associated) are capped per address and in total.
2. **Before pynetdicom** (a thread per pending connection, bounded by that cap): the TLS
   handshake, then the whole A-ASSOCIATE-RQ, within ``associate_timeout`` seconds from accept.
   A first PDU that is not an A-ASSOCIATE-RQ, or one over 64 KiB, is dropped unread. The called AE
   title must be ours; the calling AE title must be allowed from that address; a peer marked
   ``tls: required`` must have come over TLS, with the client certificate it is bound to. Caps on
   associations per address and in total. A refused association gets the A-ASSOCIATE-RJ that
   names the reason (PS3.8 9.3.4).
3. **Handed on**: the admitted socket, with the A-ASSOCIATE-RQ as a prefix to read first
   (:class:`~dicom_router.edge_socket.EdgeAssociationSocket`), goes to an association of either
   reactor (:mod:`dicom_router.reactor`'s or pynetdicom's own); its later PDUs are length-checked
   before they are read.

Every refusal is logged with its reason (the first of a kind per address and window at WARNING,
then counted) and reported as counts per window (:class:`RefusalLog`), which the appliance audits.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_router.associate_rq import MalformedRequest, ae_titles, prefer_transfer_syntaxes
from dicom_router.edge_socket import MAX_CONTROL_PDU, EdgeAssociationSocket
from dicom_router.ports import AssociationObserver, AssociationOutcome
from dicom_router.reactor import EventDrivenAssociation, tune_socket
from dicom_router.settings import EdgeSettings, Peer, TlsMode
from dicom_router.tls import describe_tls_error, identity_matches, identity_of

LOGGER = logging.getLogger(__name__)

_HEADER = struct.Struct(">BBL")
_A_ASSOCIATE_RQ = 0x01
#: protocol version, reserved, called AE, calling AE, reserved: the fixed part of an A-ASSOCIATE-RQ
_FIXED_RQ = 68
#: distinct (reason, address, detail) counted per window before further details are lumped together
MAX_KINDS_PER_WINDOW = 256


class Refusal(StrEnum):
    """Why a connection did not become an association (the code in logs and audit)."""

    UNKNOWN_ADDRESS = "unknown_address"
    PENDING_LIMIT = "pending_limit"
    ASSOCIATION_LIMIT = "association_limit"
    ASSOCIATE_TIMEOUT = "associate_timeout"
    CLOSED = "closed_without_associating"
    NOT_ASSOCIATE_RQ = "not_an_associate_rq"
    OVERSIZED = "oversized_pdu"
    WRONG_CALLED_AE = "wrong_called_ae"
    UNKNOWN_AE = "unknown_calling_ae"
    TLS_REQUIRED = "tls_required"
    TLS_FAILED = "tls_handshake_failed"
    CERTIFICATE_MISMATCH = "certificate_mismatch"
    SHUTTING_DOWN = "shutting_down"


_DESCRIPTIONS = {
    Refusal.UNKNOWN_ADDRESS: "address on no peer's allow-list (closed at accept)",
    Refusal.PENDING_LIMIT: "too many connections from there still negotiating",
    Refusal.ASSOCIATION_LIMIT: "association limit reached (A-ASSOCIATE-RJ: local limit exceeded)",
    Refusal.ASSOCIATE_TIMEOUT: "no complete A-ASSOCIATE-RQ in time",
    Refusal.CLOSED: "connection closed without associating",
    Refusal.NOT_ASSOCIATE_RQ: "first PDU is not an A-ASSOCIATE-RQ",
    Refusal.OVERSIZED: "A-ASSOCIATE-RQ longer than 64 KiB (dropped unread)",
    Refusal.WRONG_CALLED_AE: "called AE title is not ours",
    Refusal.UNKNOWN_AE: "calling AE title not allowed from this address",
    Refusal.TLS_REQUIRED: "plain association from a peer that must use TLS",
    Refusal.TLS_FAILED: "TLS handshake failed",
    Refusal.CERTIFICATE_MISMATCH: "client certificate is not the one bound to this AE title",
    Refusal.SHUTTING_DOWN: "the listener is stopping",
}

#: (result, source, reason) of the A-ASSOCIATE-RJ sent for a refusal after the request was read
_REJECTIONS: dict[Refusal, tuple[int, int, int]] = {
    Refusal.WRONG_CALLED_AE: (1, 1, 7),  # permanent, service user, called AE title not recognised
    Refusal.UNKNOWN_AE: (1, 1, 3),  # permanent, service user, calling AE title not recognised
    Refusal.CERTIFICATE_MISMATCH: (1, 1, 3),
    Refusal.TLS_REQUIRED: (1, 1, 1),  # permanent, service user, no reason given
    Refusal.ASSOCIATION_LIMIT: (2, 3, 2),  # transient, service provider (presentation), local limit
    Refusal.SHUTTING_DOWN: (2, 3, 1),  # transient, temporary congestion
}


def normalise_address(address: str) -> str:
    """An IPv4 peer seen through an IPv6 socket (``::ffff:a.b.c.d``) as plain ``a.b.c.d``."""
    return address[7:] if address.startswith("::ffff:") else address


@dataclass(frozen=True)
class RefusalCount:
    """How often connections from ``address`` were refused for ``reason`` in one window."""

    reason: Refusal
    address: str
    count: int
    #: the first refusal's detail (a calling AE title, a TLS error); never patient data
    detail: str

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.reason]


class RefusalLog:
    """Logs refusals without flooding, and reports them as counts per window.

    The first refusal of a kind (reason and detail) from an address in a window is logged at WARNING (connections
    that close without a word, such as health checks and port scans, at DEBUG); the rest are
    counted. :meth:`flush` ends a window once ``window`` seconds have passed: it logs a summary
    for kinds refused more than once and hands the counts to ``report`` (the appliance's audit).
    ``observe`` hears of each refusal at once (the appliance's metrics).
    """

    def __init__(self, window: float, report: Callable[[list[RefusalCount]], None] | None = None,
                 observe: AssociationObserver | None = None) -> None:
        self._window = window
        self._report = report
        self._observe = observe
        self._lock = threading.Lock()
        self._counts: dict[tuple[Refusal, str, str], int] = {}
        self._started = time.monotonic()

    def refused(self, reason: Refusal, address: str, detail: str = "") -> None:
        with self._lock:
            key = (reason, address, detail)
            if key not in self._counts and len(self._counts) >= MAX_KINDS_PER_WINDOW:
                key = (reason, address, "(other details)")  # a peer varying its AE title gains nothing
            first = key not in self._counts
            self._counts[key] = self._counts.get(key, 0) + 1
        if self._observe is not None:
            try:
                self._observe(AssociationOutcome.REFUSED, reason.value)
            except Exception:  # counting must not cost the listener anything
                LOGGER.exception("could not count a refused connection")
        if first:
            level = logging.DEBUG if reason is Refusal.CLOSED else logging.WARNING
            LOGGER.log(level, "refused a DICOM connection from %s: %s [%s]%s", address, _DESCRIPTIONS[reason],
                       reason.value, f" ({key[2]})" if key[2] else "")

    def flush(self, *, force: bool = False) -> list[RefusalCount]:
        """End the window when it is due (or ``force``); returns the counts reported."""
        now = time.monotonic()
        with self._lock:
            if not self._counts or (not force and now - self._started < self._window):
                if not self._counts:
                    self._started = now
                return []
            counts, self._counts, started, self._started = self._counts, {}, self._started, now
        summary = [RefusalCount(reason, address, n, detail) for (reason, address, detail), n in sorted(counts.items())]
        for item in summary:
            if item.count > 1 and item.reason is not Refusal.CLOSED:
                LOGGER.warning("refused %d DICOM connections from %s in the last %.0f s: %s [%s]%s", item.count,
                               item.address, now - started, item.description, item.reason.value,
                               f" ({item.detail})" if item.detail else "")
        if self._report is not None:
            try:
                self._report(summary)
            except Exception:  # the audit must not take the listener down
                LOGGER.exception("could not report refused connections")
        return summary


@dataclass
class Admission:
    """A connection the edge let through, with what it already read of it."""

    socket: socket.socket
    address: str
    calling_ae: str
    #: the whole A-ASSOCIATE-RQ PDU
    request: bytes
    tls: bool


class _Refused(Exception):
    def __init__(self, reason: Refusal, detail: str = "") -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail


class Gate:
    """The edge's decisions and counters, shared by the plain and the TLS listener of one SCP.

    Parameters
    ----------
    ae_title
        Our AE title: the called AE title every request must carry.
    peers
        Who may associate, from where, and how (``tls``, a bound client certificate).
    settings
        Deadlines and caps.
    refusals
        Where refusals are logged and counted.
    transfer_syntaxes
        The ones we know: moved to the front of each proposed presentation context
        (:func:`~dicom_router.associate_rq.prefer_transfer_syntaxes`).
    """

    def __init__(self, ae_title: str, peers: tuple[Peer, ...], settings: EdgeSettings,
                 refusals: RefusalLog, transfer_syntaxes: Collection[str] = ()) -> None:
        self.ae_title = ae_title.strip()
        self.transfer_syntaxes = frozenset(transfer_syntaxes)
        self.settings = settings
        self.refusals = refusals
        self._peers: dict[tuple[str, str], Peer] = {}
        for peer in peers:
            for host in peer.hosts:
                self._peers.setdefault((normalise_address(host), peer.ae_title.strip()), peer)
        self._addresses = frozenset(address for address, _ in self._peers)
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._associations: dict[str, int] = {}
        self._open: set[socket.socket] = set()
        self._closing = False

    @property
    def associations(self) -> int:
        with self._lock:
            return sum(self._associations.values())

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    # --- door 1: at accept ---------------------------------------------------------------------

    def accept(self, sock: socket.socket, address: str) -> bool:
        """Whether to start negotiating with a fresh connection; takes a pending slot when so."""
        reason: Refusal | None = None
        with self._lock:
            if self._closing:
                reason = Refusal.SHUTTING_DOWN
            elif address not in self._addresses:
                reason = Refusal.UNKNOWN_ADDRESS
            elif (self._pending.get(address, 0) >= self.settings.max_pending_per_address
                  or sum(self._pending.values()) >= self.settings.max_pending):
                reason = Refusal.PENDING_LIMIT
            else:
                self._pending[address] = self._pending.get(address, 0) + 1
                self._open.add(sock)
        if reason is not None:
            self.refusals.refused(reason, address)
            return False
        return True

    # --- door 2: TLS and the A-ASSOCIATE-RQ ------------------------------------------------------

    def admit(self, raw: socket.socket, address: str, tls_context: ssl.SSLContext | None) -> Admission | None:
        """Negotiate up to a complete, acceptable A-ASSOCIATE-RQ; ``None`` (connection closed) if refused.

        Releases the pending slot taken by :meth:`accept`; an admission holds an association slot
        until :meth:`release`.
        """
        sock: socket.socket = raw
        admission: Admission | None = None
        try:
            deadline = time.monotonic() + self.settings.associate_timeout
            if tls_context is not None:
                sock = self._handshake(raw, tls_context, deadline)
            header = _read(sock, 6, deadline, allow_eof=True)
            pdu_type, _, length = _HEADER.unpack(header)
            if pdu_type != _A_ASSOCIATE_RQ:
                raise _Refused(Refusal.NOT_ASSOCIATE_RQ, f"PDU type 0x{pdu_type:02X}")
            if length > MAX_CONTROL_PDU:
                raise _Refused(Refusal.OVERSIZED, f"{length} bytes declared")
            if length < _FIXED_RQ:
                raise _Refused(Refusal.NOT_ASSOCIATE_RQ, "too short")
            request = header + _read(sock, length, deadline)
            if self.transfer_syntaxes:
                with contextlib.suppress(MalformedRequest):  # pynetdicom then rejects it with its reason
                    request = prefer_transfer_syntaxes(request, self.transfer_syntaxes)
            admission = self._decide(sock, address, request, tls_context is not None)
        except _Refused as refused:
            self.refusals.refused(refused.reason, address, refused.detail)
            if refused.reason in _REJECTIONS:
                _send_rejection(sock, *_REJECTIONS[refused.reason])
            _close(sock)
            admission = None
        except OSError as exc:
            self.refusals.refused(Refusal.CLOSED, address, type(exc).__name__)
            _close(sock)
        except Exception:  # a bug here must cost one connection, not the listener
            LOGGER.exception("refused a DICOM connection from %s: unexpected error at the edge", address)
            _close(sock)
        finally:
            with self._lock:
                self._pending[address] -= 1
                if not self._pending[address]:
                    del self._pending[address]
                self._open.discard(raw)
                self._open.discard(sock)
                if admission is not None:
                    self._open.add(admission.socket)
        return admission

    def _handshake(self, raw: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
        sock: ssl.SSLSocket | None = None
        try:
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            # wrapping takes the descriptor over from ``raw``: track the new object, so that
            # close_all() can cut a handshake in progress
            sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._open.add(sock)
            sock.do_handshake()
        except (ssl.SSLError, OSError) as exc:  # TimeoutError included
            if sock is not None:
                with self._lock:
                    self._open.discard(sock)
                _close(sock)
            raise _Refused(Refusal.TLS_FAILED, describe_tls_error(exc)) from None
        return sock

    def _decide(self, sock: socket.socket, address: str, request: bytes, tls: bool) -> Admission:
        called, calling = ae_titles(request)
        if called != self.ae_title:
            raise _Refused(Refusal.WRONG_CALLED_AE, f"called {called!r} from {calling!r}")
        peer = self._peers.get((address, calling))
        if peer is None:
            raise _Refused(Refusal.UNKNOWN_AE, f"calling AE {calling!r}")
        if peer.tls is TlsMode.REQUIRED and not tls:
            raise _Refused(Refusal.TLS_REQUIRED, f"calling AE {calling!r}")
        if tls and not identity_matches(peer, identity_of(cast(ssl.SSLSocket, sock))):
            raise _Refused(Refusal.CERTIFICATE_MISMATCH, f"calling AE {calling!r}")
        with self._lock:
            if self._closing:
                raise _Refused(Refusal.SHUTTING_DOWN)
            if (self._associations.get(address, 0) >= self.settings.max_associations_per_address
                    or sum(self._associations.values()) >= self.settings.max_associations):
                raise _Refused(Refusal.ASSOCIATION_LIMIT, f"calling AE {calling!r}")
            self._associations[address] = self._associations.get(address, 0) + 1
        return Admission(sock, address, calling, request, tls)

    def release(self, admission: Admission) -> None:
        """The admitted association ended: free its slot."""
        with self._lock:
            self._associations[admission.address] -= 1
            if not self._associations[admission.address]:
                del self._associations[admission.address]
            self._open.discard(admission.socket)

    def close_all(self) -> None:
        """Refuse from now on, and cut every connection still open (pending ones included)."""
        with self._lock:
            self._closing = True
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _read(sock: socket.socket, count: int, deadline: float, *, allow_eof: bool = False) -> bytes:
    data = bytearray()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused(Refusal.ASSOCIATE_TIMEOUT, f"{len(data)} bytes in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(count - len(data))
        except TimeoutError:
            raise _Refused(Refusal.ASSOCIATE_TIMEOUT, f"{len(data)} bytes in time") from None
        if not chunk:
            if allow_eof and not data:
                raise _Refused(Refusal.CLOSED)
            raise _Refused(Refusal.CLOSED, "closed mid-PDU")
        data += chunk
    return bytes(data)


def _send_rejection(sock: socket.socket, result: int, source: int, reason: int) -> None:
    with contextlib.suppress(OSError):
        sock.settimeout(2.0)
        sock.sendall(bytes((0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, result, source, reason)))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class EdgeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind the edge's doors.

    Parameters
    ----------
    ae, address, contexts, evt_handlers
        As for :class:`~pynetdicom.transport.ThreadedAssociationServer`.
    gate
        The edge's decisions (shared with the SCP's other listener).
    tls_context
        Server context for a DICOM TLS listener; ``None`` for plain DICOM. The handshake runs in
        the connection's own thread with the edge's deadline, never in the accepting one.
    event_driven
        Associations on :mod:`dicom_router.reactor`'s reactor; false: pynetdicom's own.
    reuse_port
        Share the port with other receiver processes (``SO_REUSEPORT``).
    """

    daemon_threads = True
    block_on_close = False
    #: socketserver's default backlog of 5 lets a burst of connections drop real senders' SYNs
    #: (they retry after 1 s, then 3 s); the edge refuses the burst quickly instead
    request_queue_size = 256

    def __init__(self, ae: AE, address: tuple[str, int], contexts: list[Any], evt_handlers: list[Any], *,
                 gate: Gate, tls_context: ssl.SSLContext | None, event_driven: bool, reuse_port: bool = False) -> None:
        self.gate = gate
        self.tls_context = tls_context
        self.event_driven = event_driven
        self.reuse_port = reuse_port
        super().__init__(ae, address, gate.ae_title, contexts, None, evt_handlers=evt_handlers,
                         request_handler=EdgeRequestHandler)

    def server_bind(self) -> None:
        # pynetdicom's server_bind sets SO_REUSEADDR only (socketserver's allow_reuse_port never reaches it)
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # accept only: pynetdicom would run the TLS handshake here, in the accepting thread
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.gate.accept(cast(socket.socket, request), normalise_address(str(client_address[0])))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = normalise_address(str(client_address[0]))
        admission = self.gate.admit(cast(socket.socket, request), address, self.tls_context)
        if admission is None:
            return
        try:
            self.finish_request(cast(Any, admission), client_address)
        except Exception:
            LOGGER.exception("association from %s failed to start", address)
        finally:
            self.gate.release(admission)
            _close(admission.socket)

    def service_actions(self) -> None:
        super().service_actions()
        self.gate.refusals.flush()


class EdgeRequestHandler(RequestHandler):
    """Starts an association on an admitted connection and waits for it to end."""

    server: EdgeServer

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def _create_association(self) -> Association:
        # pynetdicom 3.0.4's RequestHandler._create_association, with the edge's socket, either
        # reactor's Association class, and shallow copies of the supported contexts
        admission = cast(Admission, self.request)
        server = self.server
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR) if server.event_driven else \
            Association(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        sock = EdgeAssociationSocket(assoc, admission.socket, prefix=admission.request,
                                     max_pdu=self.ae.maximum_pdu_size,
                                     read_timeout=server.gate.settings.pdu_timeout)
        tune_socket(sock)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # pynetdicom deep-copies ~170 contexts x 18 transfer syntaxes here (~18 ms per association);
        # negotiation only reads them, so per-association shallow copies do
        assoc.acceptor.supported_contexts = [copy.copy(cx) for cx in server.contexts or []]
        assoc.requestor.address_info = self.remote

        for event, bound in server._handlers.items():
            if event.is_intervention and bound:
                handler, args = cast("tuple[Any, list[Any] | None]", bound)
                assoc.bind(event, handler, args)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast("list[tuple[Any, list[Any] | None]]", bound):
                    assoc.bind(event, handler, args)
        return assoc
