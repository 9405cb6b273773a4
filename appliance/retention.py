"""Retention: what the data folder keeps, for how long, and the purge that removes the rest.

A study is *finished* when nothing is left to do for it: no instance waiting to be handed off, every
run routed, no job ``PENDING`` (which includes a failed job waiting for its retry) or ``RUNNING``,
no outbox item ``PENDING``, ``HELD`` or ``FAILED`` (a result that never arrived stays until someone
resends or cancels it), and no review ``HELD``. Its clock starts at its last activity: the last
instance received, run handed off, job finished, result delivered or review decided.

Then, per :class:`~appliance.settings.RetentionSettings`:

- ``instances_days`` after that, its received instances go: files and ``instances`` rows. The study
  row stays, its counts reset, so a study sent again is counted afresh, and its jobs, results and
  outbox rows stay: a series sent again unchanged does not run (and is not sent) a second time.
- ``results_days`` after that, its result files go (SEG, SR, SC and their compressed copies: the
  job folders), with their ``results`` and ``outbox`` rows.
- Once neither instances nor results are left, the study's remaining rows (study, runs, jobs,
  reviews) go too: the appliance forgets it; the audit trail keeps what happened.

Each study purged is one ``purged`` audit row (counts and bytes, never a path). Every study is
decided and purged inside one write transaction that checks again that it is finished, so work that
arrives meanwhile (a new instance, a retry) is never purged from under it; files are removed before
the rows, so a crash in between leaves rows the next pass completes, never files a restart would
re-index as new.

Federated learning: while ``fl.enabled``, a study in a cohort index (``<data>/fl/portico/cohorts``)
is kept whole, whatever its age: a job reads the paths the index lists, and an approved SEG is a
label only while it and its series are on disk. A study leaves the cohort when the cohort is rebuilt
(every start, ``portico fl cohort refresh``) without it, e.g. by a narrower rule or ``max_series``.

Quarantine: files older than ``quarantine_days`` go, and beyond ``quarantine_max_mb`` the oldest go
first; one ``purged`` audit row per pass lists the quarantine ids.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit import AuditEvent, AuditRecord
from appliance.db.engine import Tx
from appliance.handoff import short
from appliance.review import ReviewState
from appliance.settings import RetentionSettings, Settings
from appliance.store import JobState, OutboxState, Store

log = logging.getLogger(__name__)

DAY = 86400.0
#: outbox states of a result not yet delivered (nor cancelled in review)
UNDELIVERED = (OutboxState.PENDING, OutboxState.HELD, OutboxState.FAILED)
UNFINISHED_JOBS = (JobState.PENDING, JobState.RUNNING)
#: ``protected()`` answering this keeps every study (a cohort index could not be read)
EVERY_STUDY = frozenset({"*"})


@dataclass(frozen=True)
class StudyPurge:
    """What a pass removed (or, dry, would remove) of one study."""

    study_uid: str
    #: seconds since the study was finished, at the pass
    age: float
    instances: int = 0
    result_files: int = 0
    bytes: int = 0
    #: the study's remaining index rows were removed too
    forgotten: bool = False


@dataclass(frozen=True)
class Kept:
    """A study old enough to purge that was kept, and why."""

    study_uid: str
    reason: str


@dataclass(frozen=True)
class PurgeReport:
    """One pass: studies purged, studies kept back, quarantined files removed."""

    dry_run: bool
    studies: tuple[StudyPurge, ...] = ()
    kept: tuple[Kept, ...] = ()
    quarantine_ids: tuple[str, ...] = ()
    quarantine_bytes: int = 0
    #: quarantine ids by why they went: ``age`` or ``quota``
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies) + self.quarantine_bytes


class Retention:
    """Purges the store's studies and quarantine per ``settings``.

    Parameters
    ----------
    store
        The appliance store (its transaction API; its tables).
    settings
        ``storage.retention``.
    clock
        Seconds since the epoch, as ``time.time``; tests pass their own.
    protected
        Study UIDs to keep whatever their age (federated-learning cohorts); :data:`EVERY_STUDY`
        keeps them all.
    actor
        Recorded in the audit rows.
    """

    def __init__(self, store: Store, settings: RetentionSettings, *, clock: Callable[[], float] = time.time,
                 protected: Callable[[], frozenset[str]] | None = None, actor: str = "retention") -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.protected: Callable[[], frozenset[str]] = protected or (lambda: frozenset())
        self.actor = actor

    # ---- a pass ----------------------------------------------------------------------------------

    def purge(self, *, dry_run: bool = False) -> PurgeReport:
        """One pass over every study and the quarantine; ``dry_run`` only reports."""
        now = self.clock()
        protected = self.protected()
        studies: list[StudyPurge] = []
        kept: list[Kept] = []
        for study_uid in self._candidates(now):
            with self.store.transaction() as db:
                outcome = self._study(db, study_uid, now, protected, dry_run)
            if isinstance(outcome, StudyPurge):
                studies.append(outcome)
            elif isinstance(outcome, Kept):
                kept.append(outcome)
        report = self._quarantine(now, dry_run, studies, kept)
        if not dry_run and (report.studies or report.quarantine_ids):
            log.info("purge: %d studies and %d quarantined files, %.1f MB freed; %d studies kept back",
                     len(report.studies), len(report.quarantine_ids), report.bytes / 2**20, len(report.kept))
        return report

    def _stage_days(self) -> list[int]:
        return [d for d in (self.settings.instances_days, self.settings.results_days) if d > 0]

    def _candidates(self, now: float) -> list[str]:
        """Studies that hold something old enough to go, by a first, cheap look (each is checked again)."""
        if not self._stage_days():
            return []
        with self.store.reading() as tx:
            last = {r["study_uid"]: float(r["last_received"])
                    for r in tx.execute("SELECT study_uid, last_received FROM studies")}
            for sql in ("SELECT study_uid, MAX(updated) AS t FROM jobs GROUP BY study_uid",
                        "SELECT study_uid, MAX(created) AS t FROM runs GROUP BY study_uid"):
                for r in tx.execute(sql):
                    if r["study_uid"] in last and r["t"] is not None:
                        last[r["study_uid"]] = max(last[r["study_uid"]], float(r["t"]))
            # studies already purged of what is due stay out: an hourly pass does not revisit them all
            with_instances = {r[0] for r in tx.execute("SELECT DISTINCT study_uid FROM instances")}
            with_results = {r[0] for r in tx.execute(
                "SELECT DISTINCT j.study_uid FROM results r JOIN jobs j ON j.id = r.job_id")}
        holding = ((self.settings.instances_days, with_instances), (self.settings.results_days, with_results))
        return sorted(uid for uid, t in last.items()
                      if any(_due(days, now - t) and uid in held for days, held in holding))

    # ---- one study -------------------------------------------------------------------------------

    def _study(self, db: Tx, study_uid: str, now: float, protected: frozenset[str],
               dry_run: bool) -> StudyPurge | Kept | None:
        study = db.execute("SELECT open, last_received FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        if study is None:
            return None
        job_ids = [int(r["id"]) for r in db.execute("SELECT id FROM jobs WHERE study_uid = ?", (study_uid,))]
        reason = _unfinished(db, study_uid, bool(study["open"]), job_ids)
        if reason is None and (study_uid in protected or protected == EVERY_STUDY):
            reason = "in a federated-learning cohort" if study_uid in protected else "cohort index unreadable"
        if reason is not None:
            return Kept(study_uid, reason)
        age = now - _finished_at(db, study_uid, float(study["last_received"]), job_ids)
        instances = db.execute("SELECT path, size FROM instances WHERE study_uid = ?", (study_uid,)).fetchall()
        results = _in(db, "SELECT path FROM results WHERE job_id IN ({})", job_ids)
        purge_instances = _due(self.settings.instances_days, age) and bool(instances)
        purge_results = _due(self.settings.results_days, age) and bool(results)
        if not purge_instances and not purge_results:
            return None
        instance_count = result_files = size = 0
        if purge_instances:
            instance_count = len(instances)
            size += sum(int(r["size"]) for r in instances)
        if purge_results:
            files = self._result_files(job_ids, [Path(r["path"]) for r in results])
            result_files = len(files)
            size += sum(_size(f) for f in files)
        forgotten = (purge_instances or not instances) and (purge_results or not results)
        outcome = StudyPurge(study_uid, age, instance_count, result_files, size, forgotten)
        if dry_run:
            return outcome
        # files first, rows after: a crash in between leaves rows the next pass completes
        if purge_instances:
            self._remove_instances(db, study_uid, [Path(r["path"]) for r in instances])
        if purge_results:
            self._remove_results(db, job_ids, [Path(r["path"]) for r in results])
        if forgotten:
            _in(db, "DELETE FROM reviews WHERE job_id IN ({})", job_ids)
            for table in ("jobs", "runs", "studies"):
                db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))
        Store.audit_in(db, AuditRecord(AuditEvent.PURGED, study_uid, actor=self.actor, detail={
            "instances": instance_count, "result_files": result_files, "bytes": size, "forgotten": forgotten,
            "days_since_finished": round(age / DAY, 2)}))
        log.info("purged study %s: %d instance(s), %d result file(s), %.1f MB%s", short(study_uid),
                 instance_count, result_files, size / 2**20, "; forgotten" if forgotten else "")
        return outcome

    def _remove_instances(self, db: Tx, study_uid: str, paths: list[Path]) -> None:
        for path in paths:
            self._unlink(path)
        for folder in sorted({p.parent for p in paths}, reverse=True):
            _rmdir_if_empty(folder)
        _rmdir_if_empty(self.store.instances_dir / study_uid)
        db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,))
        # counted afresh if the study is sent again; its jobs stay, so an unchanged series does not run twice
        db.execute("UPDATE studies SET received_count = 0, expected_count = NULL WHERE study_uid = ?",
                   (study_uid,))

    def _result_files(self, job_ids: list[int], paths: list[Path]) -> list[Path]:
        """Every file of the jobs' folders (compressed copies included) and any result file elsewhere."""
        files = {p for p in paths if p.is_file()}
        for job_id in job_ids:
            folder = self.store.results_dir / f"job-{job_id}"
            if folder.is_dir():
                files.update(p for p in folder.rglob("*") if p.is_file())
        return sorted(files)

    def _remove_results(self, db: Tx, job_ids: list[int], paths: list[Path]) -> None:
        for path in paths:
            self._unlink(path)
        for job_id in job_ids:
            folder = self.store.results_dir / f"job-{job_id}"
            if folder.is_dir():
                shutil.rmtree(folder)
        _in(db, "DELETE FROM results WHERE job_id IN ({})", job_ids)
        _in(db, "DELETE FROM outbox WHERE job_id IN ({})", job_ids)

    def _unlink(self, path: Path) -> None:
        # only ever a file under the data folder, whatever a row says
        if not path.resolve().is_relative_to(self.store.data_dir.resolve()):
            log.warning("not removing %s: outside the data folder", path.name)
            return
        path.unlink(missing_ok=True)

    # ---- quarantine ------------------------------------------------------------------------------

    def _quarantine(self, now: float, dry_run: bool, studies: list[StudyPurge], kept: list[Kept]) -> PurgeReport:
        days, quota = self.settings.quarantine_days, self.settings.quarantine_max_mb * 2**20
        chosen: dict[str, tuple[str, int]] = {}  # id -> (reason, size)
        with self.store.transaction() as db:
            rows = db.execute("SELECT id, ts, path FROM quarantine ORDER BY ts DESC").fetchall()
            total = 0
            for r in rows:  # newest first: the oldest are over the quota first
                size = _size(Path(r["path"]))
                if days > 0 and now - float(r["ts"]) >= days * DAY:
                    chosen[r["id"]] = ("age", size)
                    continue
                total += size
                if quota and total > quota:
                    chosen[r["id"]] = ("quota", size)
            if chosen and not dry_run:
                for r in rows:
                    if r["id"] in chosen:
                        self._unlink(Path(r["path"]))
                _in(db, "DELETE FROM quarantine WHERE id IN ({})", list(chosen))
                reasons = _count(reason for reason, _ in chosen.values())
                Store.audit_in(db, AuditRecord(AuditEvent.PURGED, actor=self.actor, detail={
                    "quarantine": len(chosen), "bytes": sum(s for _, s in chosen.values()), "reasons": reasons,
                    "quarantine_ids": sorted(chosen)}))
        return PurgeReport(dry_run, tuple(studies), tuple(kept), tuple(sorted(chosen)),
                           sum(s for _, s in chosen.values()), _count(reason for reason, _ in chosen.values()))


def _due(days: int, age: float) -> bool:
    return days > 0 and age >= days * DAY


def _in(db: Tx, sql: str, values: list[Any]) -> list[Any]:
    """``sql`` with its ``IN ({})`` filled for ``values``, in chunks (SQLite's variable limit)."""
    rows: list[Any] = []
    for start in range(0, len(values), 500):
        chunk = values[start:start + 500]
        cur = db.execute(sql.format(",".join("?" * len(chunk))), chunk)
        if sql.lstrip().upper().startswith("SELECT"):
            rows.extend(cur.fetchall())
    return rows


def _unfinished(db: Tx, study_uid: str, is_open: bool, job_ids: list[int]) -> str | None:
    """Why the study is not finished, or ``None``."""
    if is_open or db.execute("SELECT 1 FROM instances WHERE study_uid = ? AND run_version IS NULL LIMIT 1",
                             (study_uid,)).fetchone():
        return "instances still arriving"
    if db.execute("SELECT 1 FROM runs WHERE study_uid = ? AND routed = 0 LIMIT 1", (study_uid,)).fetchone():
        return "not routed yet"
    if db.execute(f"SELECT 1 FROM jobs WHERE study_uid = ? AND state IN ({','.join('?' * len(UNFINISHED_JOBS))})"
                  " LIMIT 1", (study_uid, *UNFINISHED_JOBS)).fetchone():
        return "a job is pending, running or waiting for its retry"
    states = ",".join("?" * len(UNDELIVERED))
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        if db.execute(f"SELECT 1 FROM reviews WHERE state = ? AND job_id IN ({marks}) LIMIT 1",
                      (ReviewState.HELD, *chunk)).fetchone():
            return "results held for review"
        if db.execute(f"SELECT 1 FROM outbox WHERE state IN ({states}) AND job_id IN ({marks}) LIMIT 1",
                      (*UNDELIVERED, *chunk)).fetchone():
            return "a result is not delivered yet"
    return None


def _finished_at(db: Tx, study_uid: str, last_received: float, job_ids: list[int]) -> float:
    """The study's last activity: instance received, run, job finished, result sent, review decided."""
    times = [last_received]
    times += [r[0] for r in db.execute("SELECT MAX(created) FROM runs WHERE study_uid = ?", (study_uid,))]
    times += [r[0] for r in db.execute("SELECT MAX(updated) FROM jobs WHERE study_uid = ?", (study_uid,))]
    times += [r[0] for r in _in(db, "SELECT MAX(sent_at) FROM outbox WHERE job_id IN ({})", job_ids)]
    times += [r[0] for r in _in(db, "SELECT MAX(decided_at) FROM reviews WHERE job_id IN ({})", job_ids)]
    return max(float(t) for t in times if t is not None)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (an instance arriving), or gone
        folder.rmdir()


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out


def fl_cohort_studies(settings: Settings) -> Callable[[], frozenset[str]]:
    """What :class:`Retention` must keep for federated learning: the studies in the cohort index files.

    Nothing while ``fl.enabled`` is false; :data:`EVERY_STUDY` when an index cannot be read.
    """
    from fl_client.layout import SiteLayout, read_json

    def studies() -> frozenset[str]:
        if not settings.fl.enabled:
            return frozenset()
        cohorts = SiteLayout(settings.data_dir / settings.fl.workspace).cohorts
        found: set[str] = set()
        for index in sorted(cohorts.glob("*.json")) if cohorts.is_dir() else ():
            data = read_json(index)
            if not isinstance(data, dict) or not isinstance(data.get("series"), list):
                log.warning("cohort index %s unreadable: no study is purged this time", index.name)
                return EVERY_STUDY
            found.update(str(s.get("study_uid")) for s in data["series"] if isinstance(s, dict))
        return frozenset(found)
    return studies
