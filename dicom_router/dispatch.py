"""Sending results back, draining the durable outbox: the C-STORE SCU here, STOW-RS in :mod:`dicom_router.stow_send`.

Files are sent as they are on disk (pynetdicom streams the dataset after the file meta, never
re-encoding it), over one association per destination per batch, with TCP_NODELAY set (pynetdicom
never sets it; on loopback that alone is worth about 5x), the event-driven reactor of
:mod:`dicom_router.reactor`, and presentation contexts for exactly the SOP class / transfer syntax
pairs in the batch.

A destination with ``compression`` set also gets, for each SEG that can take it, a lossless
compressed copy (:mod:`dicom_router.transcode`, made before associating and cached beside the file).
Each (SOP class, transfer syntax) pair is proposed in a presentation context of its own, so the
peer accepts or rejects the compressed one alone; a file goes compressed when that was accepted and
as stored otherwise. Over STOW-RS the compressed copy goes first and a file the server refuses is
sent again as stored, in the same pass.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.errors import DispatchError, TlsConfigError
from dicom_router.outgoing import OutgoingFile, SendResult, failed, file_info, is_permanent_status
from dicom_router.ports import Outbox, OutboxItem
from dicom_router.reactor import request_association
from dicom_router.scp import quiet_pynetdicom, short_uid
from dicom_router.settings import (
    Compression,
    DicomTlsSettings,
    DimseDestination,
    DispatchSettings,
    StowDestination,
    TlsMode,
)
from dicom_router.stow_send import send_by_stow, stow_url
from dicom_router.tls import association_failure, describe_tls_error, tls_failure
from dicom_router.tls import client_context as dicom_client_context
from dicom_router.transcode import TranscodeError, Variant, applies, compressed_copy

LOGGER = logging.getLogger(__name__)

__all__ = ["Dispatcher", "SendResult", "backoff_seconds", "destination_calling_ae", "destination_tls", "echo",
           "is_permanent_status", "send_files", "stow_url"]

Destination = DimseDestination | StowDestination

#: presentation contexts one association may propose (PS3.8)
_MAX_CONTEXTS = 128
_WARNING_STATUSES = (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` earlier failed tries: doubling, capped."""
    return float(min(maximum, initial * (2.0 ** min(max(attempts, 0), 60))))


class EchoResult(NamedTuple):
    """A C-ECHO's outcome: answered with success, and in words what happened (no patient data)."""

    ok: bool
    detail: str


def echo(destination: DimseDestination, calling_ae: str, timeout: float = 10.0, *,
         tls: DicomTlsSettings | None = None, event_driven: bool = True) -> bool:
    """C-ECHO ``destination``; true when it answers with success (:func:`echo_result` says why not)."""
    return echo_result(destination, calling_ae, timeout, tls=tls, event_driven=event_driven).ok


def echo_result(destination: DimseDestination, calling_ae: str, timeout: float = 10.0, *,
                tls: DicomTlsSettings | None = None, event_driven: bool = True) -> EchoResult:
    """C-ECHO ``destination``: whether it answers with success, and what happened in words.

    ``tls`` is ``router.tls``: our client certificate and CAs for a destination with ``tls: required``;
    ``event_driven`` is ``router.event_driven`` (false: pynetdicom's own reactor).
    """
    quiet_pynetdicom()
    try:
        tls_args = destination_tls(destination, tls)
    except TlsConfigError as exc:
        LOGGER.error("C-ECHO to %s not tried, TLS configuration: %s", destination.name, exc)
        return EchoResult(False, f"not tried, TLS configuration: {exc}")
    ae = _make_ae(destination.calling_ae_title or calling_ae, destination.max_pdu, timeout)
    ae.add_requested_context(Verification)
    try:
        assoc = request_association(ae, destination.host, destination.port, destination.ae_title,
                                    destination.max_pdu, tls=tls_args, event_driven=event_driven)
    except Exception as exc:
        why = describe_tls_error(exc) if tls_args else str(exc) or type(exc).__name__
        LOGGER.warning("C-ECHO to %s failed: %s", destination.name, why)
        return EchoResult(False, f"no association: {why}")
    if not assoc.is_established:
        why = association_failure(assoc, over_tls=tls_args is not None)
        LOGGER.warning("C-ECHO to %s: %s", destination.name, why)
        return EchoResult(False, str(why))
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ok = bool(status) and int(status.Status) == 0x0000
    LOGGER.info("C-ECHO to %s: %s", destination.name, "ok" if ok else "failed")
    if ok:
        return EchoResult(True, "answered C-ECHO with success")
    return EchoResult(False, f"answered C-ECHO with status 0x{int(status.Status):04X}" if status
                      else "no answer to C-ECHO (timeout or aborted)")


def send_files(destination: Destination, paths: Sequence[Path], calling_ae: str,
               timeout: float = 30.0, *, tls: DicomTlsSettings | None = None,
               event_driven: bool = True) -> list[SendResult]:
    """Send DICOM Part 10 files to ``destination`` (``portico send``); one result per path, in order.

    ``tls`` is ``router.tls``: our client certificate and CAs for a destination with ``tls: required``;
    ``event_driven`` is ``router.event_driven`` (false: pynetdicom's own reactor).
    """
    results: dict[Path, SendResult] = {}
    files: list[OutgoingFile] = []
    for path in paths:
        path = Path(path)
        try:
            files.append(file_info(path))
        except DispatchError as exc:
            results[path] = SendResult(path, None, False, error=str(exc), permanent=True)
    if files:
        try:
            tls_args = destination_tls(destination, tls) if isinstance(destination, DimseDestination) else None
        except TlsConfigError as exc:
            sent = [failed(f, f"TLS configuration: {exc}") for f in files]
        else:
            sent = _send(destination, files, calling_ae, timeout, tls=tls_args, event_driven=event_driven)
        for result in sent:
            results[result.path] = result
    return [results[Path(p)] for p in paths]


def destination_tls(destination: DimseDestination,
                    tls: DicomTlsSettings | None) -> tuple[ssl.SSLContext, str] | None:
    """``(client context, server hostname)`` for a destination with ``tls: required``, else ``None``.

    The destination's certificate is verified against its ``ca_bundle``, else ``tls.ca_bundle``, else
    the system's store, for the name ``server_hostname`` (default: its ``host``); ours is presented
    when ``tls`` (``router.tls``) is set.

    Raises
    ------
    TlsConfigError
        A certificate, key or CA file cannot be used.
    """
    if destination.tls is not TlsMode.REQUIRED:
        return None
    return dicom_client_context(tls, destination.ca_bundle), destination.server_hostname or destination.host


class Dispatcher:
    """Drains the outbox: every due item goes to its destination, or back with a retry time.

    Parameters
    ----------
    settings
        Destinations and the retry policy.
    outbox
        The durable queue (the appliance's store).
    calling_ae
        Our AE title, unless a destination sets its own ``calling_ae_title``.
    batch_size
        At most this many items per :meth:`run_once`.
    timeout
        Network, ACSE and DIMSE timeout in seconds.
    tls
        ``router.tls``: our client certificate and trusted CAs, for DIMSE destinations with
        ``tls: required``. Their contexts are built here, once (a context that cannot be built is
        tried again when its items are next due, and they wait meanwhile).
    """

    def __init__(self, settings: DispatchSettings, outbox: Outbox, calling_ae: str, *,
                 batch_size: int = 200, timeout: float = 30.0, tls: DicomTlsSettings | None = None,
                 event_driven: bool = True) -> None:
        self._settings = settings
        self._event_driven = event_driven
        self._outbox = outbox
        self._calling_ae = calling_ae
        self._batch_size = batch_size
        self._timeout = timeout
        self._destinations = {d.name: d for d in settings.destinations}
        self._tls = tls
        self._tls_args: dict[str, tuple[ssl.SSLContext, str] | TlsConfigError] = {}
        for destination in settings.destinations:
            if isinstance(destination, DimseDestination) and destination.tls is TlsMode.REQUIRED:
                with contextlib.suppress(TlsConfigError):  # logged; its items wait and fail retryably
                    self._tls_for(destination)

    def _tls_for(self, destination: DimseDestination) -> tuple[ssl.SSLContext, str] | None:
        """The destination's TLS arguments, built once; raises the :class:`TlsConfigError` of a failed build."""
        cached = self._tls_args.get(destination.name)
        if cached is not None and not isinstance(cached, TlsConfigError):
            return cached
        try:
            built = destination_tls(destination, self._tls)
        except TlsConfigError as exc:
            if cached is None or str(cached) != str(exc):
                LOGGER.error("destination %s: TLS configuration: %s", destination.name, exc)
            self._tls_args[destination.name] = exc
            raise
        if built is not None:
            self._tls_args[destination.name] = built
        return built

    def run_once(self) -> int:
        """Try every due item once; returns how many were tried (sent or failed)."""
        items = self._outbox.due(self._batch_size)
        by_destination: dict[str, list[OutboxItem]] = {}
        for item in items:
            by_destination.setdefault(item.destination, []).append(item)
        for name, group in by_destination.items():
            destination = self._destinations.get(name)
            if destination is None:
                LOGGER.error("%d item(s) for unknown destination %r: giving up on them", len(group), name)
                for item in group:
                    self._fail(item, f"unknown destination {name!r}", permanent=True)
                continue
            self._dispatch(destination, group)
        return len(items)

    def run_forever(self, stop: threading.Event) -> None:
        """Call :meth:`run_once` until ``stop`` is set, waiting ``poll_seconds`` when idle."""
        while not stop.is_set():
            try:
                tried = self.run_once()
            except Exception:
                LOGGER.exception("dispatch pass failed")
                tried = 0
            if not tried:
                stop.wait(self._settings.poll_seconds)

    def _dispatch(self, destination: Destination, items: list[OutboxItem]) -> None:
        files: list[OutgoingFile] = []
        by_path: dict[Path, OutboxItem] = {}
        for item in items:
            try:
                info = file_info(item.path)
            except DispatchError as exc:
                self._fail(item, str(exc), permanent=True)
                continue
            files.append(info)
            by_path[info.path] = item
        if not files:
            return
        try:
            tls_args = self._tls_for(destination) if isinstance(destination, DimseDestination) else None
        except TlsConfigError as exc:
            # retryable: the items wait, and go once the files are fixed
            for f in files:
                self._fail(by_path[f.path], f"TLS configuration: {exc}", permanent=False)
            return
        results = _send(destination, files, destination_calling_ae(destination, self._calling_ae),
                        self._timeout, tls=tls_args, event_driven=self._event_driven)
        failures = [r for r in results if not r.ok]
        for result in results:
            item = by_path[result.path]
            if result.ok:
                self._outbox.mark_sent(item.id)
            else:
                self._fail(item, result.error or "failed", permanent=result.permanent)
        if failures:
            LOGGER.warning("dispatch to %s: %d sent, %d failed (first: %s)", destination.name,
                           len(results) - len(failures), len(failures), failures[0].error)
        else:
            LOGGER.info("dispatch to %s: %d sent", destination.name, len(results))

    def _fail(self, item: OutboxItem, error: str, *, permanent: bool) -> None:
        retry = backoff_seconds(item.attempts, self._settings.retry_initial_seconds,
                                self._settings.retry_max_seconds)
        LOGGER.debug("dispatch of %s to %s failed (%s)%s", short_uid(item.sop_instance_uid),
                     item.destination, error, "; giving up" if permanent else f"; retry in {retry:g}s")
        self._outbox.mark_failed(item.id, error, retry, permanent)


def destination_calling_ae(destination: Destination, default: str) -> str:
    """The calling AE title to use towards ``destination``."""
    if isinstance(destination, DimseDestination) and destination.calling_ae_title:
        return destination.calling_ae_title
    return default


# --- DIMSE ------------------------------------------------------------------------------------

def _send(destination: Destination, files: list[OutgoingFile], calling_ae: str, timeout: float, *,
          tls: tuple[ssl.SSLContext, str] | None = None, event_driven: bool = True) -> list[SendResult]:
    files = [_with_compressed(f, destination.compression) for f in files]
    if isinstance(destination, StowDestination):
        return send_by_stow(destination, files, timeout)
    results: list[SendResult] = []
    # one association per <=128 (SOP class, transfer syntax) pairs; normally exactly one
    for chunk in _context_chunks(files):
        results.extend(_store_dimse(destination, chunk, calling_ae, timeout, tls, event_driven))
    return results


def _with_compressed(f: OutgoingFile, compression: Compression) -> OutgoingFile:
    """``f`` with its compressed copy for ``compression``, when one applies and can be made."""
    if not applies(f.sop_class_uid, f.transfer_syntax_uid, compression):
        return f
    try:
        variant = compressed_copy(f.path, compression)
    except (TranscodeError, OSError) as exc:
        LOGGER.warning("%s goes uncompressed: %s", short_uid(f.sop_instance_uid), exc)
        return f
    return f if variant is None else replace(f, compressed=(variant,))


def _pairs(f: OutgoingFile) -> set[tuple[str, str]]:
    return {(f.sop_class_uid, v.transfer_syntax_uid) for v in f.variants}


def _context_chunks(files: list[OutgoingFile]) -> Iterator[list[OutgoingFile]]:
    chunk: list[OutgoingFile] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        new = _pairs(f) - pairs
        if new and len(pairs) + len(new) > _MAX_CONTEXTS:
            yield chunk
            chunk, pairs = [], set()
        pairs |= _pairs(f)
        chunk.append(f)
    if chunk:
        yield chunk


def _make_ae(ae_title: str, max_pdu: int, timeout: float) -> AE:
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def _store_dimse(destination: DimseDestination, files: list[OutgoingFile], calling_ae: str, timeout: float,
                 tls: tuple[ssl.SSLContext, str] | None = None, event_driven: bool = True) -> list[SendResult]:
    quiet_pynetdicom()
    # send the bytes after the file meta as they are: no decode, no re-encode, bounded memory
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = _make_ae(calling_ae, destination.max_pdu, timeout)
    # one transfer syntax per context: the peer accepts or rejects a compressed one on its own
    pairs = sorted(set().union(*(_pairs(f) for f in files)))
    ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
    try:
        assoc = request_association(ae, destination.host, destination.port, destination.ae_title,
                                    destination.max_pdu, tls=tls, event_driven=event_driven)
    except Exception as exc:
        return [failed(f, f"cannot associate: {describe_tls_error(exc) if tls else exc}") for f in files]
    if not assoc.is_established:
        reason = association_failure(assoc, over_tls=tls is not None)
        return [failed(f, reason) for f in files]
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    results: list[SendResult] = []
    try:
        for index, f in enumerate(files):
            if not assoc.is_established:
                failure = tls_failure(assoc.dul) if tls else None
                reason = f"association ended over TLS: {failure}" if failure else "association ended"
                results.extend(failed(g, reason) for g in files[index:])
                break
            # the first accepted encoding; none accepted: the file as stored, which fails as before
            variant = next((v for v in f.variants if (f.sop_class_uid, v.transfer_syntax_uid) in accepted),
                           f.variants[-1])
            results.append(_store_one(assoc, f, variant))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc: Association, f: OutgoingFile, variant: Variant) -> SendResult:
    try:
        status = assoc.send_c_store(variant.path)
    except (ValueError, RuntimeError) as exc:
        # no accepted presentation context for this SOP class / transfer syntax
        return failed(f, f"not accepted by the peer: {exc}")
    except (OSError, AttributeError) as exc:
        return failed(f, f"cannot read: {exc}", permanent=True)
    if not status:
        return failed(f, "no response (timeout or abort)")
    code = int(status.Status)
    if code == 0x0000 or code in _WARNING_STATUSES:
        return SendResult(f.path, f.sop_instance_uid, True, status=code,
                          transfer_syntax_uid=variant.transfer_syntax_uid)
    comment = status.get("ErrorComment")
    text = f"status 0x{code:04X}" + (f" ({comment})" if comment else "")
    return failed(f, text, status=code, permanent=is_permanent_status(code))
