"""The appliance's durable state: instances on disk plus one SQLite (WAL) index of everything.

Implements :class:`dicom_router.ports.InstanceSink` and :class:`dicom_router.ports.Outbox`. Every
hand-off is a transaction, so a crash at any point leaves a state that a restart resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread

from appliance import audit_chain
from appliance.audit import AuditEvent, AuditRecord
from appliance.durable import move_durably, remove_stale_temporaries, write_durably
from appliance.file_modes import create_private, make_private_dirs
from appliance.store_schema import SCHEMA
from dicom_router.ports import OutboxItem, ReceivedInstance, SinkFullError, StoreOutcome
from dicom_router.uids import is_valid_uid

log = logging.getLogger(__name__)

#: a spool file this old belongs to no request any more (a crash mid-request left it)
STALE_SPOOL_SECONDS = 24 * 3600



class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class OutboxState(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"
    #: waiting for a reviewer (appliance.review): never due until approved
    HELD = "HELD"
    #: rejected in review: never sent
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class OpenStudy:
    study_uid: str
    calling_ae: str
    last_received: float
    received_count: int
    expected_count: int | None


@dataclass(frozen=True)
class Run:
    study_uid: str
    version: int
    reason: str
    instance_count: int
    last_received: float
    created: float


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    run_version: int
    rule: str
    model: str
    model_version: str | None
    series_uid: str
    content_key: str
    state: JobState
    attempts: int
    error: str | None
    provider: str | None
    timings: dict[str, float]
    updated: float


@dataclass(frozen=True)
class ResultFile:
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    path: Path
    detail: dict[str, Any]


class Store:
    """SQLite index + file tree under ``data_dir``. Thread-safe; one connection guarded by a lock."""

    def __init__(self, data_dir: Path, *, fsync: bool = True, min_free_mb: int = 0) -> None:
        self.data_dir = data_dir
        self.instances_dir = data_dir / "instances"
        self.results_dir = data_dir / "results"
        self.quarantine_dir = data_dir / "quarantine"
        #: STOW-RS parts on their way in (SpoolingSink); inside the data folder, so taking one over is a rename
        self.spool_dir = data_dir / "spool"
        for folder in (self.instances_dir, self.results_dir, self.quarantine_dir, self.spool_dir):
            make_private_dirs(folder)
        _sweep_stale(self.spool_dir)
        self.fsync = fsync
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._lock = threading.RLock()
        # owner-only before SQLite opens it: its -wal and -shm files take the database file's mode
        create_private(data_dir / "portico.sqlite3")
        self._db = sqlite3.connect(data_dir / "portico.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a killed process but may be lost with power; the instance file itself
        # is fsync'd before the index row, and reindex() restores rows for files the index lost, so the
        # acknowledged file is the truth and one fsync per instance is saved
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        if audit_chain.needs_upgrade(self._db):  # a database from before the audit chain is chained once, here
            with self._tx() as db:
                audit_chain.upgrade(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params))

    # for appliance modules that keep their own tables in this database (appliance.review)
    transaction = _tx
    query = _query

    # ---- audit -------------------------------------------------------------------------------

    @staticmethod
    def audit_in(db: sqlite3.Connection, rec: AuditRecord) -> None:
        """Append ``rec`` to the audit chain inside the caller's write transaction (:meth:`transaction`).

        The row, the chain's new head and the row's ATNA queue entry commit together or not at all.
        """
        audit_chain.append(db, rec)

    _audit = audit_in

    def record(self, rec: AuditRecord) -> None:
        with self._tx() as db:
            self._audit(db, rec)

    def audit_events(self, study_uid: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, oldest first: all of them, or the ``limit`` most recent (of ``study_uid``, if given)."""
        where, params = ("WHERE study_uid = ?", (study_uid,)) if study_uid else ("", ())
        sql = f"SELECT * FROM audit {where} ORDER BY id"
        if limit is not None:  # the newest rows, without reading the whole (append-only, growing) table
            sql = f"SELECT * FROM (SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?) ORDER BY id"
            params = (*params, limit)
        return [{"ts": r["ts"], "event": r["event"], "study_uid": r["study_uid"], "job_id": r["job_id"],
                 "actor": r["actor"], "detail": json.loads(r["detail"])} for r in self._query(sql, params)]

    # ---- InstanceSink ------------------------------------------------------------------------

    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        known = self._already_held(instance)
        if known is not None:
            return known
        path = self._instance_path(instance)
        self._write_durably(path, instance.data)
        return self._index(instance, path, len(instance.data))

    def store_file(self, instance: ReceivedInstance, path: Path) -> StoreOutcome:
        """:meth:`store` for a Part 10 file in :attr:`spool_dir` (``SpoolingSink``): moved in, not copied.

        On ``STORED`` the file is gone from the spool; otherwise the caller removes what is left.
        """
        known = self._already_held(instance)
        if known is not None:
            return known
        if self.min_free_bytes:  # the bytes are on the disk already: only the margin is checked
            st = os.statvfs(self.data_dir)
            if st.f_bavail * st.f_frsize < self.min_free_bytes:
                raise SinkFullError("not enough free space in the data folder")
        target = self._instance_path(instance)
        move_durably(path, target, fsync=self.fsync)
        return self._index(instance, target, target.stat().st_size)

    def _already_held(self, instance: ReceivedInstance) -> StoreOutcome | None:
        """``DUPLICATE`` for an instance already held (or one of our own results echoed back), else ``None``."""
        # the same check as the header reader's: a UID it accepts is never refused here
        for uid in (instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid):
            if not is_valid_uid(uid):
                raise ValueError("invalid UID in dataset")
        if self._query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (instance.sop_instance_uid,)):
            self.record(AuditRecord(AuditEvent.DUPLICATE, instance.study_instance_uid,
                                    detail={"sop_instance_uid": instance.sop_instance_uid}))
            return StoreOutcome.DUPLICATE
        if self._query("SELECT 1 FROM results WHERE sop_instance_uid = ?", (instance.sop_instance_uid,)):
            return self._own_result_echoed(instance)
        return None

    def _instance_path(self, instance: ReceivedInstance) -> Path:
        folder = self.instances_dir / instance.study_instance_uid / instance.series_instance_uid
        return folder / f"{instance.sop_instance_uid}.dcm"

    def _index(self, instance: ReceivedInstance, path: Path, size: int) -> StoreOutcome:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, "
                "transfer_syntax, path, size, received_at) VALUES (?,?,?,?,?,?,?,?)",
                (instance.sop_instance_uid, instance.study_instance_uid, instance.series_instance_uid,
                 instance.sop_class_uid, instance.transfer_syntax_uid, str(path), size, now),
            )
            if cur.rowcount == 0:
                return StoreOutcome.DUPLICATE
            db.execute(
                "INSERT INTO studies (study_uid, calling_ae, first_received, last_received, received_count) "
                "VALUES (?,?,?,?,1) ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received,"
                " received_count=received_count+1, open=1",
                (instance.study_instance_uid, instance.calling_ae_title, now, now),
            )
            self._audit(db, AuditRecord(AuditEvent.RECEIVED, instance.study_instance_uid,
                                        actor=instance.calling_ae_title,
                                        detail={"sop_instance_uid": instance.sop_instance_uid,
                                                "series_uid": instance.series_instance_uid,
                                                "sop_class_uid": instance.sop_class_uid}))
        return StoreOutcome.STORED

    def _own_result_echoed(self, instance: ReceivedInstance) -> StoreOutcome:
        """One of our own results came back (a PACS forwarding the whole study): never an input.

        It is not indexed and does not reopen the study, so it can never start a run (no loops); it is
        counted, because the PACS counts it in NumberOfStudyRelatedInstances.
        """
        with self._tx() as db:
            db.execute("UPDATE studies SET received_count = received_count + 1 WHERE study_uid = ?",
                       (instance.study_instance_uid,))
            self._audit(db, AuditRecord(AuditEvent.DUPLICATE, instance.study_instance_uid,
                                        actor=instance.calling_ae_title,
                                        detail={"sop_instance_uid": instance.sop_instance_uid, "own_result": True}))
        return StoreOutcome.DUPLICATE

    def _write_durably(self, path: Path, data: bytes) -> None:
        write_durably(path, data, fsync=self.fsync, room_in=self.data_dir if self.min_free_bytes else None,
                      min_free_bytes=self.min_free_bytes)

    def reindex(self) -> int:
        """Index every instance file that is on disk but not in the index (after a power loss).

        Returns the number of instances recovered; each is audited as received by ``recovered``.
        Temporary files that an interrupted write left in the instance and result folders are removed
        first, and counted in the log.
        """
        leftovers = sum(remove_stale_temporaries(folder) for folder in (self.instances_dir, self.results_dir))
        if leftovers:
            log.warning("removed %d temporary file(s) left by an interrupted write", leftovers)
        indexed = {r["path"] for r in self._query("SELECT path FROM instances")}
        recovered = 0
        for path in sorted(self.instances_dir.glob("*/*/*.dcm")):
            if str(path) in indexed:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                instance = ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                            str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                                            "recovered", "", b"")
            except Exception:  # a file we cannot read is left where it is, and said so
                log.warning("unreadable instance file left out of the index: %s", path.name)
                continue
            now = time.time()
            with self._tx() as db:
                db.execute(
                    "INSERT OR IGNORE INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, "
                    "transfer_syntax, path, size, received_at) VALUES (?,?,?,?,?,?,?,?)",
                    (instance.sop_instance_uid, instance.study_instance_uid, instance.series_instance_uid,
                     instance.sop_class_uid, instance.transfer_syntax_uid, str(path), path.stat().st_size, now))
                db.execute(
                    "INSERT INTO studies (study_uid, calling_ae, first_received, last_received, received_count) "
                    "VALUES (?,?,?,?,1) ON CONFLICT(study_uid) DO UPDATE SET "
                    "last_received=excluded.last_received, received_count=received_count+1, open=1",
                    (instance.study_instance_uid, instance.calling_ae_title, now, now))
                self._audit(db, AuditRecord(AuditEvent.RECEIVED, instance.study_instance_uid, actor="recovered",
                                            detail={"sop_instance_uid": instance.sop_instance_uid,
                                                    "series_uid": instance.series_instance_uid}))
            recovered += 1
        return recovered

    def quarantine(self, data: bytes, reason: str, calling_ae_title: str, peer_address: str) -> str:
        qid = uuid.uuid4().hex
        path = self.quarantine_dir / f"{qid}.dcm"
        self._write_durably(path, data)
        return self._quarantined(qid, path, reason, calling_ae_title, peer_address)

    def quarantine_file(self, path: Path, reason: str, calling_ae_title: str, peer_address: str) -> str:
        """:meth:`quarantine` for a file in :attr:`spool_dir` (``SpoolingSink``): moved, not copied."""
        qid = uuid.uuid4().hex
        target = self.quarantine_dir / f"{qid}.dcm"
        move_durably(path, target, fsync=self.fsync)
        return self._quarantined(qid, target, reason, calling_ae_title, peer_address)

    def _quarantined(self, qid: str, path: Path, reason: str, calling_ae_title: str, peer_address: str) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO quarantine (id, ts, reason, calling_ae, peer, path) VALUES (?,?,?,?,?,?)",
                       (qid, time.time(), reason, calling_ae_title, peer_address, str(path)))
            self._audit(db, AuditRecord(AuditEvent.QUARANTINED, actor=calling_ae_title,
                                        detail={"quarantine_id": qid, "reason": reason}))
        return qid

    def quarantined(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM quarantine ORDER BY ts")]

    # ---- studies and runs --------------------------------------------------------------------

    def open_studies(self) -> list[OpenStudy]:
        rows = self._query("SELECT study_uid, calling_ae, last_received, received_count, expected_count "
                           "FROM studies WHERE open = 1")
        return [OpenStudy(r["study_uid"], r["calling_ae"], r["last_received"], r["received_count"],
                          r["expected_count"]) for r in rows]

    def set_expected_count(self, study_uid: str, expected: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE studies SET expected_count = ? WHERE study_uid = ?", (expected, study_uid))

    def hand_off(self, study_uid: str, reason: str) -> Run | None:
        """Close the study's open instances into a new run version; ``None`` if nothing is new."""
        with self._tx() as db:
            row = db.execute("SELECT run_version, last_received, received_count FROM studies "
                             "WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                return None
            fresh = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid = ? AND run_version IS NULL",
                               (study_uid,)).fetchone()[0]
            if fresh == 0:
                db.execute("UPDATE studies SET open = 0 WHERE study_uid = ?", (study_uid,))
                return None
            version = int(row["run_version"]) + 1
            db.execute("UPDATE instances SET run_version = ? WHERE study_uid = ? AND run_version IS NULL",
                       (version, study_uid))
            # the PACS's count is asked afresh for the next run: it may hold more by then
            db.execute("UPDATE studies SET run_version = ?, open = 0, expected_count = NULL WHERE study_uid = ?",
                       (version, study_uid))
            run = Run(study_uid, version, reason, int(row["received_count"]), float(row["last_received"]),
                      time.time())
            db.execute("INSERT INTO runs (study_uid, version, created, reason, instance_count, last_received) "
                       "VALUES (?,?,?,?,?,?)", (study_uid, version, run.created, reason, run.instance_count,
                                                run.last_received))
            self._audit(db, AuditRecord(AuditEvent.STUDY_COMPLETE, study_uid,
                                        detail={"run_version": version, "reason": reason,
                                                "instances": run.instance_count}))
        return run

    def unrouted_runs(self) -> list[Run]:
        return [self._run(r) for r in self._query("SELECT * FROM runs WHERE routed = 0 ORDER BY created")]

    @staticmethod
    def _run(r: sqlite3.Row) -> Run:
        return Run(r["study_uid"], r["version"], r["reason"], r["instance_count"], r["last_received"], r["created"])

    def run(self, study_uid: str, version: int) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE study_uid = ? AND version = ?", (study_uid, version))
        return self._run(rows[0]) if rows else None

    def series_of(self, study_uid: str, up_to_version: int) -> dict[str, list[Path]]:
        """Instance paths per series of a study, for runs up to ``up_to_version``."""
        rows = self._query("SELECT series_uid, path FROM instances WHERE study_uid = ? AND run_version <= ? "
                           "ORDER BY series_uid, path", (study_uid, up_to_version))
        out: dict[str, list[Path]] = {}
        for r in rows:
            out.setdefault(r["series_uid"], []).append(Path(r["path"]))
        return out

    def series_members(self, study_uid: str, up_to_version: int) -> dict[str, list[str]]:
        """SOP Instance UIDs per series of a study, for runs up to ``up_to_version``."""
        rows = self._query("SELECT series_uid, sop_instance_uid FROM instances WHERE study_uid = ? "
                           "AND run_version <= ? ORDER BY sop_instance_uid", (study_uid, up_to_version))
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r["series_uid"], []).append(r["sop_instance_uid"])
        return out

    def instance_index(self) -> list[dict[str, Any]]:
        """Every stored instance: study, series, SOP class and path (for cohort selection)."""
        return [dict(r) for r in self._query("SELECT study_uid, series_uid, sop_class_uid, path FROM instances "
                                             "ORDER BY study_uid, series_uid, path")]

    def summary(self, recent: int = 10) -> dict[str, Any]:
        """At a glance, for ``portico status`` and ``GET /status``: counts by state and the last jobs."""
        jobs = self.jobs()
        return {
            "instances": self.instance_count(),
            "quarantined": len(self.quarantined()),
            "jobs": dict(Counter(str(j.state) for j in jobs)),
            "outbox": dict(Counter(str(o["state"]) for o in self.outbox())),
            "destinations": self.destination_status(),
            "recent_jobs": [{"id": j.id, "model": j.model, "state": str(j.state), "provider": j.provider,
                             "error": j.error} for j in jobs[-recent:]],
        }

    def instance_count(self, study_uid: str | None = None) -> int:
        if study_uid is None:
            return int(self._query("SELECT COUNT(*) FROM instances")[0][0])
        return int(self._query("SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study_uid,))[0][0])

    def record_routes(self, run: Run, routes: list[tuple[str, str, str | None, str, str]], *,
                      no_match: dict[str, Any] | None = None) -> list[int]:
        """Create one PENDING job per (rule, model, model_version, series_uid, content_key); mark the run routed.

        With no route, the ``no_match`` audit row carries ``no_match`` too: the series considered and
        why no rule matched (value-free reasons, :meth:`dicom_router.rules.RuleSet.explain`).

        A route whose series content (``content_key``) an earlier run of the same rule already covers
        adds no job: a late instance elsewhere in the study does not redo an unchanged series.
        """
        now = time.time()
        ids: list[int] = []
        with self._tx() as db:
            for rule, model, model_version, series_uid, content_key in routes:
                earlier = db.execute("SELECT id FROM jobs WHERE study_uid = ? AND rule = ? AND series_uid = ? AND "
                                     "content_key = ? AND run_version < ?",
                                     (run.study_uid, rule, series_uid, content_key, run.version)).fetchone()
                if earlier is not None:
                    self._audit(db, AuditRecord(AuditEvent.ROUTED, run.study_uid, int(earlier["id"]),
                                                detail={"rule": rule, "run_version": run.version,
                                                        "unchanged_since_job": int(earlier["id"])}))
                    continue
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (study_uid, run_version, rule, model, model_version, series_uid,"
                    " content_key, state, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (run.study_uid, run.version, rule, model, model_version, series_uid, content_key,
                     JobState.PENDING, now, now))
                if cur.lastrowid and cur.rowcount:
                    ids.append(int(cur.lastrowid))
                    self._audit(db, AuditRecord(AuditEvent.ROUTED, run.study_uid, int(cur.lastrowid),
                                                detail={"rule": rule, "model": model, "series_uid": series_uid,
                                                        "run_version": run.version}))
            if not routes:
                self._audit(db, AuditRecord(AuditEvent.NO_MATCH, run.study_uid,
                                            detail={"run_version": run.version, **(no_match or {})}))
            db.execute("UPDATE runs SET routed = 1 WHERE study_uid = ? AND version = ?",
                       (run.study_uid, run.version))
        return ids

    # ---- jobs --------------------------------------------------------------------------------

    def _job(self, r: sqlite3.Row) -> Job:
        return Job(r["id"], r["study_uid"], r["run_version"], r["rule"], r["model"], r["model_version"],
                   r["series_uid"], r["content_key"], JobState(r["state"]), r["attempts"], r["error"], r["provider"],
                   json.loads(r["timings"]) if r["timings"] else {}, r["updated"])

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        rows = self._query("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,)) if study_uid \
            else self._query("SELECT * FROM jobs ORDER BY id")
        return [self._job(r) for r in rows]

    def claim_job(self) -> Job | None:
        """Take the oldest due PENDING job and mark it RUNNING."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE state = ? AND next_attempt_at <= ? ORDER BY id LIMIT 1",
                             (JobState.PENDING, time.time())).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ?",
                       (JobState.RUNNING, time.time(), row["id"]))
            self._audit(db, AuditRecord(AuditEvent.JOB_STATE, row["study_uid"], row["id"],
                                        detail={"state": JobState.RUNNING, "attempt": row["attempts"] + 1}))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return self._job(row)

    def resume_interrupted(self) -> int:
        """After a crash: every RUNNING job goes back to PENDING."""
        with self._tx() as db:
            rows = db.execute("SELECT id, study_uid FROM jobs WHERE state = ?", (JobState.RUNNING,)).fetchall()
            for r in rows:
                db.execute("UPDATE jobs SET state = ?, updated = ? WHERE id = ?",
                           (JobState.PENDING, time.time(), r["id"]))
                self._audit(db, AuditRecord(AuditEvent.JOB_STATE, r["study_uid"], r["id"],
                                            detail={"state": JobState.PENDING, "reason": "resumed after restart"}))
        return len(rows)

    def complete_job(self, job: Job, results: list[ResultFile], destinations: list[str], provider: str,
                     package_hash: str, timings: dict[str, float],
                     destinations_for: dict[str, list[str]] | None = None,
                     hold: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Record the results and queue them for every destination, atomically.

        ``destinations_for`` maps a result's SOP Instance UID to the destinations that get it
        instead of ``destinations`` (e.g. Secondary Capture images only where asked for). With
        ``hold``, the results are held for review: their outbox rows wait as ``HELD``, and ``hold``
        records the hold in the same transaction (:mod:`appliance.review`).
        """
        now = time.time()
        queued = OutboxState.HELD if hold is not None else OutboxState.PENDING
        with self._tx() as db:
            for res in results:
                db.execute("INSERT OR REPLACE INTO results (sop_instance_uid, job_id, kind, sop_class_uid, path,"
                           " detail) VALUES (?,?,?,?,?,?)", (res.sop_instance_uid, job.id, res.kind,
                                                            res.sop_class_uid, str(res.path),
                                                            json.dumps(res.detail)))
                for dest in (destinations_for or {}).get(res.sop_instance_uid, destinations):
                    db.execute("INSERT OR IGNORE INTO outbox (job_id, destination, sop_instance_uid, "
                               "sop_class_uid, path, state, created) VALUES (?,?,?,?,?,?,?)",
                               (job.id, dest, res.sop_instance_uid, res.sop_class_uid, str(res.path),
                                queued, now))
            db.execute("UPDATE jobs SET state = ?, error = NULL, provider = ?, package_hash = ?, timings = ?, "
                       "updated = ? WHERE id = ?", (JobState.DONE, provider, package_hash, json.dumps(timings),
                                                   now, job.id))
            self._audit(db, AuditRecord(AuditEvent.INFERRED, job.study_uid, job.id,
                                        detail={"model": job.model, "package_hash": package_hash,
                                                "provider": provider,
                                                "results": [r.sop_instance_uid for r in results]}))
            self._audit(db, AuditRecord(AuditEvent.JOB_STATE, job.study_uid, job.id,
                                        detail={"state": JobState.DONE}))
            if hold is not None:
                hold(db)

    def fail_job(self, job: Job, error: str, code: str, retry_in: float | None) -> None:
        """FAILED for good, or back to PENDING after ``retry_in`` seconds."""
        state = JobState.PENDING if retry_in is not None else JobState.FAILED
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, error = ?, next_attempt_at = ?, updated = ? WHERE id = ?",
                       (state, f"{code}: {error}", time.time() + (retry_in or 0), time.time(), job.id))
            self._audit(db, AuditRecord(AuditEvent.JOB_STATE, job.study_uid, job.id,
                                        detail={"state": state, "code": code, "error": error}))

    def results(self, job_id: int | None = None) -> list[ResultFile]:
        rows = self._query("SELECT * FROM results WHERE job_id = ?", (job_id,)) if job_id is not None \
            else self._query("SELECT * FROM results")
        return [ResultFile(r["sop_instance_uid"], r["kind"], r["sop_class_uid"], Path(r["path"]),
                           json.loads(r["detail"] or "{}")) for r in rows]

    # ---- Outbox ------------------------------------------------------------------------------

    def due(self, limit: int) -> list[OutboxItem]:
        rows = self._query("SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                           (OutboxState.PENDING, time.time(), limit))
        return [OutboxItem(r["id"], r["destination"], Path(r["path"]), r["sop_class_uid"],
                           r["sop_instance_uid"], r["attempts"]) for r in rows]

    def mark_sent(self, item_id: int) -> None:
        with self._tx() as db:
            row = db.execute("SELECT o.*, j.study_uid FROM outbox o JOIN jobs j ON j.id = o.job_id "
                             "WHERE o.id = ?", (item_id,)).fetchone()
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, sent_at = ?, last_error = NULL "
                       "WHERE id = ?", (OutboxState.SENT, time.time(), item_id))
            if row is not None:
                self._audit(db, AuditRecord(AuditEvent.DISPATCHED, row["study_uid"], row["job_id"],
                                            detail={"destination": row["destination"],
                                                    "sop_instance_uid": row["sop_instance_uid"]}))

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None:
        with self._tx() as db:
            row = db.execute("SELECT o.*, j.study_uid FROM outbox o JOIN jobs j ON j.id = o.job_id "
                             "WHERE o.id = ?", (item_id,)).fetchone()
            db.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                       " WHERE id = ?", (OutboxState.FAILED if permanent else OutboxState.PENDING,
                                         time.time() + retry_in_seconds, error, item_id))
            if row is not None:
                self._audit(db, AuditRecord(AuditEvent.DISPATCH_FAILED, row["study_uid"], row["job_id"],
                                            detail={"destination": row["destination"], "error": error,
                                                    "permanent": permanent, "retry_in": retry_in_seconds}))

    def outbox(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM outbox ORDER BY id")]

    def destination_status(self) -> dict[str, dict[str, Any]]:
        """Per destination: outbox counts by state, the last error and when it is next tried.

        ``last_error`` is that of the unsent item that failed most recently (``None`` once all went
        out); ``next_retry_at`` is the earliest time a PENDING item that has failed is due again.
        """
        out: dict[str, dict[str, Any]] = {}
        for r in self._query("SELECT destination, state, COUNT(*) AS n FROM outbox GROUP BY destination, state "
                             "ORDER BY destination"):
            entry = out.setdefault(r["destination"], {"states": {}, "last_error": None, "next_retry_at": None})
            entry["states"][r["state"]] = int(r["n"])
        for r in self._query("SELECT destination, last_error, MAX(next_attempt_at) AS at FROM outbox "
                             "WHERE state IN (?, ?) AND last_error IS NOT NULL GROUP BY destination",
                             (OutboxState.PENDING, OutboxState.FAILED)):
            out[r["destination"]]["last_error"] = r["last_error"]
        for r in self._query("SELECT destination, MIN(next_attempt_at) AS at FROM outbox "
                             "WHERE state = ? AND attempts > 0 GROUP BY destination", (OutboxState.PENDING,)):
            out[r["destination"]]["next_retry_at"] = float(r["at"])
        return out


def _sweep_stale(spool: Path) -> None:
    """Remove spool files no request can still own (left by a crash mid-request)."""
    cutoff = time.time() - STALE_SPOOL_SECONDS
    for entry in spool.iterdir():
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:  # another process swept it first, or it is not ours to remove
            continue
