"""The audit table as a hash chain: an edited, deleted or inserted row shows.

Every row carries ``hash`` = SHA-256 of its canonical content (:func:`canonical`: compact, key-sorted JSON
of ``id``, ``ts``, ``event``, ``study_uid``, ``job_id``, ``actor``, ``detail`` and ``prev_hash``), and
``prev_hash`` = the previous row's ``hash`` (:data:`GENESIS` for the first). The one-row ``audit_head``
table holds the last row's id and hash, so a row deleted from the end shows too, and the next row's
``prev_hash`` still names the deleted one.

:func:`append` runs inside the caller's write transaction (the store's ``BEGIN IMMEDIATE`` under its
lock, which also serialises other processes), so reading the head, inserting the row and moving the head
are one atomic step. :func:`upgrade` brings a database from before the chain up to date once, recording
that its rows were chained retroactively. The chain shows tampering by anyone who cannot recompute it;
someone who can rewrite the whole table is caught by the anchors (the head's id and hash, logged by
:mod:`appliance.atna_sender` and sent with every ATNA message as its sequence id) and ``verify --anchor``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.audit import AuditEvent, AuditRecord
from appliance.db.engine import Tx

log = logging.getLogger(__name__)

#: the ``prev_hash`` of the first row
GENESIS = "0" * 64
#: rows chained per statement batch at upgrade (keeps memory flat on a large table)
_UPGRADE_BATCH = 5000

ProblemKind = Literal["edited", "deleted", "inserted", "unchained"]


@dataclass(frozen=True)
class Head:
    """The chain's last row, as ``audit_head`` records it."""

    last_id: int
    last_hash: str
    #: whether new rows also queue an ATNA message (:mod:`appliance.atna_outbox`)
    atna: bool


@dataclass(frozen=True)
class Problem:
    """The first place where the chain does not hold."""

    kind: ProblemKind
    #: the row edited or inserted, or the first row deleted; ``None`` when no row can be named
    audit_id: int | None
    message: str


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found."""

    rows: int
    last_id: int
    last_hash: str
    problem: Problem | None
    #: (first id, last id, rows) of each retroactive chaining recorded in the chain
    retroactive: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def canonical(row: Mapping[str, Any], prev_hash: str) -> bytes:
    """The bytes a row's hash covers: compact, key-sorted JSON, UTF-8.

    ``row`` has the audit columns; ``detail`` is its stored JSON text, parsed, so the hash covers the
    values, not the spelling. Raises ``ValueError`` when ``detail`` is not JSON.
    """
    content = {
        "id": int(row["id"]),
        "ts": float(row["ts"]),
        "event": str(row["event"]),
        "study_uid": row["study_uid"],
        "job_id": None if row["job_id"] is None else int(row["job_id"]),
        "actor": str(row["actor"]),
        "detail": json.loads(row["detail"]),
        "prev_hash": prev_hash,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_hash(row: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of :func:`canonical`."""
    return hashlib.sha256(canonical(row, prev_hash)).hexdigest()


def head(db: Tx) -> Head | None:
    """The chain's head, or ``None`` before :func:`upgrade` made one."""
    row = db.execute("SELECT last_id, last_hash, atna FROM audit_head WHERE id = 1").fetchone()
    return None if row is None else Head(int(row[0]), str(row[1]), bool(row[2]))


def append(db: Tx, rec: AuditRecord, ts: float | None = None) -> int:
    """Insert ``rec`` as the chain's next row inside the caller's write transaction; returns its id.

    When the head says so, the row is queued for ATNA in the same transaction.
    """
    # the head, and past it any row written outside the chain: ids are never reused (one statement)
    found = db.execute("SELECT last_id, last_hash, atna, (SELECT MAX(id) FROM audit) FROM audit_head "
                       "WHERE id = 1").fetchone()
    if found is None:
        raise RuntimeError("the audit chain has no head: the store was not upgraded")
    current = Head(int(found[0]), str(found[1]), bool(found[2]))
    new_id = max(current.last_id, int(found[3] or 0)) + 1
    row: dict[str, Any] = {"id": new_id, "ts": time.time() if ts is None else ts,
           "event": str(rec.event), "study_uid": rec.study_uid, "job_id": rec.job_id, "actor": rec.actor,
           "detail": json.dumps(rec.detail, sort_keys=True)}
    digest = row_hash(row, current.last_hash)
    db.execute("INSERT INTO audit (id, ts, event, study_uid, job_id, actor, detail, prev_hash, hash) "
               "VALUES (?,?,?,?,?,?,?,?,?)",
               (row["id"], row["ts"], row["event"], row["study_uid"], row["job_id"], row["actor"], row["detail"],
                current.last_hash, digest))
    db.execute("UPDATE audit_head SET last_id = ?, last_hash = ? WHERE id = 1", (new_id, digest))
    if current.atna:
        db.execute("INSERT INTO atna_outbox (audit_id, state) VALUES (?, 'pending')", (new_id,))
    return new_id


def upgrade(db: Tx) -> None:
    """Bring the audit table up to the chain, inside the caller's write transaction; idempotent.

    Adds ``prev_hash`` and ``hash`` when missing. Without a head: a table none of whose rows is hashed
    (a database from before the chain) has its rows chained in id order, then an ``audit_chained`` row
    records it (``chained_retroactively``: their content is protected from now on, not before); a table
    with hashed rows but no head lost its head, which is rebuilt from the last hashed row and recorded
    (``head_rebuilt``). Rows without a hash after the first hashed one are never chained here: they are
    what :func:`verify` reports as inserted.
    """
    columns = db.columns("audit")
    for column in ("prev_hash", "hash"):
        if column not in columns:
            db.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")
    if head(db) is not None:
        return
    hashed = db.execute("SELECT id, hash FROM audit WHERE hash IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
    if hashed is not None:
        db.execute("INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, ?, ?)", (hashed[0], hashed[1]))
        log.warning("the audit chain's head was missing; rebuilt at row %d (recorded as a security alert)",
                    hashed[0])
        append(db, AuditRecord(AuditEvent.AUDIT_CHAINED, detail={"action": "head_rebuilt",
                                                                 "last_id": int(hashed[0])}))
        return
    prev, last_id, first_id, count = GENESIS, 0, None, 0
    while True:
        rows = db.execute("SELECT id, ts, event, study_uid, job_id, actor, detail FROM audit WHERE id > ? "
                          "ORDER BY id LIMIT ?", (last_id, _UPGRADE_BATCH)).fetchall()
        if not rows:
            break
        for r in rows:
            row = {name: r[i] for i, name in enumerate(("id", "ts", "event", "study_uid", "job_id", "actor", "detail"))}
            digest = row_hash(row, prev)
            db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, row["id"]))
            prev, last_id, count = digest, int(row["id"]), count + 1
            first_id = last_id if first_id is None else first_id
    db.execute("INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, ?, ?)", (last_id, prev))
    if count:
        log.info("audit chain: %d existing row(s) chained retroactively (ids %d to %d)", count, first_id, last_id)
        append(db, AuditRecord(AuditEvent.AUDIT_CHAINED, detail={
            "action": "chained_retroactively", "rows": count, "first_id": first_id, "last_id": last_id}))


def needs_upgrade(db: Tx) -> bool:
    """Whether :func:`upgrade` has anything to do (read only: no write lock for a database already chained)."""
    columns = db.columns("audit")
    return not {"prev_hash", "hash"} <= columns or head(db) is None


def set_atna(db: Tx, enabled: bool) -> None:
    """Whether rows written from now on queue an ATNA message (inside the caller's write transaction)."""
    db.execute("UPDATE audit_head SET atna = ? WHERE id = 1", (int(enabled),))


# ---- verification ------------------------------------------------------------------------------

_COLUMNS = "id, ts, event, study_uid, job_id, actor, detail, prev_hash, hash"


def _rows(db: Tx) -> Iterator[dict[str, Any]]:
    names = [c.strip() for c in _COLUMNS.split(",")]
    for r in db.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY id"):
        yield {name: r[i] for i, name in enumerate(names)}  # by position: sqlite3.Row and PgRow alike


def _intact(row: Mapping[str, Any]) -> bool:
    if row["hash"] is None or row["prev_hash"] is None:
        return False
    try:
        return bool(row_hash(row, str(row["prev_hash"])) == row["hash"])
    except (ValueError, TypeError):  # detail no longer JSON, a column no longer a number
        return False


def verify(db: Tx) -> Verification:
    """Walk the chain from the first row; stop at the first edited, deleted or inserted row.

    ``db`` may be read-only. Each row must (in this order) lie within the head, carry a hash, match its
    hash, and name the previous row's hash; a mismatch there is an inserted row when the next row links
    past it, else rows deleted before it. At the end the head must name the last row.
    """
    columns = db.columns("audit")
    if "hash" not in columns:
        return Verification(0, 0, GENESIS, Problem("unchained", None, "the audit table predates the hash chain; "
                                                   "start portico once to chain it"))
    top = head(db) if db.columns("audit_head") else None  # None: no audit_head table
    if top is None:
        return Verification(0, 0, GENESIS, Problem("deleted", None, "the chain's head (table audit_head) is missing"))
    count, prev_hash, prev_id = 0, GENESIS, 0
    retroactive: list[tuple[int, int, int]] = []
    rows = _rows(db)
    row = next(rows, None)
    while row is not None:
        following = next(rows, None)
        problem = _check(row, following, prev_id, prev_hash, top)
        if problem is not None:
            return Verification(count, prev_id, prev_hash, problem, retroactive)
        if row["event"] == AuditEvent.AUDIT_CHAINED:
            detail = json.loads(row["detail"])
            if detail.get("action") == "chained_retroactively":
                retroactive.append((int(detail["first_id"]), int(detail["last_id"]), int(detail["rows"])))
        count, prev_hash, prev_id = count + 1, str(row["hash"]), int(row["id"])
        row = following
    if (prev_id, prev_hash) != (top.last_id, top.last_hash):
        if prev_id < top.last_id:
            span = f"{prev_id + 1}" if prev_id + 1 == top.last_id else f"{prev_id + 1} to {top.last_id}"
            problem = Problem("deleted", prev_id + 1, f"row(s) {span} deleted from the end (the head names "
                                                      f"row {top.last_id})")
        else:
            problem = Problem("edited", None, f"the chain's head does not match its last row ({prev_id})")
        return Verification(count, prev_id, prev_hash, problem, retroactive)
    return Verification(count, prev_id, prev_hash, None, retroactive)


def _check(row: Mapping[str, Any], following: Mapping[str, Any] | None, prev_id: int, prev_hash: str,
           top: Head) -> Problem | None:
    rid = int(row["id"])
    if rid > top.last_id:
        return Problem("inserted", rid, f"row {rid} lies beyond the chain's head (row {top.last_id})")
    if row["hash"] is None:
        return Problem("inserted", rid, f"row {rid} has no hash: it was written outside the chain")
    if not _intact(row):
        return Problem("edited", rid, f"row {rid}'s content no longer matches its hash")
    if row["prev_hash"] == prev_hash:
        return None
    if following is not None and following["prev_hash"] == prev_hash:
        return Problem("inserted", rid, f"row {rid} was inserted: row {following['id']} links past it to "
                                        f"row {prev_id}")
    if rid > prev_id + 1:
        span = f"{prev_id + 1}" if rid == prev_id + 2 else f"{prev_id + 1} to {rid - 1}"
        return Problem("deleted", prev_id + 1, f"row(s) {span} deleted (row {rid} links to a row that is gone)")
    if prev_id == 0:
        return Problem("deleted", None, f"row {rid}, the first, does not start the chain: rows before it are gone")
    # row prev_id matched its own hash but is not the row this one recorded: replaced by a fitted forgery
    return Problem("edited", prev_id, f"row {prev_id} was replaced (row {rid} links to a different row {prev_id})")


def check_anchor(db: Tx, audit_id: int, digest: str) -> Problem | None:
    """Whether row ``audit_id`` still has the hash an anchor (a log line, a collector) recorded."""
    row = db.execute("SELECT hash FROM audit WHERE id = ?", (audit_id,)).fetchone()
    if row is None:
        return Problem("deleted", audit_id, f"anchored row {audit_id} is gone")
    if row[0] != digest:
        return Problem("edited", audit_id, f"row {audit_id}'s hash differs from the anchor: the chain was "
                                           "rewritten from there or earlier")
    return None


# ---- reading -----------------------------------------------------------------------------------


def events(db: Tx, *, study_uid: str | None = None, limit: int | None = None,
           kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Audit rows, oldest first: all of them, or the ``limit`` most recent (of ``study_uid``, of ``kinds``)."""
    clauses: list[str] = []
    params: list[Any] = []
    if study_uid:
        clauses.append("study_uid = ?")
        params.append(study_uid)
    if kinds:
        clauses.append(f"event IN ({','.join('?' * len(kinds))})")
        params.extend(kinds)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT * FROM audit {where} ORDER BY id"
    if limit is not None:  # the newest rows, without reading the whole (append-only, growing) table
        sql = f"SELECT * FROM (SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?) newest ORDER BY id"
        params.append(limit)
    return [{"ts": r["ts"], "event": r["event"], "study_uid": r["study_uid"], "job_id": r["job_id"],
             "actor": r["actor"], "detail": json.loads(r["detail"])} for r in db.execute(sql, params)]


@dataclass(frozen=True)
class AuditQuery:
    """What an audit search is narrowed to; ``None`` leaves a field out."""

    #: who acted: a case-insensitive part of the actor
    actor: str | None = None
    #: the event (exact)
    event: str | None = None
    #: the end of a Study Instance UID (its short form), or the whole UID
    study: str | None = None
    #: at or after (epoch seconds)
    since: float | None = None
    #: before (epoch seconds)
    until: float | None = None


def search(db: Tx, query: AuditQuery, *, before_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Rows matching ``query``, newest first: up to ``limit`` of them, with ids below ``before_id`` when given.

    Every column is returned (the chain's too, for an export); ``detail`` parsed, or as stored when it is not
    JSON (a tampered row is shown as it is).
    """
    clauses: list[str] = []
    params: list[Any] = []
    if query.actor:
        clauses.append("LOWER(actor) LIKE ? ESCAPE '!'")
        params.append("%" + _like(query.actor.lower()) + "%")
    if query.event:
        clauses.append("event = ?")
        params.append(query.event)
    if query.study:
        clauses.append("study_uid LIKE ? ESCAPE '!'")
        params.append("%" + _like(query.study))
    if query.since is not None:
        clauses.append("ts >= ?")
        params.append(query.since)
    if query.until is not None:
        clauses.append("ts < ?")
        params.append(query.until)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    names = [c.strip() for c in _COLUMNS.split(",")]
    out: list[dict[str, Any]] = []
    for r in db.execute(f"SELECT {_COLUMNS} FROM audit {where} ORDER BY id DESC LIMIT ?", [*params, limit]):
        row = {name: r[name] for name in names}
        with suppress(TypeError, ValueError):  # a tampered row's detail is shown as stored
            row["detail"] = json.loads(row["detail"])
        out.append(row)
    return out


def _like(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (``!`` escapes)."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")
