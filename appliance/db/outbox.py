"""The ``outbox`` table: each result for each destination, until it is sent (exactly once) or given up."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.db.engine import Tx
from dicom_router.ports import OutboxItem


class OutboxState(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"
    #: waiting for a reviewer (appliance.review): never due until approved
    HELD = "HELD"
    #: rejected in review: never sent
    CANCELLED = "CANCELLED"


def add(tx: Tx, job_id: int, destination: str, sop_instance_uid: str, sop_class_uid: str, path: Path,
        state: OutboxState, now: float) -> bool:
    """Queue one object for one destination; ``False`` when it is queued there already."""
    cur = tx.execute("INSERT INTO outbox (job_id, destination, sop_instance_uid, sop_class_uid, path, state, created) "
                     "VALUES (?,?,?,?,?,?,?) ON CONFLICT (destination, sop_instance_uid) DO NOTHING",
                     (job_id, destination, sop_instance_uid, sop_class_uid, str(path), state, now))
    return cur.rowcount > 0


#: leaves out the items of destinations an operator paused (:mod:`appliance.db.destinations`)
_NOT_PAUSED = "destination NOT IN (SELECT destination FROM destination_pauses)"


def due(tx: Tx, limit: int, now: float) -> list[OutboxItem]:
    """PENDING items whose time has come, oldest first; none for a paused destination."""
    rows = tx.execute(f"SELECT * FROM outbox WHERE state = ? AND next_attempt_at <= ? AND {_NOT_PAUSED} "
                      "ORDER BY id LIMIT ?", (OutboxState.PENDING, now, limit))
    return [OutboxItem(r["id"], r["destination"], Path(r["path"]), r["sop_class_uid"], r["sop_instance_uid"],
                       r["attempts"]) for r in rows]


def with_study(tx: Tx, item_id: int) -> Any:
    """The item and its job's study UID (``None`` for an unknown item)."""
    return tx.one("SELECT o.*, j.study_uid FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE o.id = ?", (item_id,))


def mark_sent(tx: Tx, item_id: int, now: float) -> None:
    tx.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, sent_at = ?, last_error = NULL WHERE id = ?",
               (OutboxState.SENT, now, item_id))


def mark_failed(tx: Tx, item_id: int, error: str, next_attempt_at: float, permanent: bool) -> None:
    tx.execute("UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
               (OutboxState.FAILED if permanent else OutboxState.PENDING, next_attempt_at, error, item_id))


def listed(tx: Tx, job_id: int | None = None) -> list[dict[str, Any]]:
    rows = tx.execute("SELECT * FROM outbox WHERE job_id = ? ORDER BY id", (job_id,)) if job_id is not None \
        else tx.execute("SELECT * FROM outbox ORDER BY id")
    return [dict(r) for r in rows]


def states_of_job(tx: Tx, job_id: int) -> list[str]:
    return [str(r["state"]) for r in tx.execute("SELECT state FROM outbox WHERE job_id = ?", (job_id,))]


def move(tx: Tx, job_id: int, from_state: OutboxState, to_state: OutboxState) -> int:
    """Every item of ``job_id`` in ``from_state`` to ``to_state``; returns how many moved."""
    return tx.execute("UPDATE outbox SET state = ? WHERE job_id = ? AND state = ?",
                      (to_state, job_id, from_state)).rowcount


def destination_status(tx: Tx) -> dict[str, dict[str, Any]]:
    """Per destination: counts by state, the last error of an unsent item and when one is next tried.

    ``last_error`` is that of the unsent item that failed most recently (``None`` once all went out);
    ``next_retry_at`` is the earliest time a PENDING item that has failed is due again; ``oldest_pending``
    is when the oldest unsent item was queued.
    """
    out: dict[str, dict[str, Any]] = {}
    for r in tx.execute("SELECT destination, state, COUNT(*) AS n, MIN(created) AS oldest FROM outbox "
                        "GROUP BY destination, state ORDER BY destination"):
        entry = out.setdefault(r["destination"], {"states": {}, "last_error": None, "next_retry_at": None,
                                                  "oldest_pending": None})
        entry["states"][r["state"]] = int(r["n"])
        if r["state"] == OutboxState.PENDING:
            entry["oldest_pending"] = float(r["oldest"])
    for r in tx.execute("SELECT o.destination, o.last_error FROM outbox o JOIN (SELECT destination, "
                        "MAX(next_attempt_at) AS at FROM outbox WHERE state IN (?, ?) AND last_error IS NOT NULL "
                        "GROUP BY destination) m ON m.destination = o.destination AND m.at = o.next_attempt_at "
                        "WHERE o.state IN (?, ?) AND o.last_error IS NOT NULL ORDER BY o.id",
                        (OutboxState.PENDING, OutboxState.FAILED, OutboxState.PENDING, OutboxState.FAILED)):
        out[r["destination"]]["last_error"] = r["last_error"]
    for r in tx.execute("SELECT destination, MIN(next_attempt_at) AS at FROM outbox WHERE state = ? AND attempts > 0 "
                        "GROUP BY destination", (OutboxState.PENDING,)):
        out[r["destination"]]["next_retry_at"] = float(r["at"])
    return out


def count(tx: Tx, job_id: int, state: OutboxState) -> int:
    return int(tx.scalar("SELECT COUNT(*) FROM outbox WHERE job_id = ? AND state = ?", (job_id, state)))


def release(tx: Tx, job_id: int) -> int:
    """A held job's items become due now; returns how many."""
    return tx.execute("UPDATE outbox SET state = ?, next_attempt_at = 0 WHERE job_id = ? AND state = ?",
                      (OutboxState.PENDING, job_id, OutboxState.HELD)).rowcount


def cancel(tx: Tx, job_id: int, states: tuple[OutboxState, ...], reason: str) -> int:
    """The job's items in ``states`` are never sent; returns how many."""
    marks = ",".join("?" * len(states))
    return tx.execute(f"UPDATE outbox SET state = ?, last_error = ? WHERE job_id = ? AND state IN ({marks})",
                      (OutboxState.CANCELLED, reason, job_id, *states)).rowcount


def sent_items(tx: Tx, job_id: int, *, except_class: str = "") -> list[Any]:
    """Destination, SOP Instance UID and path of the job's items that were sent (not of ``except_class``)."""
    return tx.all("SELECT destination, sop_instance_uid, path FROM outbox WHERE job_id = ? AND state = ? "
                  "AND sop_class_uid != ? ORDER BY destination, sop_instance_uid",
                  (job_id, OutboxState.SENT, except_class))


def of_study(tx: Tx, study_uid: str) -> list[dict[str, Any]]:
    """Every outbox row of the study's jobs (no file paths), by job and destination."""
    return [dict(r) for r in tx.execute(
        "SELECT o.id, o.job_id, o.destination, o.sop_instance_uid, o.sop_class_uid, o.state, o.attempts, "
        "o.next_attempt_at, o.last_error, o.created, o.sent_at FROM outbox o JOIN jobs j ON j.id = o.job_id "
        "WHERE j.study_uid = ? ORDER BY o.job_id, o.destination, o.id", (study_uid,))]


#: what a resend takes back into the queue: sent, given up on, or waiting for a later retry
RESENDABLE = (OutboxState.SENT, OutboxState.FAILED, OutboxState.PENDING)


def resend(tx: Tx, study_uid: str, destination: str | None, reviews_allowing: tuple[str, ...]) -> dict[str, int]:
    """The study's sent, failed or waiting items (for ``destination``, or every one) due again now, tried afresh.

    Only items of jobs without a review row, or whose review state is in ``reviews_allowing`` (a rejected or
    withdrawn job's results are never sent again); held and cancelled items never move. Returns the items
    queued per destination.
    """
    marks, allow = ",".join("?" * len(RESENDABLE)), ",".join("?" * len(reviews_allowing)) or "NULL"
    where = (f"state IN ({marks}) AND job_id IN (SELECT j.id FROM jobs j LEFT JOIN reviews v ON v.job_id = j.id "
             f"WHERE j.study_uid = ? AND (v.job_id IS NULL OR v.state IN ({allow})))")
    params: list[Any] = [*RESENDABLE, study_uid, *reviews_allowing]
    if destination is not None:
        where += " AND destination = ?"
        params.append(destination)
    counts = {str(r["destination"]): int(r["n"]) for r in tx.execute(
        f"SELECT destination, COUNT(*) AS n FROM outbox WHERE {where} GROUP BY destination ORDER BY destination",
        params)}
    tx.execute(f"UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = 0, last_error = NULL WHERE {where}",
               [OutboxState.PENDING, *params])
    return counts


def depth_by_destination(tx: Tx) -> dict[str, dict[str, Any]]:
    """Per destination: unsent items (pending and held) and when the oldest pending one was queued."""
    out: dict[str, dict[str, Any]] = {}
    for r in tx.execute("SELECT destination, state, COUNT(*) AS n, MIN(created) AS oldest FROM outbox "
                        "WHERE state IN (?, ?, ?) GROUP BY destination, state",
                        (OutboxState.PENDING, OutboxState.HELD, OutboxState.FAILED)):
        entry = out.setdefault(str(r["destination"]), {"pending": 0, "held": 0, "failed": 0, "oldest_pending": None})
        entry[str(r["state"]).lower()] = int(r["n"])
        if r["state"] == OutboxState.PENDING:
            entry["oldest_pending"] = float(r["oldest"])
    return out


def next_due(tx: Tx) -> float | None:
    """When the next PENDING item is due (``None``: nothing waits to be sent, or only for paused destinations)."""
    at = tx.scalar(f"SELECT MIN(next_attempt_at) FROM outbox WHERE state = ? AND {_NOT_PAUSED}",
                   (OutboxState.PENDING,))
    return None if at is None else float(at)


def last_sent(tx: Tx) -> dict[str, float]:
    """Per destination: when an item was last sent to it (a resent item keeps its earlier time until sent again)."""
    return {str(r["destination"]): float(r["at"]) for r in tx.execute(
        "SELECT destination, MAX(sent_at) AS at FROM outbox WHERE sent_at IS NOT NULL GROUP BY destination")}


def of_destination(tx: Tx, destination: str, state: OutboxState | None, limit: int, offset: int
                   ) -> tuple[int, list[dict[str, Any]]]:
    """A page of ``destination``'s outbox rows (in ``state``, or any), newest first, with their study; and the total.

    No file paths: UIDs, states, attempts, times and the value-free last error.
    """
    where, params = "o.destination = ?", [destination]
    if state is not None:
        where += " AND o.state = ?"
        params.append(state)
    total = int(tx.scalar(f"SELECT COUNT(*) FROM outbox o WHERE {where}", params))
    rows = tx.execute(
        "SELECT o.id, o.job_id, j.study_uid, o.sop_instance_uid, o.sop_class_uid, o.state, o.attempts, "
        "o.next_attempt_at, o.last_error, o.created, o.sent_at FROM outbox o JOIN jobs j ON j.id = o.job_id "
        f"WHERE {where} ORDER BY o.id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
    return total, [dict(r) for r in rows]
