"""The ``jobs`` and ``results`` tables: one model run on one series, and the objects it made.

A job is claimed with a lease (``lease_owner``, ``lease_expires``) that its worker's heartbeat renews; a job
whose lease ran out while RUNNING is back in the queue (:func:`requeue_expired`), so a worker that died
mid-job loses it to another. The claim skips rows another transaction holds (PostgreSQL ``SKIP LOCKED``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.db.engine import Tx


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


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
    #: slices inferred so far, of how many (``None`` before inference reports)
    progress: tuple[int, int] | None = None
    lease_owner: str | None = None


@dataclass(frozen=True)
class ResultFile:
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    path: Path
    detail: dict[str, Any]


def _job(r: Any) -> Job:
    done, total = r["progress_done"], r["progress_total"]
    return Job(r["id"], r["study_uid"], r["run_version"], r["rule"], r["model"], r["model_version"],
               r["series_uid"], r["content_key"], JobState(r["state"]), r["attempts"], r["error"], r["provider"],
               json.loads(r["timings"]) if r["timings"] else {}, r["updated"],
               None if total is None else (int(done or 0), int(total)), r["lease_owner"])


def get(tx: Tx, job_id: int) -> Job | None:
    row = tx.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    return None if row is None else _job(row)


def listed(tx: Tx, study_uid: str | None = None) -> list[Job]:
    rows = tx.execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id", (study_uid,)) if study_uid \
        else tx.execute("SELECT * FROM jobs ORDER BY id")
    return [_job(r) for r in rows]


def covering(tx: Tx, study_uid: str, rule: str, series_uid: str, content_key: str, before_version: int) -> int | None:
    """An earlier run's job of ``rule`` over the same series content, if any."""
    row = tx.one("SELECT id FROM jobs WHERE study_uid = ? AND rule = ? AND series_uid = ? AND content_key = ? "
                 "AND run_version < ? ORDER BY id LIMIT 1", (study_uid, rule, series_uid, content_key, before_version))
    return None if row is None else int(row["id"])


def add(tx: Tx, study_uid: str, run_version: int, rule: str, model: str, model_version: str | None,
        series_uid: str, content_key: str, now: float, *, priority: int = 0) -> int | None:
    """A PENDING job; ``None`` when the run already has one for ``rule``."""
    return tx.insert("INSERT INTO jobs (study_uid, run_version, rule, model, model_version, series_uid, content_key, "
                     "state, created, updated, priority) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                     "ON CONFLICT (study_uid, run_version, rule) DO NOTHING",
                     (study_uid, run_version, rule, model, model_version, series_uid, content_key, JobState.PENDING,
                      now, now, priority))


def claim(tx: Tx, owner: str, lease_seconds: float, now: float) -> Job | None:
    """The due PENDING job of the highest priority (the oldest of those), now RUNNING under ``owner``'s lease."""
    row = tx.one(f"SELECT id FROM jobs WHERE state = ? AND next_attempt_at <= ? ORDER BY priority DESC, id LIMIT 1"
                 f"{tx.skip_locked}", (JobState.PENDING, now))
    if row is None:
        return None
    tx.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ?, lease_owner = ?, lease_expires = ?, "
               "progress_done = NULL, progress_total = NULL WHERE id = ?",
               (JobState.RUNNING, now, owner, now + lease_seconds, row["id"]))
    return get(tx, int(row["id"]))


def renew(tx: Tx, job_id: int, owner: str, lease_seconds: float, now: float) -> bool:
    """Extend ``owner``'s lease; ``False`` when the job is no longer its own (lost to a reaper)."""
    cur = tx.execute("UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = ? AND lease_owner = ?",
                     (now + lease_seconds, job_id, JobState.RUNNING, owner))
    return cur.rowcount > 0


def set_progress(tx: Tx, job_id: int, done: int, total: int) -> None:
    tx.execute("UPDATE jobs SET progress_done = ?, progress_total = ? WHERE id = ? AND state = ?",
               (done, total, job_id, JobState.RUNNING))


def running(tx: Tx) -> list[Any]:
    """Every RUNNING job's id, study, owner and lease expiry."""
    return tx.all("SELECT id, study_uid, lease_owner, lease_expires FROM jobs WHERE state = ?", (JobState.RUNNING,))


def requeue(tx: Tx, job_id: int, now: float) -> None:
    tx.execute("UPDATE jobs SET state = ?, updated = ?, lease_owner = NULL, lease_expires = NULL WHERE id = ? "
               "AND state = ?", (JobState.PENDING, now, job_id, JobState.RUNNING))


def finish(tx: Tx, job_id: int, provider: str, package_hash: str, timings: dict[str, float], now: float) -> None:
    tx.execute("UPDATE jobs SET state = ?, error = NULL, provider = ?, package_hash = ?, timings = ?, updated = ?, "
               "lease_owner = NULL, lease_expires = NULL WHERE id = ?",
               (JobState.DONE, provider, package_hash, json.dumps(timings), now, job_id))


def fail(tx: Tx, job_id: int, state: JobState, error: str, next_attempt_at: float, now: float) -> None:
    tx.execute("UPDATE jobs SET state = ?, error = ?, next_attempt_at = ?, updated = ?, lease_owner = NULL, "
               "lease_expires = NULL WHERE id = ?", (state, error, next_attempt_at, now, job_id))


def reset_for_rerun(tx: Tx, job_id: int, now: float) -> None:
    """Back to PENDING with a fresh attempt count (an operator's retry or re-run)."""
    tx.execute("UPDATE jobs SET state = ?, attempts = 0, error = NULL, next_attempt_at = 0, updated = ?, "
               "lease_owner = NULL, lease_expires = NULL, progress_done = NULL, progress_total = NULL WHERE id = ?",
               (JobState.PENDING, now, job_id))


def save_result(tx: Tx, job_id: int, res: ResultFile) -> None:
    tx.execute("INSERT INTO results (sop_instance_uid, job_id, kind, sop_class_uid, path, detail) VALUES (?,?,?,?,?,?) "
               "ON CONFLICT (sop_instance_uid) DO UPDATE SET job_id = excluded.job_id, kind = excluded.kind, "
               "sop_class_uid = excluded.sop_class_uid, path = excluded.path, detail = excluded.detail",
               (res.sop_instance_uid, job_id, res.kind, res.sop_class_uid, str(res.path), json.dumps(res.detail)))


def results(tx: Tx, job_id: int | None = None) -> list[ResultFile]:
    rows = tx.execute("SELECT * FROM results WHERE job_id = ? ORDER BY sop_instance_uid", (job_id,)) \
        if job_id is not None else tx.execute("SELECT * FROM results ORDER BY job_id, sop_instance_uid")
    return [ResultFile(r["sop_instance_uid"], r["kind"], r["sop_class_uid"], Path(r["path"]),
                       json.loads(r["detail"] or "{}")) for r in rows]


def next_due(tx: Tx) -> float | None:
    """When the next PENDING job is due (``None``: none is waiting)."""
    at = tx.scalar("SELECT MIN(next_attempt_at) FROM jobs WHERE state = ?", (JobState.PENDING,))
    return None if at is None else float(at)


def count_by_state(tx: Tx) -> dict[str, int]:
    """How many jobs are in each state."""
    return {str(r["state"]): int(r["n"]) for r in tx.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}


def models_used(tx: Tx) -> list[str]:
    """Every model name a job was made for (for the study list's filter)."""
    return [str(r[0]) for r in tx.all("SELECT DISTINCT model FROM jobs ORDER BY model")]


def of_studies(tx: Tx, study_uids: list[str]) -> list[Any]:
    """Id, study, model and state of every job of ``study_uids`` (a page of the study list), by id."""
    if not study_uids:
        return []
    marks = ",".join("?" * len(study_uids))
    return tx.all(f"SELECT id, study_uid, model, model_version, state FROM jobs WHERE study_uid IN ({marks}) "
                  "ORDER BY id", study_uids)


def created_at(tx: Tx, job_ids: list[int]) -> dict[int, float]:
    """When each of ``job_ids`` was made (routed)."""
    if not job_ids:
        return {}
    marks = ",".join("?" * len(job_ids))
    return {int(r["id"]): float(r["created"]) for r in tx.execute(
        f"SELECT id, created FROM jobs WHERE id IN ({marks})", job_ids)}
