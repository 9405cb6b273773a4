"""The ``reviews`` table: a finished job's review state, reviewer, reason and when it was decided."""

from __future__ import annotations

from typing import Any

from appliance.db.engine import Tx


def hold(tx: Tx, job_id: int, state: str, now: float) -> bool:
    """Record that ``job_id``'s results are held; ``False`` when a review row exists already."""
    return tx.execute("INSERT INTO reviews (job_id, state, held, created) VALUES (?,?,1,?) "
                      "ON CONFLICT (job_id) DO NOTHING", (job_id, state, now)).rowcount > 0


def start_retrospective(tx: Tx, job_id: int, state: str, now: float) -> None:
    tx.execute("INSERT INTO reviews (job_id, state, held, created) VALUES (?,?,0,?)", (job_id, state, now))


def get(tx: Tx, job_id: int) -> Any:
    return tx.one("SELECT * FROM reviews WHERE job_id = ?", (job_id,))


def decide(tx: Tx, job_id: int, state: str, now: float, reviewer: str, reason: str, via: str) -> None:
    tx.execute("UPDATE reviews SET state = ?, decided_at = ?, reviewer = ?, reason = ?, via = ? WHERE job_id = ?",
               (state, now, reviewer, reason, via, job_id))


def set_state(tx: Tx, job_id: int, state: str) -> None:
    tx.execute("UPDATE reviews SET state = ? WHERE job_id = ?", (state, job_id))


def of_finished_jobs(tx: Tx, done_state: str) -> list[Any]:
    """Every finished (``done_state``) or reviewed job: its id, and its review row's columns (NULL if none)."""
    return tx.all("SELECT j.id, v.* FROM jobs j LEFT JOIN reviews v ON v.job_id = j.id "
                  "WHERE j.state = ? OR v.job_id IS NOT NULL ORDER BY j.id", (done_state,))


def approved_segs(tx: Tx, approved_state: str) -> list[Any]:
    """Study, series, job id and path of every SEG whose job's review is ``approved_state``, by job id."""
    return tx.all("SELECT j.study_uid, j.series_uid, j.id, r.path FROM results r JOIN jobs j ON j.id = r.job_id "
                  "JOIN reviews v ON v.job_id = j.id WHERE r.kind = 'seg' AND v.state = ? ORDER BY j.id",
                  (approved_state,))
