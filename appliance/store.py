"""The appliance's durable state: instances on disk plus one database index of everything.

Implements :class:`dicom_router.ports.InstanceSink` and :class:`dicom_router.ports.Outbox`. Every
hand-off is a transaction, so a crash at any point leaves a state that a restart resumes from. The SQL is
in the repositories of :mod:`appliance.db` (one module per table group); this class decides what goes
into one transaction, and audits it there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread

from appliance import audit_chain
from appliance.audit import AuditEvent, AuditRecord
from appliance.db import instances, jobs, outbox, studies
from appliance.db.engine import Database, SQLiteDatabase, Tx, open_database
from appliance.db.jobs import Job, JobState, ResultFile
from appliance.db.migrations import upgrade
from appliance.db.outbox import OutboxState
from appliance.db.studies import OpenStudy, Run
from appliance.durable import move_durably, remove_stale_temporaries, write_durably
from appliance.file_modes import make_private_dirs
from dicom_router.ports import OutboxItem, ReceivedInstance, SinkFullError, StoreOutcome
from dicom_router.uids import is_valid_uid

__all__ = ["JOBS", "OUTBOX", "RECEIVED", "Job", "JobState", "LeaseLost", "OpenStudy", "OutboxState",
           "ResultFile", "Run", "Store", "worker_name"]

log = logging.getLogger(__name__)

#: a spool file this old belongs to no request any more (a crash mid-request left it)
STALE_SPOOL_SECONDS = 24 * 3600
#: how long a claimed job is a worker's without a heartbeat
LEASE_SECONDS = 60.0
#: wake-up channels (appliance.db.engine.Wakeups): a job to run, an outbox item to send
JOBS = "portico_jobs"
OUTBOX = "portico_outbox"
#: an instance was indexed (this process only: the completeness loop runs beside the receiver)
RECEIVED = "portico_received"


#: tells this process from an earlier one with the same pid (a restarted container's process 1)
_INCARNATION = uuid.uuid4().hex[:8]


def worker_name() -> str:
    """This process as a lease owner: ``host:pid:incarnation``."""
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def _owner_gone(owner: str | None) -> bool:
    """Whether ``owner`` was a process on this host that is no longer running."""
    parts = (owner or "").rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    host, pid, incarnation = parts
    if host != socket.gethostname():
        return False  # another machine's: only its lease's expiry tells
    if int(pid) == os.getpid():
        return incarnation != _INCARNATION
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class LeaseLost(RuntimeError):
    """A worker's job was taken back (its lease ran out); what it made is not recorded, another run is."""


class Store:
    """The database index + file tree under ``data_dir``. Thread-safe.

    ``database``: the :mod:`appliance.db` database to index into (default: SQLite in ``data_dir``); it is
    migrated to the current schema here, after a backup copy when it holds data.
    """

    def __init__(self, data_dir: Path, *, fsync: bool = True, min_free_mb: int = 0,
                 database: Database | str | None = None) -> None:
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
        self.db = database if isinstance(database, Database) else open_database(database, data_dir)
        upgrade(self.db, backup_dir=data_dir / "backups")
        with self.reading() as tx:  # a lost chain head is rebuilt (and said) at every start, not only once
            repair = audit_chain.needs_upgrade(tx)
        if repair:
            with self.transaction() as tx:
                audit_chain.upgrade(tx)

    @classmethod
    def from_settings(cls, settings: Any, *, fsync: bool | None = None, min_free_mb: int = 0) -> Store:
        """The store ``settings`` (:class:`appliance.settings.Settings`) describe."""
        return cls(settings.data_dir, fsync=settings.storage.fsync if fsync is None else fsync,
                   min_free_mb=min_free_mb, database=settings.storage.database)

    @property
    def database_file(self) -> Path | None:
        """The SQLite file, when the database is one."""
        return self.db.path if isinstance(self.db, SQLiteDatabase) else None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        """A write transaction for appliance modules whose repositories join the store's (review, accounts)."""
        with self.db.transaction(durable=durable) as tx:
            yield tx

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        with self.db.reading() as tx:
            yield tx

    # ---- audit -------------------------------------------------------------------------------

    @staticmethod
    def audit_in(tx: Tx, rec: AuditRecord) -> None:
        """Append ``rec`` to the audit chain inside the caller's write transaction (:meth:`transaction`).

        The row, the chain's new head and the row's ATNA queue entry commit together or not at all.
        """
        audit_chain.append(tx, rec)

    _audit = audit_in

    def record(self, rec: AuditRecord) -> None:
        with self.transaction() as tx:
            self._audit(tx, rec)

    def audit_events(self, study_uid: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, oldest first: all of them, or the ``limit`` most recent (of ``study_uid``, if given)."""
        with self.reading() as tx:
            return audit_chain.events(tx, study_uid=study_uid, limit=limit)

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
        held, echoed = instances.known(self.db, instance.sop_instance_uid)
        if held:
            self.record(AuditRecord(AuditEvent.DUPLICATE, instance.study_instance_uid,
                                    detail={"sop_instance_uid": instance.sop_instance_uid}))
            return StoreOutcome.DUPLICATE
        if echoed:
            return self._own_result_echoed(instance)
        return None

    def _instance_path(self, instance: ReceivedInstance) -> Path:
        folder = self.instances_dir / instance.study_instance_uid / instance.series_instance_uid
        return folder / f"{instance.sop_instance_uid}.dcm"

    def _index(self, instance: ReceivedInstance, path: Path, size: int) -> StoreOutcome:
        now = time.time()
        with self.transaction() as tx:
            if not instances.add(tx, instance, path, size, now):
                return StoreOutcome.DUPLICATE
            studies.count_instance(tx, instance.study_instance_uid, instance.calling_ae_title, now)
            tx.notify(RECEIVED, here_only=True)  # the hand-off loop beside the receiver
            self._audit(tx, AuditRecord(AuditEvent.RECEIVED, instance.study_instance_uid,
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
        with self.transaction() as tx:
            studies.count_echo(tx, instance.study_instance_uid)
            self._audit(tx, AuditRecord(AuditEvent.DUPLICATE, instance.study_instance_uid,
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
        with self.reading() as tx:
            indexed = instances.indexed_paths(tx)
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
            # its calling AE title is "recovered": the audit row says where it came from
            if self._index(instance, path, path.stat().st_size) is StoreOutcome.STORED:
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
        with self.transaction() as tx:
            instances.quarantine(tx, qid, path, reason, calling_ae_title, peer_address)
            self._audit(tx, AuditRecord(AuditEvent.QUARANTINED, actor=calling_ae_title,
                                        detail={"quarantine_id": qid, "reason": reason}))
        return qid

    def quarantined(self) -> list[dict[str, Any]]:
        with self.reading() as tx:
            return instances.quarantined(tx)

    # ---- studies and runs --------------------------------------------------------------------

    def open_studies(self) -> list[OpenStudy]:
        with self.reading() as tx:
            return studies.open_studies(tx)

    def set_expected_count(self, study_uid: str, expected: int | None) -> None:
        with self.transaction() as tx:
            studies.set_expected_count(tx, study_uid, expected)

    def hand_off(self, study_uid: str, reason: str) -> Run | None:
        """Close the study's open instances into a new run version; ``None`` if nothing is new.

        Safe from several receivers at once: the study's row is locked, so a study is handed off once.
        """
        with self.transaction() as tx:
            row = studies.locked(tx, study_uid)
            if row is None:
                return None
            if instances.unassigned_count(tx, study_uid) == 0:
                studies.close(tx, study_uid)
                return None
            version = int(row["run_version"]) + 1
            instances.assign_run(tx, study_uid, version)
            run = Run(study_uid, version, reason, int(row["received_count"]), float(row["last_received"]),
                      time.time())
            studies.start_run(tx, run)
            self._audit(tx, AuditRecord(AuditEvent.STUDY_COMPLETE, study_uid,
                                        detail={"run_version": version, "reason": reason,
                                                "instances": run.instance_count}))
        return run

    def unrouted_runs(self) -> list[Run]:
        with self.reading() as tx:
            return studies.unrouted(tx)

    def run(self, study_uid: str, version: int) -> Run | None:
        with self.reading() as tx:
            return studies.run(tx, study_uid, version)

    def series_of(self, study_uid: str, up_to_version: int) -> dict[str, list[Path]]:
        """Instance paths per series of a study, for runs up to ``up_to_version``."""
        with self.reading() as tx:
            return instances.paths_by_series(tx, study_uid, up_to_version)

    def series_members(self, study_uid: str, up_to_version: int) -> dict[str, list[str]]:
        """SOP Instance UIDs per series of a study, for runs up to ``up_to_version``."""
        with self.reading() as tx:
            return instances.members_by_series(tx, study_uid, up_to_version)

    def instance_index(self) -> list[dict[str, Any]]:
        """Every stored instance: study, series, SOP class and path (for cohort selection)."""
        with self.reading() as tx:
            return instances.index(tx)

    def summary(self, recent: int = 10) -> dict[str, Any]:
        """At a glance, for ``portico status`` and ``GET /status``: counts by state and the last jobs."""
        all_jobs = self.jobs()
        return {
            "instances": self.instance_count(),
            "quarantined": len(self.quarantined()),
            "jobs": dict(Counter(str(j.state) for j in all_jobs)),
            "outbox": dict(Counter(str(o["state"]) for o in self.outbox())),
            "destinations": self.destination_status(),
            "recent_jobs": [{"id": j.id, "model": j.model, "state": str(j.state), "provider": j.provider,
                             "error": j.error, "progress": list(j.progress) if j.progress else None}
                            for j in all_jobs[-recent:]],
        }

    def instance_count(self, study_uid: str | None = None) -> int:
        with self.reading() as tx:
            return instances.count(tx, study_uid)

    def record_routes(self, run: Run, routes: list[tuple[str, str, str | None, str, str]], *,
                      no_match: dict[str, Any] | None = None, priorities: dict[str, int] | None = None) -> list[int]:
        """Create one PENDING job per (rule, model, model_version, series_uid, content_key); mark the run routed.

        With no route, the ``no_match`` audit row carries ``no_match`` too: the series considered and
        why no rule matched (value-free reasons, :meth:`dicom_router.rules.RuleSet.explain`).

        A route whose series content (``content_key``) an earlier run of the same rule already covers
        adds no job: a late instance elsewhere in the study does not redo an unchanged series.
        ``priorities`` (by rule) order the queue: higher first, then oldest.
        """
        now = time.time()
        ids: list[int] = []
        with self.transaction() as tx:
            for rule, model, model_version, series_uid, content_key in routes:
                earlier = jobs.covering(tx, run.study_uid, rule, series_uid, content_key, run.version)
                if earlier is not None:
                    self._audit(tx, AuditRecord(AuditEvent.ROUTED, run.study_uid, earlier,
                                                detail={"rule": rule, "run_version": run.version,
                                                        "unchanged_since_job": earlier}))
                    continue
                job_id = jobs.add(tx, run.study_uid, run.version, rule, model, model_version, series_uid,
                                  content_key, now, priority=(priorities or {}).get(rule, 0))
                if job_id is not None:
                    ids.append(job_id)
                    tx.notify(JOBS)
                    self._audit(tx, AuditRecord(AuditEvent.ROUTED, run.study_uid, job_id,
                                                detail={"rule": rule, "model": model, "series_uid": series_uid,
                                                        "run_version": run.version}))
            if not routes:
                self._audit(tx, AuditRecord(AuditEvent.NO_MATCH, run.study_uid,
                                            detail={"run_version": run.version, **(no_match or {})}))
            studies.mark_routed(tx, run)
        return ids

    # ---- jobs --------------------------------------------------------------------------------

    def job_counts(self) -> dict[str, int]:
        """Jobs by state (one aggregate query: for metrics and the overview)."""
        with self.reading() as tx:
            return jobs.count_by_state(tx)

    def next_due(self, channel: str) -> float | None:
        """When the next job (``JOBS``) or outbox item (``OUTBOX``) falls due; ``None``: none waits."""
        with self.reading() as tx:
            return jobs.next_due(tx) if channel == JOBS else outbox.next_due(tx)

    def ping(self) -> None:
        """Raise when the database does not answer (readiness)."""
        self.db.query("SELECT 1")

    def job(self, job_id: int) -> Job | None:
        with self.reading() as tx:
            return jobs.get(tx, job_id)

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        with self.reading() as tx:
            return jobs.listed(tx, study_uid)

    def claim_job(self, owner: str | None = None, lease_seconds: float = LEASE_SECONDS) -> Job | None:
        """Take the oldest due PENDING job and mark it RUNNING under ``owner``'s lease (default: this process)."""
        with self.transaction() as tx:
            job = jobs.claim(tx, owner or worker_name(), lease_seconds, time.time())
            if job is not None:
                self._audit(tx, AuditRecord(AuditEvent.JOB_STATE, job.study_uid, job.id,
                                            detail={"state": JobState.RUNNING, "attempt": job.attempts}))
        return job

    def renew_lease(self, job_id: int, owner: str | None = None, lease_seconds: float = LEASE_SECONDS) -> bool:
        """The worker's heartbeat; ``False`` when the job was taken back (the worker should give it up)."""
        with self.transaction() as tx:
            return jobs.renew(tx, job_id, owner or worker_name(), lease_seconds, time.time())

    def set_progress(self, job_id: int, done: int, total: int) -> None:
        with self.transaction() as tx:
            jobs.set_progress(tx, job_id, done, total)

    def resume_interrupted(self) -> int:
        """Put RUNNING jobs whose worker is gone back in the queue; returns how many.

        A worker is gone when its lease ran out, or (without waiting for that) when it was a process on
        this host that no longer runs (a restart after a crash takes its own jobs back at once). Jobs of
        live workers on this or another machine stay theirs.
        """
        now = time.time()
        with self.transaction() as tx:
            taken = [r for r in jobs.running(tx) if r["lease_expires"] is None
                     or float(r["lease_expires"]) < now or _owner_gone(r["lease_owner"])]
            for r in taken:
                tx.notify(JOBS)
                jobs.requeue(tx, int(r["id"]), now)
                self._audit(tx, AuditRecord(AuditEvent.JOB_STATE, r["study_uid"], int(r["id"]),
                                            detail={"state": JobState.PENDING, "reason": "worker gone",
                                                    "worker": r["lease_owner"]}))
        return len(taken)

    def complete_job(self, job: Job, results: list[ResultFile], destinations: list[str], provider: str,
                     package_hash: str, timings: dict[str, float],
                     destinations_for: dict[str, list[str]] | None = None,
                     hold: Callable[[Tx], None] | None = None) -> None:
        """Record the results and queue them for every destination, atomically.

        ``destinations_for`` maps a result's SOP Instance UID to the destinations that get it
        instead of ``destinations`` (e.g. Secondary Capture images only where asked for). With
        ``hold``, the results are held for review: their outbox rows wait as ``HELD``, and ``hold``
        records the hold in the same transaction (:mod:`appliance.review`).
        """
        now = time.time()
        queued = OutboxState.HELD if hold is not None else OutboxState.PENDING
        with self.transaction() as tx:
            self._still_held(tx, job)
            for res in results:
                jobs.save_result(tx, job.id, res)
                for dest in (destinations_for or {}).get(res.sop_instance_uid, destinations):
                    outbox.add(tx, job.id, dest, res.sop_instance_uid, res.sop_class_uid, res.path, queued, now)
            jobs.finish(tx, job.id, provider, package_hash, timings, now)
            if queued is OutboxState.PENDING and results:
                tx.notify(OUTBOX)
            self._audit(tx, AuditRecord(AuditEvent.INFERRED, job.study_uid, job.id,
                                        detail={"model": job.model, "package_hash": package_hash,
                                                "provider": provider,
                                                "results": [r.sop_instance_uid for r in results]}))
            self._audit(tx, AuditRecord(AuditEvent.JOB_STATE, job.study_uid, job.id,
                                        detail={"state": JobState.DONE}))
            if hold is not None:
                hold(tx)

    def fail_job(self, job: Job, error: str, code: str, retry_in: float | None) -> None:
        """FAILED for good, or back to PENDING after ``retry_in`` seconds."""
        state = JobState.PENDING if retry_in is not None else JobState.FAILED
        now = time.time()
        with self.transaction() as tx:
            self._still_held(tx, job)
            jobs.fail(tx, job.id, state, f"{code}: {error}", now + (retry_in or 0), now)
            self._audit(tx, AuditRecord(AuditEvent.JOB_STATE, job.study_uid, job.id,
                                        detail={"state": state, "code": code, "error": error}))

    @staticmethod
    def _still_held(tx: Tx, job: Job) -> None:
        """Raise :class:`LeaseLost` when ``job`` is no longer RUNNING under the lease it was claimed with."""
        if job.lease_owner is None:  # a job not claimed through a lease (tests, tools): nothing to check
            return
        current = jobs.get(tx, job.id)
        if current is None or current.state is not JobState.RUNNING or current.lease_owner != job.lease_owner:
            raise LeaseLost(f"job {job.id} was taken back from this worker (its lease ran out)")

    def results(self, job_id: int | None = None) -> list[ResultFile]:
        with self.reading() as tx:
            return jobs.results(tx, job_id)

    # ---- Outbox ------------------------------------------------------------------------------

    def due(self, limit: int) -> list[OutboxItem]:
        with self.reading() as tx:
            return outbox.due(tx, limit, time.time())

    def mark_sent(self, item_id: int) -> None:
        with self.transaction() as tx:
            row = outbox.with_study(tx, item_id)
            outbox.mark_sent(tx, item_id, time.time())
            if row is not None:
                self._audit(tx, AuditRecord(AuditEvent.DISPATCHED, row["study_uid"], row["job_id"],
                                            detail={"destination": row["destination"],
                                                    "sop_instance_uid": row["sop_instance_uid"]}))

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None:
        with self.transaction() as tx:
            row = outbox.with_study(tx, item_id)
            outbox.mark_failed(tx, item_id, error, time.time() + retry_in_seconds, permanent)
            if row is not None:
                self._audit(tx, AuditRecord(AuditEvent.DISPATCH_FAILED, row["study_uid"], row["job_id"],
                                            detail={"destination": row["destination"], "error": error,
                                                    "permanent": permanent, "retry_in": retry_in_seconds}))

    def outbox(self, job_id: int | None = None) -> list[dict[str, Any]]:
        with self.reading() as tx:
            return outbox.listed(tx, job_id)

    def destination_status(self) -> dict[str, dict[str, Any]]:
        """Per destination: outbox counts by state, the last error and when it is next tried."""
        with self.reading() as tx:
            return outbox.destination_status(tx)


def _sweep_stale(spool: Path) -> None:
    """Remove spool files no request can still own (left by a crash mid-request)."""
    cutoff = time.time() - STALE_SPOOL_SECONDS
    for entry in spool.iterdir():
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:  # another process swept it first, or it is not ours to remove
            continue
