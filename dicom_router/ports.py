"""What the router needs from outside, as protocols the appliance implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as it came off the wire, with the few header fields the store indexes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    peer_address: str
    #: a complete DICOM Part 10 file: preamble, file meta and dataset exactly as received
    data: bytes


class SinkFullError(Exception):
    """The sink has no room (disk full); the SCP answers 0xA700."""


class InstanceSink(Protocol):
    """Durable storage of received instances.

    ``store`` returns only once the bytes are on disk (fsync'd) and indexed; a second instance with a
    SOP Instance UID already held returns ``DUPLICATE`` and changes nothing.
    """

    def store(self, instance: ReceivedInstance) -> StoreOutcome: ...

    def quarantine(self, data: bytes, reason: str, calling_ae_title: str, peer_address: str) -> str:
        """Keep bytes that could not be accepted; returns a quarantine id."""
        ...


class SpoolingSink(InstanceSink, Protocol):
    """An instance sink that also takes instances already written to a file in its spool folder.

    STOW-RS parts can be hundreds of MB: they are written to ``spool_dir`` as they arrive (a folder
    on the sink's own file system, so that taking one over is a rename, not a copy) and handed over
    as a complete Part 10 file. The C-STORE SCP does not use this; its instances stay in memory.
    """

    @property
    def spool_dir(self) -> Path:
        """Where callers write files for :meth:`store_file` and :meth:`quarantine_file`."""
        ...

    def store_file(self, instance: ReceivedInstance, path: Path) -> StoreOutcome:
        """Like :meth:`InstanceSink.store` for an instance whose Part 10 bytes are the file at ``path``.

        ``instance.data`` is empty. On ``STORED`` the file has been moved into the sink (the caller
        must not touch ``path`` again); on ``DUPLICATE`` or an exception it is left where it is, for
        the caller to remove.
        """
        ...

    def quarantine_file(self, path: Path, reason: str, calling_ae_title: str, peer_address: str) -> str:
        """Like :meth:`InstanceSink.quarantine` for the file at ``path``, which is moved into the quarantine.

        On an exception the file is left where it is.
        """
        ...


@dataclass(frozen=True)
class OutboxItem:
    id: int
    destination: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int


class Outbox(Protocol):
    """Durable queue of objects to send; the dispatcher drains it."""

    def due(self, limit: int) -> list[OutboxItem]: ...

    def mark_sent(self, item_id: int) -> None: ...

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None: ...


class AssociationOutcome(StrEnum):
    """What became of a connection to the DICOM listener."""

    #: negotiated: the association runs
    ACCEPTED = "accepted"
    #: admitted by the edge, then rejected by pynetdicom's negotiation (e.g. no usable context)
    REJECTED = "rejected"
    #: refused by the edge before negotiation (:class:`dicom_router.edge.Refusal` names the reason)
    REFUSED = "refused"


#: told of each connection's fate at the listener, with a value-free reason code (``""`` when accepted);
#: called on the listener's threads, so it must be quick and must not raise (the appliance counts them)
AssociationObserver = Callable[[AssociationOutcome, str], None]
