"""The ATNA queue: one ``atna_outbox`` row per audit row, written in the audit row's own transaction.

:func:`appliance.audit_chain.append` queues the row (``pending``) when :func:`set_enabled` said so;
:mod:`appliance.atna_sender` drains the queue. A message written to a TCP or TLS connection is
``written`` until the connection has stayed up for a while after it (or closed cleanly), then ``sent``;
when the connection fails first, or the appliance restarts, its ``written`` rows are ``pending`` again:
delivery is at least once. The queue is bounded by ``audit.syslog.queue_max``: past it, the oldest
pending rows are ``dropped`` and one ``atna_dropped`` audit row counts them.
"""

from __future__ import annotations

import json
import logging
import time
from enum import StrEnum
from typing import Any

from appliance import audit_chain
from appliance.atna_message import AuditRow
from appliance.audit import AuditEvent, AuditRecord
from appliance.store import Store

log = logging.getLogger(__name__)

#: after an overflow the queue is cut to this share of ``queue_max``, so one alert stands for many drops
DROP_TO = 0.9


class AtnaState(StrEnum):
    PENDING = "pending"
    #: written to a connection, not yet known to be read
    WRITTEN = "written"
    SENT = "sent"
    #: the event has no ATNA mapping (:mod:`appliance.atna_events`)
    SKIPPED = "skipped"
    #: dropped from a full queue (counted in an ``atna_dropped`` audit row)
    DROPPED = "dropped"
    #: its message could not be built (logged)
    FAILED = "failed"


UNSENT = (AtnaState.PENDING, AtnaState.WRITTEN)


def set_enabled(store: Store, enabled: bool) -> None:
    """Whether audit rows written from now on (by any process) queue an ATNA message."""
    with store.transaction() as db:
        audit_chain.set_atna(db, enabled)


def due(store: Store, limit: int) -> list[AuditRow]:
    """The oldest ``limit`` pending rows, with their audit content."""
    rows = _rows(store, "SELECT a.id, a.ts, a.event, a.study_uid, a.job_id, a.actor, a.detail FROM atna_outbox o "
                       "JOIN audit a ON a.id = o.audit_id WHERE o.state = ? ORDER BY o.audit_id LIMIT ?",
                       (AtnaState.PENDING, limit))
    out = []
    for r in rows:
        try:
            detail = json.loads(r["detail"])
        except ValueError:
            detail = {}
        out.append(AuditRow(int(r["id"]), float(r["ts"]), str(r["event"]), r["study_uid"], r["job_id"],
                            str(r["actor"]), detail if isinstance(detail, dict) else {}))
    return out


def mark(store: Store, audit_ids: list[int], state: AtnaState) -> None:
    """Move rows to ``state`` (``written`` records when; the final states when they ended)."""
    if not audit_ids:
        return
    now = time.time()
    column = "written_at" if state is AtnaState.WRITTEN else "done_at"
    with store.transaction() as db:
        for i in audit_ids:
            db.execute(f"UPDATE atna_outbox SET state = ?, {column} = ? WHERE audit_id = ?", (state, now, i))


def confirm(store: Store, written_before: float) -> int:
    """``written`` rows written before ``written_before`` are ``sent``; returns how many."""
    with store.transaction() as db:
        cur = db.execute("UPDATE atna_outbox SET state = ?, done_at = ? WHERE state = ? AND written_at <= ?",
                         (AtnaState.SENT, time.time(), AtnaState.WRITTEN, written_before))
        return cur.rowcount


def requeue_written(store: Store) -> int:
    """Every ``written`` row back to ``pending`` (its connection failed, or the sender restarts)."""
    with store.transaction() as db:
        cur = db.execute("UPDATE atna_outbox SET state = ?, written_at = NULL WHERE state = ?",
                         (AtnaState.PENDING, AtnaState.WRITTEN))
        return cur.rowcount


def enforce_bound(store: Store, queue_max: int) -> int:
    """Past ``queue_max`` unsent rows: drop the oldest pending ones, record one counted alert; returns how many.

    The cut goes to :data:`DROP_TO` of the bound, so a collector that stays away costs one alert per
    tenth of the queue, not one per message; the alert row is itself queued for the collector.
    """
    if unsent_count(store) <= queue_max:  # the usual case, without the write lock
        return 0
    with store.transaction() as db:
        unsent = db.execute("SELECT COUNT(*) FROM atna_outbox WHERE state IN (?, ?)", UNSENT).fetchone()[0]
        if unsent <= queue_max:
            return 0
        keep = min(int(queue_max * DROP_TO), queue_max - 1)  # room for the alert row itself
        rows = db.execute("SELECT audit_id FROM atna_outbox WHERE state = ? ORDER BY audit_id LIMIT ?",
                          (AtnaState.PENDING, unsent - keep)).fetchall()
        if not rows:
            return 0
        first, last = int(rows[0][0]), int(rows[-1][0])
        db.execute("UPDATE atna_outbox SET state = ?, done_at = ? WHERE state = ? AND audit_id BETWEEN ? AND ?",
                   (AtnaState.DROPPED, time.time(), AtnaState.PENDING, first, last))
        Store.audit_in(db, AuditRecord(AuditEvent.ATNA_DROPPED, detail={
            "dropped": len(rows), "first_audit_id": first, "last_audit_id": last, "queue_max": queue_max}))
    log.warning("ATNA queue full (%d unsent, audit.syslog.queue_max %d): dropped the oldest %d message(s), "
                "audit rows %d to %d; they stay in the local audit trail", unsent, queue_max, len(rows), first, last)
    return len(rows)


def prune(store: Store, done_before: float) -> int:
    """Forget finished rows (sent, skipped, dropped, failed) that ended before ``done_before``."""
    with store.transaction() as db:
        cur = db.execute("DELETE FROM atna_outbox WHERE state NOT IN (?, ?) AND done_at < ?",
                         (*UNSENT, done_before))
        return cur.rowcount


def unsent_count(store: Store) -> int:
    """Rows not yet known to be delivered."""
    return int(_rows(store, "SELECT COUNT(*) FROM atna_outbox WHERE state IN (?, ?)", UNSENT)[0][0])


def counts(store: Store) -> dict[str, int]:
    """Rows per state."""
    return {str(r[0]): int(r[1]) for r in _rows(store, "SELECT state, COUNT(*) FROM atna_outbox GROUP BY state")}


def _rows(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with store.reading() as tx:
        return tx.all(sql, params)
