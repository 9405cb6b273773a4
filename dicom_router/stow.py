"""STOW-RS ingest (DICOMweb Store Instances): a ``multipart/related`` body in, each part stored or refused.

The HTTP side (authentication, routes) belongs to the appliance; this module only reads the body
and answers what PS3.18 asks for. Every part goes through the same sink as a C-STORE, with the same
guarantees: success only once the bytes are fsync'd and indexed, duplicates are idempotent, and a
part that cannot be accepted is quarantined and named in the Failed SOP Sequence while the other
parts are stored. The File Meta Information is rebuilt (as for C-STORE), so nothing a sender puts in
the preamble or meta is kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dicom_router.part10 import UnreadableHeader, file_meta, read_file_meta, read_uids
from dicom_router.ports import InstanceSink, ReceivedInstance, SinkFullError, StoreOutcome

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"

#: PS3.18 Table 10.5.3-2 failure reasons (the DIMSE status families)
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_PROCESSING = 0x0110

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_TYPE = re.compile(r'(?:^|;)\s*type\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class StowRequestError(Exception):
    """The request as a whole cannot be read: answered with ``status`` and no part is stored."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Failure:
    """One part that was not stored."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int
    message: str


@dataclass
class StowResult:
    """What happened to every part of one request."""

    stored: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    failed: list[Failure] = field(default_factory=list)

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def as_dicom_json(self, retrieve_base: str | None = None) -> dict[str, Any]:
        """The Store Instances Response Module as DICOM JSON."""
        body: dict[str, Any] = {}
        if retrieve_base and self.stored:
            body["00081190"] = {"vr": "UR", "Value": [retrieve_base]}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": [_reference(f.sop_class_uid, f.sop_instance_uid,
                                                                  {"00081197": {"vr": "US", "Value": [f.reason]}})
                                                       for f in self.failed]}
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": [_reference(c, i) for c, i in self.stored]}
        return body


def _reference(sop_class: str | None, sop_instance: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    item.update(extra or {})
    return item


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` request, or why it is refused."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise StowRequestError(415, "unsupported_media_type",
                               f'expected multipart/related; type="{DICOM_MEDIA_TYPE}", got {media.strip()!r}')
    kind = _TYPE.search(params)
    if kind is not None and (kind.group(1) or kind.group(2)).lower() != DICOM_MEDIA_TYPE:
        raise StowRequestError(415, "unsupported_media_type",
                               f"only {DICOM_MEDIA_TYPE} parts are accepted (the DICOM JSON/XML + bulk data "
                               "form is not supported)")
    found = _BOUNDARY.search(params)
    if found is None:
        raise StowRequestError(400, "bad_request", "the multipart/related Content-Type has no boundary")
    return found.group(1) or found.group(2)


def split_parts(body: bytes, boundary: str) -> Iterator[tuple[dict[str, str], memoryview]]:
    """Each part's headers (lower-case names) and a view of its bytes, in order."""
    view = memoryview(body)
    delimiter = b"--" + boundary.encode("ascii", "strict")
    start = body.find(delimiter)
    if start < 0:
        raise StowRequestError(400, "bad_request", "the body does not contain the multipart boundary")
    pos = start + len(delimiter)
    while True:
        if body[pos:pos + 2] == b"--":
            return  # the close delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise StowRequestError(400, "bad_request", "the multipart body ends inside a part")
        header_end = body.find(b"\r\n\r\n", line_end)
        if header_end < 0:
            raise StowRequestError(400, "bad_request", "a multipart part has no header terminator")
        headers = {}
        for raw in body[line_end + 2:header_end].split(b"\r\n"):
            name, sep, value = raw.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        data_start = header_end + 4
        next_delimiter = body.find(b"\r\n" + delimiter, data_start)
        if next_delimiter < 0:
            raise StowRequestError(400, "bad_request", "the multipart body has no closing boundary")
        yield headers, view[data_start:next_delimiter]
        pos = next_delimiter + 2 + len(delimiter)


def store_instances(body: bytes, content_type: str, sink: InstanceSink, sender: str, peer: str,
                    study_uid: str | None = None) -> StowResult:
    """Store every ``application/dicom`` part of a STOW-RS request body.

    Parameters
    ----------
    body, content_type
        The request body and its ``Content-Type`` header.
    sink
        Where instances go (fsync'd and indexed before a part counts as stored).
    sender
        The authenticated sender's name; recorded like a C-STORE calling AE title.
    peer
        The client address, for the quarantine record.
    study_uid
        The study of the URL (``/studies/{study}``): parts of another study are refused.

    Raises
    ------
    StowRequestError
        The request as a whole is unreadable (media type, boundary, framing); nothing was stored.
    """
    boundary = boundary_of(content_type)
    parts = list(split_parts(body, boundary))  # framing errors refuse the whole request before storing
    if not parts:
        raise StowRequestError(400, "bad_request", "the request has no parts")
    result = StowResult()
    for headers, data in parts:
        media = headers.get("content-type", DICOM_MEDIA_TYPE).split(";")[0].strip().lower()
        if media != DICOM_MEDIA_TYPE:
            result.failed.append(Failure(None, None, FAILURE_CANNOT_UNDERSTAND,
                                         f"part of type {media!r}; only {DICOM_MEDIA_TYPE} is accepted"))
            continue
        _store_part(bytes(data), sink, sender, peer, study_uid, result)
    log.info("STOW-RS from %s: %d stored (%d already held), %d refused", sender, len(result.stored),
             result.duplicates, len(result.failed))
    return result


def _store_part(data: bytes, sink: InstanceSink, sender: str, peer: str, study_uid: str | None,
                result: StowResult) -> None:
    try:
        sop_class, sop_instance, transfer_syntax, offset = read_file_meta(data)
        dataset = data[offset:]
        sop_class_in, sop_instance_in, study, series = read_uids(dataset, transfer_syntax)
    except UnreadableHeader as exc:
        _refuse(result, sink, data, None, None, FAILURE_CANNOT_UNDERSTAND, exc.reason, sender, peer)
        return
    rebuilt = b"".join((file_meta(sop_class_in, sop_instance_in, transfer_syntax, sender), dataset))
    if (sop_class, sop_instance) != (sop_class_in, sop_instance_in):
        _refuse(result, sink, rebuilt, sop_class_in, sop_instance_in, FAILURE_DOES_NOT_MATCH,
                "the file meta's SOP Class/Instance UIDs differ from the data set's", sender, peer)
        return
    if study_uid is not None and study != study_uid:
        _refuse(result, sink, rebuilt, sop_class_in, sop_instance_in, FAILURE_DOES_NOT_MATCH,
                "the instance belongs to another study than the request's URL", sender, peer)
        return
    instance = ReceivedInstance(sop_class_uid=sop_class_in, sop_instance_uid=sop_instance_in,
                                study_instance_uid=study, series_instance_uid=series,
                                transfer_syntax_uid=transfer_syntax, calling_ae_title=sender,
                                peer_address=peer, data=rebuilt)
    try:
        outcome = sink.store(instance)
    except SinkFullError:
        log.error("STOW-RS from %s: storage full, part refused with 0xA700", sender)
        result.failed.append(Failure(sop_class_in, sop_instance_in, FAILURE_OUT_OF_RESOURCES,
                                     "out of resources: storage full"))
        return
    result.stored.append((sop_class_in, sop_instance_in))
    if outcome is StoreOutcome.DUPLICATE:
        result.duplicates += 1


def _refuse(result: StowResult, sink: InstanceSink, data: bytes, sop_class: str | None,
            sop_instance: str | None, reason: int, message: str, sender: str, peer: str) -> None:
    try:
        qid = sink.quarantine(data, message, sender, peer)
        log.warning("STOW-RS from %s: part refused with 0x%04X (%s); quarantined as %s", sender, reason, message, qid)
    except SinkFullError:
        log.error("STOW-RS from %s: part refused (%s); quarantine full", sender, message)
        reason = FAILURE_OUT_OF_RESOURCES
    result.failed.append(Failure(sop_class, sop_instance, reason, message))
