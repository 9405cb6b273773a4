"""Sending results by STOW-RS (DICOMweb): one multipart request per pass, TLS verified, our credentials.

A destination with ``compression`` gets each SEG's compressed copy first; a file the server refuses
in that form is sent again as stored, in the same pass. Nothing is retried here: the outbox does that.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicom_router.errors import DestinationConfigError
from dicom_router.outgoing import OutgoingFile, SendResult, failed, is_permanent_status
from dicom_router.settings import StowDestination
from dicom_router.web_client import authorization, client_context, describe_failure, opener

LOGGER = logging.getLogger(__name__)


def stow_url(destination: StowDestination) -> str:
    """The STOW-RS endpoint: the configured URL, with ``/studies`` added unless it ends in it."""
    url = destination.url.rstrip("/")
    return url if url.endswith("/studies") else f"{url}/studies"


#: how failures start that say nothing about the files: no HTTP answer, or nothing sent at all
_STOW_UNREACHABLE = "STOW-RS unreachable"
_STOW_NOT_SENT = "STOW-RS not sent"
#: answers that refuse us, not the files: resending them as stored would change nothing
_STOW_CREDENTIALS_REFUSED = (401, 403)
_STOW_WRITE_BYTES = 1 << 20


@dataclass(frozen=True)
class _StowClient:
    """How to reach one destination in one pass: the opener (TLS context) and our credentials."""

    opener: urllib.request.OpenerDirector
    authorization: str | None

    @classmethod
    def for_destination(cls, destination: StowDestination) -> _StowClient:
        """Raises :class:`DestinationConfigError` when its CA bundle or secret cannot be read."""
        context = client_context(destination.ca_bundle) if destination.url.startswith("https://") else None
        header = authorization(destination.auth) if destination.auth is not None else None
        return cls(opener(context), header)


def send_by_stow(destination: StowDestination, files: list[OutgoingFile], timeout: float) -> list[SendResult]:
    """Compressed copies first; what the server refused of them goes again as stored."""
    try:
        client = _StowClient.for_destination(destination)
    except DestinationConfigError as exc:
        # retryable: the items wait, and go once the configuration is fixed
        LOGGER.error("STOW-RS to %s not sent, configuration error: %s", destination.name, exc)
        return [failed(f, f"{_STOW_NOT_SENT}: configuration error: {exc}") for f in files]
    results = _stow(destination, client, files, timeout, compressed=True)
    again = [f for f, r in zip(files, results, strict=True)
             if f.compressed and not r.ok and not (r.error or "").startswith(_STOW_UNREACHABLE)
             and r.status not in _STOW_CREDENTIALS_REFUSED]
    if not again:
        return results
    LOGGER.info("STOW-RS to %s refused %d compressed file(s); sending them as stored", destination.name,
                len(again))
    retried = {r.path: r for r in _stow(destination, client, again, timeout, compressed=False)}
    return [retried.get(r.path, r) for r in results]


def _stow(destination: StowDestination, client: _StowClient, files: list[OutgoingFile], timeout: float, *,
          compressed: bool) -> list[SendResult]:
    chosen = {f.path: f.variants[0] if compressed else f.variants[-1] for f in files}
    boundary = f"portico-{uuid.uuid4().hex}"
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    readable: list[OutgoingFile] = []
    results: dict[Path, SendResult] = {}
    length = len(tail)
    for f in files:
        try:
            size = chosen[f.path].path.stat().st_size
        except OSError as exc:
            results[f.path] = failed(f, f"cannot read: {exc}", permanent=True)
            continue
        readable.append(f)
        length += len(head) + size + 2
    if not readable:
        return [results[f.path] for f in files]

    def parts() -> Iterator[bytes]:
        for index, f in enumerate(readable):
            yield (b"\r\n" if index else b"") + head
            with chosen[f.path].path.open("rb") as fh:
                while chunk := fh.read(_STOW_WRITE_BYTES):
                    yield chunk
        yield tail

    def body() -> Iterator[bytes]:
        # writes of ~1 MiB: fewer TLS records and system calls, and a small request goes out in one
        # write right behind the headers, before a server that refuses it from the headers alone
        # (401, 413) has closed the connection on the rest, which would hide its answer from us
        pending = bytearray()
        for piece in parts():
            pending += piece
            if len(pending) >= _STOW_WRITE_BYTES:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)

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
    if client.authorization is not None:
        # "unredirected": never copied onto a request that a redirect would make
        request.add_unredirected_header("Authorization", client.authorization)
    try:
        with client.opener.open(request, timeout=timeout) as response:
            code, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, payload = exc.code, exc.read()
    except OSError as exc:  # URLError, TLS failures, timeouts, refused connections
        reason = describe_failure(exc)
        unreachable = {f.path: failed(f, f"{_STOW_UNREACHABLE}: {reason}") for f in readable}
        return _in_order(files, results, unreachable)
    refused = ("the server refused our credentials" if destination.auth is not None
               else "the server wants credentials, and this destination has no auth configured")
    if code in _STOW_CREDENTIALS_REFUSED:
        LOGGER.warning("STOW-RS to %s: HTTP %d, %s", destination.name, code, refused)
    refusals = _stow_failures(payload)
    outcome: dict[Path, SendResult] = {}
    for f in readable:
        if code == 200 or (code == 202 and f.sop_instance_uid not in refusals):
            outcome[f.path] = SendResult(f.path, f.sop_instance_uid, True, status=code,
                                         transfer_syntax_uid=chosen[f.path].transfer_syntax_uid)
        elif code == 202 or code == 409:
            reason_code = refusals.get(f.sop_instance_uid)
            outcome[f.path] = failed(
                f, f"STOW-RS HTTP {code}" + (f" (failure reason 0x{reason_code:04X})" if reason_code else ""),
                status=reason_code, permanent=reason_code is not None and is_permanent_status(reason_code))
        elif code in _STOW_CREDENTIALS_REFUSED:
            # retryable: credentials are fixed (or rotated) without touching the outbox
            outcome[f.path] = failed(f, f"STOW-RS HTTP {code}: {refused}", status=code)
        else:
            # 400/415: malformed request (our bug or an unsupported object); 5xx: retry
            outcome[f.path] = failed(f, f"STOW-RS HTTP {code}", permanent=code in (400, 415))
    return _in_order(files, results, outcome)


def _in_order(files: list[OutgoingFile], *parts: dict[Path, SendResult]) -> list[SendResult]:
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
