"""A small :class:`~dicom_router.ports.SpoolingSink` for tests: files in a folder, an index in memory."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dicom_router.ports import ReceivedInstance, SinkFullError, StoreOutcome


@dataclass
class Quarantined:
    qid: str
    reason: str
    calling_ae_title: str
    peer_address: str
    size: int


@dataclass
class FolderSink:
    """Writes each instance to ``root/<SOP Instance UID>.dcm``; ``full=True`` simulates a full disk."""

    root: Path
    fsync: bool = False
    full: bool = False
    instances: dict[str, ReceivedInstance] = field(default_factory=dict)
    quarantined: list[Quarantined] = field(default_factory=list)
    duplicates: int = 0
    #: instances handed over as spool files (store_file) rather than bytes
    files_taken: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        if self.full:
            raise SinkFullError("no space left (simulated)")
        with self._lock:
            if instance.sop_instance_uid in self.instances:
                self.duplicates += 1
                return StoreOutcome.DUPLICATE
            path = self.root / f"{instance.sop_instance_uid}.dcm"
            tmp = path.with_suffix(".part")
            with tmp.open("wb") as f:
                f.write(instance.data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            tmp.replace(path)
            self.instances[instance.sop_instance_uid] = instance
            return StoreOutcome.STORED

    def quarantine(self, data: bytes, reason: str, calling_ae_title: str, peer_address: str) -> str:
        if self.full:
            raise SinkFullError("no space left (simulated)")
        with self._lock:
            qid = f"q{len(self.quarantined) + 1}"
            (self.root / f"{qid}.quarantine").write_bytes(data)
            self.quarantined.append(Quarantined(qid, reason, calling_ae_title, peer_address, len(data)))
            return qid

    @property
    def spool_dir(self) -> Path:
        folder = self.root / "spool"
        folder.mkdir(exist_ok=True)
        return folder

    def store_file(self, instance: ReceivedInstance, path: Path) -> StoreOutcome:
        if self.full:
            raise SinkFullError("no space left (simulated)")
        with self._lock:
            if instance.sop_instance_uid in self.instances:
                self.duplicates += 1
                return StoreOutcome.DUPLICATE
            path.replace(self.root / f"{instance.sop_instance_uid}.dcm")
            self.instances[instance.sop_instance_uid] = instance
            self.files_taken += 1
            return StoreOutcome.STORED

    def quarantine_file(self, path: Path, reason: str, calling_ae_title: str, peer_address: str) -> str:
        if self.full:
            raise SinkFullError("no space left (simulated)")
        with self._lock:
            qid = f"q{len(self.quarantined) + 1}"
            size = path.stat().st_size
            path.replace(self.root / f"{qid}.quarantine")
            self.quarantined.append(Quarantined(qid, reason, calling_ae_title, peer_address, size))
            return qid
