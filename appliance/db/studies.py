"""The ``studies`` and ``runs`` tables: a study's instance count and openness, and its hand-offs (runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.db.engine import Tx


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


def count_instance(tx: Tx, study_uid: str, calling_ae: str, now: float) -> None:
    """One more instance of ``study_uid`` arrived: (re)open the study."""
    tx.execute("INSERT INTO studies (study_uid, calling_ae, first_received, last_received, received_count) "
               "VALUES (?,?,?,?,1) ON CONFLICT (study_uid) DO UPDATE SET last_received = excluded.last_received,"
               " received_count = studies.received_count + 1, open = 1", (study_uid, calling_ae, now, now))


def count_echo(tx: Tx, study_uid: str) -> None:
    """One of our own results came back: counted (the PACS counts it), the study stays as it is."""
    tx.execute("UPDATE studies SET received_count = received_count + 1 WHERE study_uid = ?", (study_uid,))


def open_studies(tx: Tx) -> list[OpenStudy]:
    rows = tx.execute("SELECT study_uid, calling_ae, last_received, received_count, expected_count "
                      "FROM studies WHERE open = 1")
    return [OpenStudy(r["study_uid"], r["calling_ae"], r["last_received"], r["received_count"],
                      r["expected_count"]) for r in rows]


def set_expected_count(tx: Tx, study_uid: str, expected: int | None) -> None:
    tx.execute("UPDATE studies SET expected_count = ? WHERE study_uid = ?", (expected, study_uid))


def locked(tx: Tx, study_uid: str) -> Any:
    """The study's row, locked for this transaction (``None`` for an unknown study)."""
    return tx.one(f"SELECT run_version, last_received, received_count FROM studies WHERE study_uid = ?"
                  f"{tx.for_update}", (study_uid,))


def close(tx: Tx, study_uid: str) -> None:
    tx.execute("UPDATE studies SET open = 0 WHERE study_uid = ?", (study_uid,))


def start_run(tx: Tx, run: Run) -> None:
    """Record ``run`` and close the study at its version; the PACS's count is asked afresh for the next."""
    tx.execute("UPDATE studies SET run_version = ?, open = 0, expected_count = NULL WHERE study_uid = ?",
               (run.version, run.study_uid))
    tx.execute("INSERT INTO runs (study_uid, version, created, reason, instance_count, last_received) "
               "VALUES (?,?,?,?,?,?)", (run.study_uid, run.version, run.created, run.reason, run.instance_count,
                                        run.last_received))


def _run(r: Any) -> Run:
    return Run(r["study_uid"], r["version"], r["reason"], r["instance_count"], r["last_received"], r["created"])


def unrouted(tx: Tx) -> list[Run]:
    return [_run(r) for r in tx.execute("SELECT * FROM runs WHERE routed = 0 ORDER BY created")]


def run(tx: Tx, study_uid: str, version: int) -> Run | None:
    row = tx.one("SELECT * FROM runs WHERE study_uid = ? AND version = ?", (study_uid, version))
    return None if row is None else _run(row)


def mark_routed(tx: Tx, run: Run) -> None:
    tx.execute("UPDATE runs SET routed = 1 WHERE study_uid = ? AND version = ?", (run.study_uid, run.version))


# ---- the dashboard's study list (appliance.study_view) ---------------------------------------------------------

#: what a study's row in the list says, each a subquery over the study's own rows (indexed by study)
_JOB = "SELECT {agg} FROM jobs j WHERE j.study_uid = s.study_uid"
_OUT = "SELECT {agg} FROM outbox o JOIN jobs j ON j.id = o.job_id WHERE j.study_uid = s.study_uid"
_AGGREGATES: dict[str, str] = {
    "instance_count": "SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid",
    "series_count": "SELECT COUNT(DISTINCT i.series_uid) FROM instances i WHERE i.study_uid = s.study_uid",
    "runs": "SELECT COUNT(*) FROM runs r WHERE r.study_uid = s.study_uid",
    "unrouted": "SELECT COUNT(*) FROM runs r WHERE r.study_uid = s.study_uid AND r.routed = 0",
    "complete_at": "SELECT MIN(r.created) FROM runs r WHERE r.study_uid = s.study_uid",
    "jobs": _JOB.format(agg="COUNT(*)"),
    "jobs_active": _JOB.format(agg="COUNT(*)") + " AND j.state IN ('PENDING', 'RUNNING')",
    "jobs_failed": _JOB.format(agg="COUNT(*)") + " AND j.state = 'FAILED'",
    "routed_at": _JOB.format(agg="MIN(j.created)"),
    "inferred_at": _JOB.format(agg="MAX(j.updated)") + " AND j.state = 'DONE'",
    "reviews_decided": "SELECT COUNT(v.decided_at) FROM reviews v JOIN jobs j ON j.id = v.job_id "
                       "WHERE j.study_uid = s.study_uid",
    "reviewed_at": "SELECT MAX(v.decided_at) FROM reviews v JOIN jobs j ON j.id = v.job_id "
                   "WHERE j.study_uid = s.study_uid",
    "outbox": _OUT.format(agg="COUNT(*)"),
    "outbox_held": _OUT.format(agg="COUNT(*)") + " AND o.state = 'HELD'",
    "outbox_pending": _OUT.format(agg="COUNT(*)") + " AND o.state = 'PENDING'",
    "outbox_failed": _OUT.format(agg="COUNT(*)") + " AND o.state = 'FAILED'",
    "outbox_sent": _OUT.format(agg="COUNT(*)") + " AND o.state = 'SENT'",
    "sent_at": _OUT.format(agg="MAX(o.sent_at)") + " AND o.state = 'SENT'",
}
#: the furthest stage a study reached (received → complete → routed → inferred → reviewed → sent), or failed
_STATE = """CASE
    WHEN a.jobs_failed > 0 OR a.outbox_failed > 0 THEN 'failed'
    WHEN a.runs = 0 THEN 'received'
    WHEN a.unrouted > 0 THEN 'complete'
    WHEN a.jobs = 0 THEN 'no_match'
    WHEN a.jobs_active > 0 THEN 'routed'
    WHEN a.outbox_held > 0 THEN 'inferred'
    WHEN a.outbox_pending > 0 THEN (CASE WHEN a.reviews_decided > 0 THEN 'reviewed' ELSE 'inferred' END)
    WHEN a.outbox_sent > 0 THEN 'sent'
    WHEN a.reviews_decided > 0 THEN 'reviewed'
    ELSE 'inferred' END"""
#: the values :data:`_STATE` takes, in the order a study goes through them
STUDY_STATES = ("received", "complete", "no_match", "routed", "inferred", "reviewed", "sent", "failed")


@dataclass(frozen=True)
class StudyFilter:
    """What the study list is narrowed to; ``None`` (or ``False``) leaves a field out."""

    #: first instance received at or after (epoch seconds)
    since: float | None = None
    #: first instance received before (epoch seconds)
    until: float | None = None
    #: one of :data:`STUDY_STATES`
    state: str | None = None
    #: the sending AE title (exact)
    calling_ae: str | None = None
    #: a model with a job for the study (exact)
    model: str | None = None
    #: studies with a failed job or a result given up on
    failed_only: bool = False


def _summaries(flt: StudyFilter, study_uid: str | None) -> tuple[str, list[Any]]:
    """The summary query (without order and limit) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    if study_uid is not None:
        clauses.append("s.study_uid = ?")
        params.append(study_uid)
    if flt.since is not None:
        clauses.append("s.first_received >= ?")
        params.append(flt.since)
    if flt.until is not None:
        clauses.append("s.first_received < ?")
        params.append(flt.until)
    if flt.calling_ae:
        clauses.append("s.calling_ae = ?")
        params.append(flt.calling_ae)
    if flt.model:
        clauses.append("EXISTS (SELECT 1 FROM jobs m WHERE m.study_uid = s.study_uid AND m.model = ?)")
        params.append(flt.model)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    columns = ", ".join(f"({sql}) AS {name}" for name, sql in _AGGREGATES.items())
    inner = (f"SELECT s.study_uid, s.calling_ae, s.first_received, s.last_received, s.received_count, s.open, "
             f"{columns} FROM studies s{where}")
    states: list[str] = []
    if flt.state:
        states.append(flt.state)
    outer = f"SELECT * FROM (SELECT a.*, {_STATE} AS state FROM ({inner}) a) b"
    if flt.failed_only:
        outer += " WHERE b.state = 'failed'" + (" AND b.state = ?" if states else "")
    elif states:
        outer += " WHERE b.state = ?"
    return outer, params + states


def summaries(tx: Tx, flt: StudyFilter, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """How many studies match ``flt``, and the page of them from ``offset``, most recently received first."""
    sql, params = _summaries(flt, None)
    total = int(tx.scalar(f"SELECT COUNT(*) FROM ({sql}) c", params))
    rows = tx.all(f"{sql} ORDER BY b.last_received DESC, b.study_uid LIMIT ? OFFSET ?", [*params, limit, offset])
    return total, [dict(r) for r in rows]


def summary(tx: Tx, study_uid: str) -> dict[str, Any] | None:
    """One study's row as :func:`summaries` gives it; ``None`` for a study never received."""
    sql, params = _summaries(StudyFilter(), study_uid)
    row = tx.one(sql, params)
    return None if row is None else dict(row)


def senders(tx: Tx) -> list[str]:
    """Every AE title that sent a study (for the list's filter)."""
    return [str(r[0]) for r in tx.all("SELECT DISTINCT calling_ae FROM studies ORDER BY calling_ae")]


def runs_of(tx: Tx, study_uid: str) -> list[Run]:
    """The study's runs, oldest first."""
    return [_run(r) for r in tx.all("SELECT * FROM runs WHERE study_uid = ? ORDER BY version", (study_uid,))]


def first_received_since(tx: Tx, since: float) -> list[float]:
    """When each study first received since ``since`` arrived (one value per study: a small table)."""
    return [float(r[0]) for r in tx.all("SELECT first_received FROM studies WHERE first_received >= ?", (since,))]


def last_received_by_sender(tx: Tx) -> dict[str, dict[str, Any]]:
    """Per sending AE title: how many studies it sent and when it last sent an instance."""
    return {str(r["calling_ae"]): {"studies": int(r["n"]), "last_received": float(r["at"])} for r in tx.all(
        "SELECT calling_ae, COUNT(*) AS n, MAX(last_received) AS at FROM studies GROUP BY calling_ae")}
