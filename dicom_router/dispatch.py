"""Sending results back: C-STORE SCU and STOW-RS client, draining the durable outbox.

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

import json
import logging
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.errors import DispatchError
from dicom_router.ports import Outbox, OutboxItem
from dicom_router.reactor import request_association
from dicom_router.scp import quiet_pynetdicom, short_uid
from dicom_router.settings import Compression, DimseDestination, DispatchSettings, StowDestination
from dicom_router.transcode import TranscodeError, Variant, applies, compressed_copy

LOGGER = logging.getLogger(__name__)

Destination = DimseDestination | StowDestination

#: presentation contexts one association may propose (PS3.8)
_MAX_CONTEXTS = 128
_WARNING_STATUSES = (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)


def is_permanent_status(status: int) -> bool:
    """C-STORE failures that resending the same bytes can never fix."""
    return (
        0xA900 <= status <= 0xA9FF  # data set does not match SOP class
        or 0xC000 <= status <= 0xCFFF  # cannot understand
        or status in (0x0117, 0x0122, 0x0211)  # invalid instance, SOP class not supported, bad op
    )


@dataclass(frozen=True)
class SendResult:
    """What happened to one file."""

    path: Path
    sop_instance_uid: str | None
    ok: bool
    status: int | None = None
    error: str | None = None
    permanent: bool = False
    #: the transfer syntax it went in, when sent
    transfer_syntax_uid: str | None = None


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: compressed copies to offer first, in order of preference; the file itself comes after them
    compressed: tuple[Variant, ...] = ()

    @property
    def variants(self) -> tuple[Variant, ...]:
        return (*self.compressed, Variant(self.transfer_syntax_uid, self.path))


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``attempts`` earlier failed tries: doubling, capped."""
    return float(min(maximum, initial * (2.0 ** min(max(attempts, 0), 60))))


def echo(destination: DimseDestination, calling_ae: str, timeout: float = 10.0) -> bool:
    """C-ECHO ``destination``; true when it answers with success."""
    quiet_pynetdicom()
    ae = _make_ae(destination.calling_ae_title or calling_ae, destination.max_pdu, timeout)
    ae.add_requested_context(Verification)
    try:
        assoc = request_association(ae, destination.host, destination.port, destination.ae_title,
                                    destination.max_pdu)
    except Exception as exc:
        LOGGER.warning("C-ECHO to %s failed: %s", destination.name, exc)
        return False
    if not assoc.is_established:
        LOGGER.warning("C-ECHO to %s: association %s", destination.name,
                       "rejected" if assoc.is_rejected else "failed")
        return False
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ok = bool(status) and int(status.Status) == 0x0000
    LOGGER.info("C-ECHO to %s: %s", destination.name, "ok" if ok else "failed")
    return ok


def send_files(destination: Destination, paths: Sequence[Path], calling_ae: str,
               timeout: float = 30.0) -> list[SendResult]:
    """Send DICOM Part 10 files to ``destination`` (``portico send``); one result per path, in order."""
    results: dict[Path, SendResult] = {}
    files: list[_File] = []
    for path in paths:
        path = Path(path)
        try:
            files.append(_file_info(path))
        except DispatchError as exc:
            results[path] = SendResult(path, None, False, error=str(exc), permanent=True)
    if files:
        for result in _send(destination, files, calling_ae, timeout):
            results[result.path] = result
    return [results[Path(p)] for p in paths]


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
    """

    def __init__(self, settings: DispatchSettings, outbox: Outbox, calling_ae: str, *,
                 batch_size: int = 200, timeout: float = 30.0) -> None:
        self._settings = settings
        self._outbox = outbox
        self._calling_ae = calling_ae
        self._batch_size = batch_size
        self._timeout = timeout
        self._destinations = {d.name: d for d in settings.destinations}

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
        files: list[_File] = []
        by_path: dict[Path, OutboxItem] = {}
        for item in items:
            try:
                info = _file_info(item.path)
            except DispatchError as exc:
                self._fail(item, str(exc), permanent=True)
                continue
            files.append(info)
            by_path[info.path] = item
        if not files:
            return
        results = _send(destination, files, destination_calling_ae(destination, self._calling_ae),
                        self._timeout)
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

def _send(destination: Destination, files: list[_File], calling_ae: str, timeout: float) -> list[SendResult]:
    files = [_with_compressed(f, destination.compression) for f in files]
    if isinstance(destination, StowDestination):
        return _stow_with_fallback(destination, files, timeout)
    results: list[SendResult] = []
    # one association per <=128 (SOP class, transfer syntax) pairs; normally exactly one
    for chunk in _context_chunks(files):
        results.extend(_store_dimse(destination, chunk, calling_ae, timeout))
    return results


def _with_compressed(f: _File, compression: Compression) -> _File:
    """``f`` with its compressed copy for ``compression``, when one applies and can be made."""
    if not applies(f.sop_class_uid, f.transfer_syntax_uid, compression):
        return f
    try:
        variant = compressed_copy(f.path, compression)
    except (TranscodeError, OSError) as exc:
        LOGGER.warning("%s goes uncompressed: %s", short_uid(f.sop_instance_uid), exc)
        return f
    return f if variant is None else replace(f, compressed=(variant,))


def _pairs(f: _File) -> set[tuple[str, str]]:
    return {(f.sop_class_uid, v.transfer_syntax_uid) for v in f.variants}


def _context_chunks(files: list[_File]) -> Iterator[list[_File]]:
    chunk: list[_File] = []
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


def _store_dimse(destination: DimseDestination, files: list[_File], calling_ae: str,
                 timeout: float) -> list[SendResult]:
    quiet_pynetdicom()
    # send the bytes after the file meta as they are: no decode, no re-encode, bounded memory
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = _make_ae(calling_ae, destination.max_pdu, timeout)
    # one transfer syntax per context: the peer accepts or rejects a compressed one on its own
    pairs = sorted(set().union(*(_pairs(f) for f in files)))
    ae.requested_contexts = [build_context(sop_class, [ts]) for sop_class, ts in pairs]
    try:
        assoc = request_association(ae, destination.host, destination.port, destination.ae_title,
                                    destination.max_pdu)
    except Exception as exc:
        return [_failed(f, f"cannot associate: {exc}") for f in files]
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed (peer unreachable?)"
        return [_failed(f, reason) for f in files]
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    results: list[SendResult] = []
    try:
        for index, f in enumerate(files):
            if not assoc.is_established:
                results.extend(_failed(g, "association ended") for g in files[index:])
                break
            # the first accepted encoding; none accepted: the file as stored, which fails as before
            variant = next((v for v in f.variants if (f.sop_class_uid, v.transfer_syntax_uid) in accepted),
                           f.variants[-1])
            results.append(_store_one(assoc, f, variant))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc: Association, f: _File, variant: Variant) -> SendResult:
    try:
        status = assoc.send_c_store(variant.path)
    except (ValueError, RuntimeError) as exc:
        # no accepted presentation context for this SOP class / transfer syntax
        return _failed(f, f"not accepted by the peer: {exc}")
    except (OSError, AttributeError) as exc:
        return _failed(f, f"cannot read: {exc}", permanent=True)
    if not status:
        return _failed(f, "no response (timeout or abort)")
    code = int(status.Status)
    if code == 0x0000 or code in _WARNING_STATUSES:
        return SendResult(f.path, f.sop_instance_uid, True, status=code,
                          transfer_syntax_uid=variant.transfer_syntax_uid)
    comment = status.get("ErrorComment")
    text = f"status 0x{code:04X}" + (f" ({comment})" if comment else "")
    return _failed(f, text, status=code, permanent=is_permanent_status(code))


def _failed(f: _File, error: str, *, status: int | None = None, permanent: bool = False) -> SendResult:
    return SendResult(f.path, f.sop_instance_uid, False, status=status, error=error, permanent=permanent)


def _file_info(path: Path) -> _File:
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as exc:
        raise DispatchError(f"file missing: {path.name}", permanent=True) from exc
    except Exception as exc:
        raise DispatchError(f"not a DICOM Part 10 file: {path.name} ({exc})", permanent=True) from exc
    try:
        return _File(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                     str(meta.TransferSyntaxUID))
    except AttributeError as exc:
        raise DispatchError(f"file meta incomplete: {path.name}", permanent=True) from exc


# --- STOW-RS ----------------------------------------------------------------------------------

def stow_url(destination: StowDestination) -> str:
    """The STOW-RS endpoint: the configured URL, with ``/studies`` added unless it ends in it."""
    url = destination.url.rstrip("/")
    return url if url.endswith("/studies") else f"{url}/studies"


#: how an unreachable STOW-RS server's failures start; anything else is the server's answer
_STOW_UNREACHABLE = "STOW-RS unreachable"


def _stow_with_fallback(destination: StowDestination, files: list[_File], timeout: float) -> list[SendResult]:
    """Compressed copies first; what the server refused of them goes again as stored."""
    results = _stow(destination, files, timeout, compressed=True)
    again = [f for f, r in zip(files, results, strict=True)
             if f.compressed and not r.ok and not (r.error or "").startswith(_STOW_UNREACHABLE)]
    if not again:
        return results
    LOGGER.info("STOW-RS to %s refused %d compressed file(s); sending them as stored", destination.name,
                len(again))
    retried = {r.path: r for r in _stow(destination, again, timeout, compressed=False)}
    return [retried.get(r.path, r) for r in results]


def _stow(destination: StowDestination, files: list[_File], timeout: float, *,
          compressed: bool) -> list[SendResult]:
    chosen = {f.path: f.variants[0] if compressed else f.variants[-1] for f in files}
    boundary = f"portico-{uuid.uuid4().hex}"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    readable: list[_File] = []
    results: dict[Path, SendResult] = {}
    length = len(tail)
    for f in files:
        try:
            size = chosen[f.path].path.stat().st_size
        except OSError as exc:
            results[f.path] = _failed(f, f"cannot read: {exc}", permanent=True)
            continue
        readable.append(f)
        length += len(head) + size + 2
    if not readable:
        return [results[f.path] for f in files]

    def body() -> Iterator[bytes]:
        for index, f in enumerate(readable):
            yield (b"\r\n" if index else b"") + head
            with chosen[f.path].path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        yield tail

    # the first part has no leading CRLF, so the length counted one pair too many
    length -= 2
    request = urllib.request.Request(
        stow_url(destination), data=body(), method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Content-Length": str(length),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, payload = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        unreachable = {f.path: _failed(f, f"{_STOW_UNREACHABLE}: {exc}") for f in readable}
        return _in_order(files, results, unreachable)
    failed = _stow_failures(payload)
    outcome: dict[Path, SendResult] = {}
    for f in readable:
        if code == 200 or (code == 202 and f.sop_instance_uid not in failed):
            outcome[f.path] = SendResult(f.path, f.sop_instance_uid, True, status=code,
                                         transfer_syntax_uid=chosen[f.path].transfer_syntax_uid)
        elif code == 202 or code == 409:
            reason = failed.get(f.sop_instance_uid)
            outcome[f.path] = _failed(
                f, f"STOW-RS HTTP {code}" + (f" (failure reason 0x{reason:04X})" if reason else ""),
                status=reason, permanent=reason is not None and is_permanent_status(reason))
        else:
            # 400/415: malformed request (our bug or an unsupported object); 5xx, 401/403: retry
            outcome[f.path] = _failed(f, f"STOW-RS HTTP {code}", permanent=code in (400, 415))
    return _in_order(files, results, outcome)


def _in_order(files: list[_File], *parts: dict[Path, SendResult]) -> list[SendResult]:
    merged: dict[Path, SendResult] = {}
    for part in parts:
        merged.update(part)
    return [merged[f.path] for f in files]


def _stow_failures(payload: bytes) -> dict[str, int]:
    """SOP Instance UID -> FailureReason from a STOW-RS response's FailedSOPSequence."""
    try:
        doc = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    failures: dict[str, int] = {}
    if not isinstance(doc, dict):
        return failures
    for entry in doc.get("00081198", {}).get("Value", []) or []:
        try:
            uid = str(entry["00081155"]["Value"][0])
            reason = int(entry.get("00081197", {}).get("Value", [0xC000])[0])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        failures[uid] = reason
    return failures
