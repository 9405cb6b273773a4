"""STOW-RS ingest (DICOMweb Store Instances): a ``multipart/related`` body in, each part stored or refused.

The HTTP side (authentication, routes, the concurrency cap) belongs to the appliance; this module
reads the body as it arrives (:class:`StowIngest`: fed chunk by chunk, never holding the body) and
answers what PS3.18 asks for. Every part goes through the same sink as a C-STORE, with the same
guarantees: success only once the bytes are fsync'd and indexed, duplicates are idempotent, and a
part that cannot be accepted is listed in the Failed SOP Sequence while the other parts are stored.
The File Meta Information is rebuilt (as for C-STORE), so nothing a sender puts in the preamble or
meta is kept.

A hostile or broken sender is bounded: each part is capped (:attr:`StowLimits.max_part_bytes`),
parts per request are capped (:attr:`StowLimits.max_parts`: the request stops there, answered 413
with what was stored so far), and what is quarantined per sender and hour is capped
(:class:`~dicom_router.stow_budget.QuarantineBudget`: beyond it bad parts are refused and not kept,
said once). Whatever goes wrong with one part, that part is refused and the others go on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_router.multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart
from dicom_router.part10 import UnreadableHeader, file_meta, read_file_meta, read_uids
from dicom_router.ports import ReceivedInstance, SinkFullError, SpoolingSink, StoreOutcome
from dicom_router.settings import RouterSettings
from dicom_router.spool import DEFAULT_MEMORY_BYTES, PartSpool
from dicom_router.stow_budget import QuarantineBudget

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
DICOM_JSON_MEDIA_TYPE = "application/dicom+json"

#: PS3.18 Table 10.5.3-2 failure reasons (the DIMSE status families)
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DOES_NOT_MATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_PROCESSING = 0x0110

#: the walk for the four UIDs reads at most this much of a spooled part (pydicom reads the file beyond)
HEADER_READ_BYTES = 2**20
#: refused parts logged one by one per request; the rest are counted in the request's summary line
LOGGED_REFUSALS = 10

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_TYPE = re.compile(r'(?:^|;)\s*type\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


class StowRequestError(Exception):
    """The request as a whole cannot be read: answered with ``status`` and no part was stored."""

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


@dataclass(frozen=True)
class Refusal:
    """Why a request stopped before its end, after some of its parts were handled."""

    status: int
    code: str
    message: str


@dataclass
class StowResult:
    """What happened to every part of one request."""

    stored: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    failed: list[Failure] = field(default_factory=list)
    #: refused parts kept in the quarantine
    quarantined: int = 0
    #: refused parts that were not quarantined: the sender's quarantine budget was spent
    not_kept: int = 0
    #: set when the request stopped early (too many parts, too large, broken framing)
    refusal: Refusal | None = None

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored, 409 none stored (PS3.18 10.5.3); the refusal's status if cut short."""
        if self.refusal is not None:
            return self.refusal.status
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    @property
    def warnings(self) -> list[str]:
        """What the response's ``Warning`` header says (RFC 7234 warn-code 299), beyond the failure reasons."""
        out = [self.refusal.message] if self.refusal is not None else []
        if self.not_kept:
            out.append(f"{self.not_kept} refused part(s) were not quarantined: this sender's quarantine budget "
                       "(router.stow_quarantine_mb_per_hour / stow_quarantine_parts_per_hour) is spent")
        return out

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


@dataclass(frozen=True)
class StowLimits:
    """Per-request caps (see :class:`~dicom_router.settings.RouterSettings`)."""

    max_part_bytes: int = 1024 * 2**20
    max_parts: int = 10000
    #: parts up to this size are handled in memory; bigger ones are spooled to a file
    memory_part_bytes: int = DEFAULT_MEMORY_BYTES

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> StowLimits:
        return cls(max_part_bytes=settings.stow_max_part_mb * 2**20, max_parts=settings.stow_max_parts)


@dataclass
class _Current:
    """The part being received: spooled if it is ``application/dicom``, else only counted."""

    media: str
    spool: PartSpool | None


class StowIngest:
    """One STOW-RS request, fed its body chunk by chunk (:meth:`feed`), each part stored as it completes.

    Parameters
    ----------
    content_type
        The request's ``Content-Type``.
    sink
        Where instances go (fsync'd and indexed before a part counts as stored); big parts are
        spooled to its ``spool_dir`` and handed over as files.
    sender
        The authenticated sender's name; recorded like a C-STORE calling AE title.
    peer
        The client address, for the quarantine record.
    study_uid
        The study of the URL (``/studies/{study}``): parts of another study are refused.
    limits
        Per-part and per-request caps.
    budget
        The service's quarantine budget; ``None``: every refused part is quarantined.

    Raises
    ------
    StowRequestError
        The Content-Type is not ``multipart/related; type="application/dicom"`` with a boundary.
    """

    def __init__(self, content_type: str, sink: SpoolingSink, sender: str, peer: str,
                 study_uid: str | None = None, *, limits: StowLimits | None = None,
                 budget: QuarantineBudget | None = None) -> None:
        boundary = boundary_of(content_type)
        try:
            self._parser = MultipartParser(boundary)
        except ValueError as exc:
            raise StowRequestError(400, "bad_request", str(exc)) from None
        self._sink = sink
        self._sender = sender
        self._peer = peer
        self._study_uid = study_uid
        self._limits = limits or StowLimits()
        self._budget = budget
        self._current: _Current | None = None
        self._parts = 0
        self._logged = 0
        self.result = StowResult()

    @property
    def stopped(self) -> bool:
        """Whether the request is over (refused, or its close delimiter seen): the rest of the body is not needed."""
        return self.result.refusal is not None or self._parser.done

    @property
    def handled(self) -> int:
        """Parts stored or refused so far."""
        return len(self.result.stored) + len(self.result.failed)

    def feed(self, chunks: Iterable[bytes]) -> None:
        """Parse the next pieces of the body; every part they complete is stored or refused before this returns.

        Broken framing, or a part beyond :attr:`StowLimits.max_parts`, stops the request
        (:attr:`StowResult.refusal`, :attr:`stopped`); :meth:`finish` then says what was handled.
        """
        for chunk in chunks:
            if self.stopped:
                return
            try:
                events = self._parser.feed(chunk)
            except MultipartError as exc:
                self._framing_error(str(exc))
                return
            for event in events:
                if isinstance(event, PartData):
                    if self._current is not None and self._current.spool is not None:
                        self._current.spool.write(event.data)
                elif isinstance(event, PartStart):
                    self._parts += 1
                    if self._parts > self._limits.max_parts:
                        self.refuse(413, "too_many_parts",
                                    f"the request has more than {self._limits.max_parts} parts "
                                    "(router.stow_max_parts); the parts after that were not read: send them "
                                    "in another request")
                        return
                    self._start(event.headers)
                elif isinstance(event, PartEnd):
                    self._end()

    def refuse(self, status: int, code: str, message: str) -> None:
        """Stop the request here (the caller stops reading); the part in progress is dropped."""
        if self.result.refusal is None:
            self.result.refusal = Refusal(status, code, message)
        self.close()

    def finish(self) -> StowResult:
        """The body has ended (or the request was refused): the result of every part.

        Raises
        ------
        StowRequestError
            No part was handled and the body is not a complete multipart body.
        """
        if self.result.refusal is None:
            try:
                self._parser.close()
            except MultipartError as exc:
                self._framing_error(str(exc))
        if self.result.refusal is not None and not self.handled:
            refusal = self.result.refusal
            raise StowRequestError(refusal.status, refusal.code, refusal.message)
        if not self.handled:
            raise StowRequestError(400, "bad_request", "the request has no parts")
        result = self.result
        log.info("STOW-RS from %s: %d stored (%d already held), %d refused (%d quarantined, %d not kept: over the "
                 "quarantine budget)%s", self._sender, len(result.stored), result.duplicates, len(result.failed),
                 result.quarantined, result.not_kept,
                 f"; request stopped: {result.refusal.code}" if result.refusal else "")
        return result

    def close(self) -> None:
        """Drop the part in progress (its spool file too); idempotent."""
        current, self._current = self._current, None
        if current is not None and current.spool is not None:
            current.spool.discard()

    # --- one part ----------------------------------------------------------------------------------

    def _framing_error(self, message: str) -> None:
        if self._current is not None:
            message += "; the part in progress was not stored"
        self.refuse(400, "bad_request", message)

    def _start(self, headers: dict[str, str]) -> None:
        self.close()
        media = headers.get("content-type", DICOM_MEDIA_TYPE).split(";")[0].strip().lower()
        spool = None
        if media == DICOM_MEDIA_TYPE:
            spool = PartSpool(self._sink.spool_dir, self._sender, memory_bytes=self._limits.memory_part_bytes,
                              max_bytes=self._limits.max_part_bytes)
        self._current = _Current(media, spool)

    def _end(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        spool = current.spool
        if spool is None:
            self._fail(None, None, FAILURE_CANNOT_UNDERSTAND,
                       f"part of type {current.media!r}; only {DICOM_MEDIA_TYPE} is accepted")
            return
        try:
            self._settle(spool)
        except Exception:  # whatever happens to one part, it is refused and the others go on
            log.exception("STOW-RS from %s: unexpected error handling a part; refused with 0x%04X",
                          self._sender, FAILURE_PROCESSING)
            self._fail(None, None, FAILURE_PROCESSING, "processing failure")
        finally:
            spool.discard()

    def _settle(self, spool: PartSpool) -> None:
        content = spool.finish()
        if content is None:
            if spool.too_large:
                self._fail(None, None, FAILURE_OUT_OF_RESOURCES,
                           f"the part is larger than {self._limits.max_part_bytes // 2**20} MB "
                           "(router.stow_max_part_mb); not kept")
            elif spool.disk_full:
                log.error("STOW-RS from %s: storage full, part refused with 0xA700", self._sender)
                self._fail(None, None, FAILURE_OUT_OF_RESOURCES, "out of resources: storage full")
            else:
                self._fail(None, None, FAILURE_PROCESSING, "processing failure: the part could not be spooled")
            return
        if isinstance(content, Path):
            self._settle_file(spool, content)
        else:
            self._settle_bytes(content)

    def _settle_bytes(self, data: bytes) -> None:
        try:
            sop_class, sop_instance, transfer_syntax, offset = read_file_meta(data)
            dataset = memoryview(data)[offset:]
            sop_class_in, sop_instance_in, study, series = read_uids(dataset, transfer_syntax)
        except UnreadableHeader as exc:
            self._refuse(data, None, None, FAILURE_CANNOT_UNDERSTAND, exc.reason)
            return
        rebuilt = b"".join((file_meta(sop_class_in, sop_instance_in, transfer_syntax, self._sender), dataset))
        mismatch = self._mismatch(sop_class, sop_instance, sop_class_in, sop_instance_in, study)
        if mismatch:
            self._refuse(rebuilt, sop_class_in, sop_instance_in, FAILURE_DOES_NOT_MATCH, mismatch)
            return
        instance = ReceivedInstance(sop_class_uid=sop_class_in, sop_instance_uid=sop_instance_in,
                                    study_instance_uid=study, series_instance_uid=series,
                                    transfer_syntax_uid=transfer_syntax, calling_ae_title=self._sender,
                                    peer_address=self._peer, data=rebuilt)
        self._store(instance, lambda: self._sink.store(instance))

    def _settle_file(self, spool: PartSpool, path: Path) -> None:
        meta = spool.meta
        if meta is None:
            reason = spool.unreadable.reason if spool.unreadable else "not a DICOM Part 10 file"
            self._refuse(path, None, None, FAILURE_CANNOT_UNDERSTAND, reason)
            return
        try:
            with path.open("rb") as source:
                source.seek(meta.dataset_offset)
                head = source.read(HEADER_READ_BYTES)
                sop_class_in, sop_instance_in, study, series = read_uids(head, meta.transfer_syntax_uid,
                                                                         source=source)
        except UnreadableHeader as exc:
            self._refuse(path, meta.sop_class_uid, meta.sop_instance_uid, FAILURE_CANNOT_UNDERSTAND, exc.reason)
            return
        mismatch = self._mismatch(meta.sop_class_uid, meta.sop_instance_uid, sop_class_in, sop_instance_in, study)
        if mismatch:
            self._refuse(path, sop_class_in, sop_instance_in, FAILURE_DOES_NOT_MATCH, mismatch)
            return
        instance = ReceivedInstance(sop_class_uid=sop_class_in, sop_instance_uid=sop_instance_in,
                                    study_instance_uid=study, series_instance_uid=series,
                                    transfer_syntax_uid=meta.transfer_syntax_uid, calling_ae_title=self._sender,
                                    peer_address=self._peer, data=b"")
        self._store(instance, lambda: self._sink.store_file(instance, path))

    def _mismatch(self, sop_class: str, sop_instance: str, sop_class_in: str, sop_instance_in: str,
                  study: str) -> str | None:
        if (sop_class, sop_instance) != (sop_class_in, sop_instance_in):
            return "the file meta's SOP Class/Instance UIDs differ from the data set's"
        if self._study_uid is not None and study != self._study_uid:
            return "the instance belongs to another study than the request's URL"
        return None

    def _store(self, instance: ReceivedInstance, store: Callable[[], StoreOutcome]) -> None:
        try:
            outcome = store()
        except SinkFullError:
            log.error("STOW-RS from %s: storage full, part refused with 0xA700", self._sender)
            self._fail(instance.sop_class_uid, instance.sop_instance_uid, FAILURE_OUT_OF_RESOURCES,
                       "out of resources: storage full")
            return
        self.result.stored.append((instance.sop_class_uid, instance.sop_instance_uid))
        if outcome is StoreOutcome.DUPLICATE:
            self.result.duplicates += 1

    def _refuse(self, content: bytes | Path, sop_class: str | None, sop_instance: str | None, reason: int,
                message: str) -> None:
        """Refuse a part, quarantining its bytes while the sender's budget lasts."""
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        if self._budget is not None and not self._budget.take(self._sender, size):
            self.result.not_kept += 1
            self._fail(sop_class, sop_instance, reason, f"{message}; not kept (over this sender's quarantine budget)")
            return
        try:
            if isinstance(content, bytes):
                qid = self._sink.quarantine(content, message, self._sender, self._peer)
            else:
                qid = self._sink.quarantine_file(content, message, self._sender, self._peer)
        except SinkFullError:
            log.error("STOW-RS from %s: part refused (%s); quarantine full", self._sender, message)
            self._fail(sop_class, sop_instance, FAILURE_OUT_OF_RESOURCES, message)
            return
        self.result.quarantined += 1
        self._fail(sop_class, sop_instance, reason, f"{message}; quarantined as {qid}")

    def _fail(self, sop_class: str | None, sop_instance: str | None, reason: int, message: str) -> None:
        self.result.failed.append(Failure(sop_class, sop_instance, reason, message))
        if self._logged < LOGGED_REFUSALS:
            self._logged += 1
            log.warning("STOW-RS from %s: part refused with 0x%04X (%s)%s", self._sender, reason, message,
                        "; further refusals of this request are only counted" if self._logged == LOGGED_REFUSALS
                        else "")


def store_instances(body: bytes, content_type: str, sink: SpoolingSink, sender: str, peer: str,
                    study_uid: str | None = None, *, limits: StowLimits | None = None,
                    budget: QuarantineBudget | None = None) -> StowResult:
    """Store every ``application/dicom`` part of a whole STOW-RS request body (see :class:`StowIngest`).

    Raises
    ------
    StowRequestError
        The request as a whole is unreadable (media type, boundary, framing) before any part was handled.
    """
    ingest = StowIngest(content_type, sink, sender, peer, study_uid, limits=limits, budget=budget)
    try:
        ingest.feed([body])
        return ingest.finish()
    finally:
        ingest.close()
