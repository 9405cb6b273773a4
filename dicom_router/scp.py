"""The C-STORE / C-ECHO listener: allow-listed peers in, raw bytes handed to a durable sink.

The received dataset is never decoded: the bytes that came off the wire (with a file meta header
built from the association) go to :class:`~dicom_router.ports.InstanceSink` as they are, and only
the four UIDs the store indexes are read from the header (:mod:`dicom_router.part10`). The peer
gets its C-STORE response only after the sink has returned, so an acknowledged instance is a
durable one.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router import reactor
from dicom_router.edge import EdgeServer, Gate, RefusalCount, RefusalLog, normalise_address
from dicom_router.errors import RouterError
from dicom_router.part10 import UnreadableHeader, file_meta, read_uids
from dicom_router.ports import (
    AssociationObserver,
    AssociationOutcome,
    InstanceSink,
    ReceivedInstance,
    SinkFullError,
    StoreOutcome,
)
from dicom_router.settings import RouterSettings
from dicom_router.tls import server_context

LOGGER = logging.getLogger(__name__)

#: every transfer syntax a still image (or SR/SEG) arrives in; we never decode them, so all are cheap
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEG2000MCLossless,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_MISSING_UIDS = 0xC212
STATUS_UNEXPECTED = 0xC211

def short_uid(uid: str) -> str:
    """The tail of a UID, enough to tell instances apart in logs."""
    return f"…{uid[-12:]}" if len(uid) > 12 else uid


def tune_allocator() -> bool:
    """Raise glibc's mmap threshold to 4 MiB and its trim threshold to 16 MiB, process-wide.

    Every received PDU and instance passes through buffers of a few hundred KiB. With glibc's
    defaults many of them are fresh ``mmap`` pages, unmapped again on free, so each one is
    zero-filled and page-faulted anew: 0.2-0.5 s of system time per 300-slice study on the test VM,
    about a quarter of the receiver's CPU. With the raised thresholds such buffers are reused from
    the heap; the price is up to 16 MiB of freed memory kept per malloc arena. Returns false where
    there is no glibc ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 16 << 20))


def serve_any_storage() -> None:
    """Accept every storage-like presentation context and hand every C-STORE to our handler, process-wide.

    pynetdicom rejects a proposed context with an unknown or private SOP class, and *aborts* the
    association when a C-STORE names a SOP class it has no service class for (a sender that misreads
    a UID encoded as UN proposes e.g. "31"): the sender gets no status and nothing is kept. With
    pynetdicom's documented ``UNRESTRICTED_STORAGE_SERVICE`` every such request reaches
    :meth:`StorageSCP._on_store`, which answers it with a status (``0xA900`` when the data set's SOP
    class differs from the request's, ``0xC2xx`` when it is unreadable) and quarantines what it cannot
    store. It applies to acceptors only (our SCUs are unaffected). pynetdicom then accepts the first
    transfer syntax proposed in a context; the edge puts the ones in :data:`STORAGE_TRANSFER_SYNTAXES`
    first (:func:`dicom_router.associate_rq.prefer_transfer_syntaxes`), so another one is taken only
    when the sender offers nothing else.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = True


def quiet_pynetdicom() -> None:
    """Keep identifiers (patient name, ID) out of pynetdicom's logs, process-wide."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # the per-PDU "standard" handlers log at DEBUG and cost CPU on every PDU even when filtered
    _config.LOG_HANDLER_LEVEL = "none"


class StorageSCP:
    """C-STORE and C-ECHO SCP for the peers in ``settings.peers``; instances go to ``sink``.

    Parameters
    ----------
    settings
        Listener address, AE title, max PDU and the allow-listed peers.
    sink
        Durable storage; ``store`` must return only once the instance is safe.
    event_driven
        Use :mod:`dicom_router.reactor` (no polling sleeps); default: when pynetdicom supports it.
    report_refusals
        Given the edge's refusal counts once per window (the appliance audits them).
    observe
        Told of each connection's outcome as it happens: accepted, rejected in negotiation, refused
        by the edge (the appliance counts them for its metrics).
    """

    def __init__(self, settings: RouterSettings, sink: InstanceSink, *, event_driven: bool | None = None,
                 report_refusals: Callable[[list[RefusalCount]], None] | None = None,
                 observe: AssociationObserver | None = None) -> None:
        self._settings = settings
        self._sink = sink
        wanted = settings.event_driven if event_driven is None else event_driven
        self._event_driven = wanted and reactor.supported()
        if wanted and not self._event_driven:
            LOGGER.warning("pynetdicom %s is not the version dicom_router.reactor was written for; "
                           "using pynetdicom's own reactor", pynetdicom.__version__)
        self._report_refusals = report_refusals
        self._observe = observe
        self._servers: list[EdgeServer] = []
        self._gate: Gate | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of the plain listener (of the TLS one when there is no plain one)."""
        if not self._servers:
            raise RouterError("the storage SCP is not running")
        host, port = self._servers[0].server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """Host and port of the DICOM TLS listener, when there is one."""
        for server in self._servers:
            if server.tls_context is not None:
                host, port = server.server_address[:2]
                return str(host), int(port)
        return None

    @property
    def is_running(self) -> bool:
        return bool(self._servers)

    @property
    def gate(self) -> Gate:
        """The edge's counters and decisions (while running)."""
        if self._gate is None:
            raise RouterError("the storage SCP is not running")
        return self._gate

    def _make_ae(self) -> AE:
        # who may associate (address, calling and called AE title, TLS) is the edge's decision
        # (dicom_router.edge.Gate), made before pynetdicom negotiates
        ae = AE(self._settings.ae_title)
        ae.maximum_pdu_size = self._settings.max_pdu
        # a peer that stalls mid-association is dropped rather than held forever
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        # the edge caps associations first; pynetdicom's own cap is only a backstop
        ae.maximum_associations = 2 * self._settings.edge.max_associations
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, list(STORAGE_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def start(self) -> None:
        """Start listening in background threads; returns at once.

        Raises
        ------
        TlsConfigError
            When ``tls`` is set and its certificate, key or CA bundle cannot be used.
        OSError
            When a port cannot be bound.
        """
        if self._servers:
            return
        quiet_pynetdicom()
        serve_any_storage()
        if self._settings.tune_allocator and not tune_allocator():
            LOGGER.debug("allocator not tuned (no glibc mallopt)")
        tls = self._settings.tls
        tls_context = server_context(tls) if tls is not None else None
        ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        refusals = RefusalLog(self._settings.edge.report_seconds, self._report_refusals, self._observe)
        self._gate = Gate(self._settings.ae_title, self._settings.peers, self._settings.edge, refusals,
                          (*STORAGE_TRANSFER_SYNTAXES, ImplicitVRLittleEndian))
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if tls is None or tls.plain:
            listeners.append((self._settings.port, None))
        if tls is not None:
            listeners.append((tls.port, tls_context))
        try:
            for port, context in listeners:
                address = (self._settings.bind_host, port)
                server = EdgeServer(ae, address, ae.supported_contexts, handlers, gate=self._gate,
                                    tls_context=context, event_driven=self._event_driven,
                                    reuse_port=self._settings.reuse_port)
                # as AE.start_server does, so that server.shutdown() finds it
                ae._servers.append(server)
                self._servers.append(server)
                # a 0.2 s accept poll (pynetdicom: 0.5 s) makes stop() quicker
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name=f"StorageSCP@{port}", daemon=True)
                thread.start()
        except OSError:
            self.stop()
            raise
        for server in self._servers:
            host, port = server.server_address[:2]
            LOGGER.info("storage SCP %s listening on %s:%d%s (%d peers allowed%s)", self._settings.ae_title,
                        host, port, " with DICOM TLS" if server.tls_context else "", len(self._settings.peers),
                        ", event-driven" if self._event_driven else ", pynetdicom's reactor")

    def stop(self) -> None:
        """Stop listening and end running associations (and connections still negotiating)."""
        servers, self._servers = self._servers, []
        if not servers:
            return
        if self._gate is not None:
            self._gate.close_all()
        associations = []
        for server in servers:
            server.shutdown()
            associations.extend(server.active_associations)
        for assoc in associations:
            assoc.abort()
        for assoc in associations:
            assoc.join(timeout=5)
        if self._gate is not None:
            self._gate.refusals.flush(force=True)
        LOGGER.info("storage SCP %s stopped", self._settings.ae_title)

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_rejected(self, event: Event) -> None:
        _on_rejected(event)
        self._observed(AssociationOutcome.REJECTED, "negotiation")

    def _on_accepted(self, event: Event) -> None:
        _on_accepted(event)
        self._observed(AssociationOutcome.ACCEPTED, "")

    def _observed(self, outcome: AssociationOutcome, reason: str) -> None:
        if self._observe is None:
            return
        try:
            self._observe(outcome, reason)
        except Exception:  # counting must not cost an association anything
            LOGGER.exception("could not count an association")

    # --- C-STORE -------------------------------------------------------------------------------

    def _on_store(self, event: Event) -> Dataset | int:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title)
        peer = normalise_address(str(requestor.address))
        try:
            request = event.request
            stream = request.DataSet if isinstance(request, C_STORE) else None
            if not isinstance(request, C_STORE) or not isinstance(stream, BytesIO):
                raise TypeError("no dataset in the C-STORE request")
            # a view, not a copy: the dataset is copied once, into the Part 10 bytes
            with stream.getbuffer() as body:
                return self._store(body, str(request.AffectedSOPClassUID),
                                   str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
                                   calling, peer)
        except Exception:
            LOGGER.exception("C-STORE from %s: unexpected error", calling)
            self._keep_after_error(event, calling, peer)
            return _status(STATUS_UNEXPECTED, "internal error")

    def _keep_after_error(self, event: Event, calling: str, peer: str) -> None:
        """Quarantine what was received when storing failed unexpectedly, so that nothing is lost (best effort)."""
        try:
            request = event.request
            stream = request.DataSet if isinstance(request, C_STORE) else None
            if not isinstance(request, C_STORE) or not isinstance(stream, BytesIO):
                return
            data = file_meta(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                             str(event.context.transfer_syntax), calling) + stream.getvalue()
            qid = self._sink.quarantine(data, "unexpected error while storing", calling, peer)
            LOGGER.warning("C-STORE from %s: kept in quarantine as %s after the unexpected error", calling, qid)
        except Exception as exc:  # the sink itself may be what failed
            LOGGER.error("C-STORE from %s: not even quarantined after the unexpected error (%s)", calling,
                         type(exc).__name__)

    def _store(self, body: memoryview, requested_sop_class: str, requested_sop_instance: str,
               transfer_syntax: str, calling: str, peer: str) -> Dataset | int:
        try:
            sop_class, sop_instance, study, series = read_uids(body, transfer_syntax)
        except UnreadableHeader as exc:
            status = STATUS_MISSING_UIDS if exc.missing else STATUS_CANNOT_UNDERSTAND
            data = file_meta(requested_sop_class, requested_sop_instance, transfer_syntax, calling) + bytes(body)
            return self._quarantine(data, status, exc.reason, calling, peer)
        data = b"".join((file_meta(sop_class, sop_instance, transfer_syntax, calling), body))
        if sop_class != requested_sop_class:
            return self._quarantine(data, STATUS_SOP_CLASS_MISMATCH,
                                    "SOP Class UID differs from the C-STORE request", calling, peer)
        instance = ReceivedInstance(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=study,
            series_instance_uid=series,
            transfer_syntax_uid=transfer_syntax,
            calling_ae_title=calling,
            peer_address=peer,
            data=data,
        )
        try:
            outcome = self._sink.store(instance)
        except SinkFullError:
            LOGGER.error("C-STORE from %s: sink full, answering 0xA700 (instance %s)", calling,
                         short_uid(sop_instance))
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: storage full")
        if outcome is StoreOutcome.DUPLICATE:
            LOGGER.debug("C-STORE from %s: duplicate instance %s", calling, short_uid(sop_instance))
        return STATUS_SUCCESS

    def _quarantine(self, data: bytes, status: int, reason: str, calling: str, peer: str) -> Dataset:
        try:
            qid = self._sink.quarantine(data, reason, calling, peer)
        except SinkFullError:
            LOGGER.error("C-STORE from %s rejected (%s); quarantine full", calling, reason)
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: storage full")
        LOGGER.warning("C-STORE from %s rejected with 0x%04X (%s); quarantined as %s", calling, status,
                       reason, qid)
        return _status(status, reason)


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


def _on_rejected(event: Event) -> None:
    # the edge refused strangers, unknown AE titles and over-limit peers already, with their reason;
    # what pynetdicom still rejects here is the negotiation itself (e.g. no usable application context)
    requestor = event.assoc.requestor
    LOGGER.warning("association from calling AE %r at %s rejected during negotiation",
                   str(requestor.ae_title), normalise_address(str(requestor.address)))


def _on_accepted(event: Event) -> None:
    requestor = event.assoc.requestor
    LOGGER.info("association accepted: calling AE %r from %s", str(requestor.ae_title),
                normalise_address(str(requestor.address)))
