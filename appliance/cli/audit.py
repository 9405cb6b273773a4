"""``portico audit verify | export``: check the audit trail's hash chain; hand rows to an auditor."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from appliance import audit_chain
from appliance.audit import AuditEvent, AuditRecord
from appliance.audit_csv import COLUMNS as COLUMNS
from appliance.audit_csv import export_row, to_csv
from appliance.cli.common import also_after, cli_actor, parser, settings_from
from appliance.db.engine import Dialect, Tx
from appliance.store import Store

CANONICAL = ("hash = SHA-256 of compact JSON with sorted keys of {id, ts, event, study_uid, job_id, actor, "
             "detail (parsed), prev_hash}; prev_hash = the previous row's hash")


def main(argv: Sequence[str]) -> int:
    p = parser("audit", "The tamper-evident audit trail.")
    sub = p.add_subparsers(dest="action", required=True)
    verify = also_after(sub.add_parser("verify", help="walk the hash chain; exit 1 at the first edited, deleted "
                                                      "or inserted row"))
    verify.add_argument("--database", type=Path, help="verify this copy of portico.sqlite3 (read only, "
                                                      "nothing recorded) instead of the configured one")
    verify.add_argument("--anchor", action="append", default=[], metavar="ID:SHA256",
                        help="a head the log or the collector recorded; the row must still have that hash")
    verify.add_argument("--json", action="store_true", dest="as_json")
    export = also_after(sub.add_parser("export", help="audit rows since a date, for an auditor"))
    export.add_argument("--since", required=True, type=_when, help="date or ISO date-time (UTC unless a zone "
                                                                   "is given)")
    export.add_argument("--until", type=_when, help="up to (not including) this date or date-time")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--out", type=Path, help="file to write (owner-only); default: standard output")
    args = p.parse_args(argv)
    if args.action == "verify" and args.database is not None:
        return _verify(args.database, args.anchor, args.as_json, record=None)
    settings = settings_from(args)
    database = settings.data_dir / "portico.sqlite3"
    if not database.is_file():
        sys.stderr.write(f"portico audit: no database at {database}\n")
        return 2
    if args.action == "verify":
        return _verify(database, args.anchor, args.as_json, record=settings.data_dir)
    return _export(database, settings.data_dir, args)


def _when(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2026-11-01) or ISO date-time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)



def _read_only(database: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    return db


def _record(data_dir: Path, rec: AuditRecord) -> None:
    store = Store(data_dir, fsync=False)
    try:
        store.record(rec)
    finally:
        store.close()


# ---- verify -------------------------------------------------------------------------------------

def _verify(database: Path, anchors: list[str], as_json: bool, record: Path | None) -> int:
    if not database.is_file():
        sys.stderr.write(f"portico audit: no database at {database}\n")
        return 2
    try:
        parsed = [_anchor(a) for a in anchors]
    except ValueError as exc:
        sys.stderr.write(f"portico audit: {exc}\n")
        return 2
    with closing(_read_only(database)) as db:
        result = audit_chain.verify(Tx(db, Dialect.SQLITE))
        problem = result.problem
        for audit_id, digest in parsed:
            problem = problem or audit_chain.check_anchor(Tx(db, Dialect.SQLITE), audit_id, digest)
    if as_json:
        sys.stdout.write(json.dumps({
            "ok": problem is None, "rows": result.rows, "last_id": result.last_id, "last_hash": result.last_hash,
            "problem": None if problem is None else {"kind": problem.kind, "audit_id": problem.audit_id,
                                                     "message": problem.message},
            "chained_retroactively": [{"first_id": a, "last_id": b, "rows": n} for a, b, n in result.retroactive],
        }, indent=2) + "\n")
    else:
        for first, last, rows in result.retroactive:
            sys.stdout.write(f"note: rows {first} to {last} ({rows}) were written before the chain and chained "
                             "retroactively at upgrade: protected from then on, not before\n")
        if problem is None:
            sys.stdout.write(f"OK: {result.rows} row(s), chain intact; head row {result.last_id} "
                             f"sha256 {result.last_hash}\n")
        else:
            where = f"row {problem.audit_id}" if problem.audit_id is not None else "chain"
            sys.stdout.write(f"BROKEN: {problem.kind} {where}: {problem.message} "
                             f"({result.rows} row(s) verified before it)\n")
    if record is not None:
        detail: dict[str, Any] = {"ok": problem is None, "rows": result.rows, "anchors": len(parsed)}
        if problem is not None:
            detail.update(problem=problem.kind, audit_id=problem.audit_id)
        _record(record, AuditRecord(AuditEvent.AUDIT_VERIFIED, actor=cli_actor(), detail=detail))
    return 0 if problem is None else 1


def _anchor(text: str) -> tuple[int, str]:
    audit_id, _, digest = text.partition(":")
    if not audit_id.isdigit() or len(digest) != 64:
        raise ValueError(f"--anchor {text!r}: expected ROW_ID:SHA256 (64 hex digits)")
    return int(audit_id), digest.lower()


# ---- export -------------------------------------------------------------------------------------

def _export(database: Path, data_dir: Path, args: argparse.Namespace) -> int:
    since: dt.datetime = args.since
    until: dt.datetime | None = args.until
    sql, params = "SELECT * FROM audit WHERE ts >= ?", [since.timestamp()]
    if until is not None:
        sql, params = sql + " AND ts < ?", [*params, until.timestamp()]
    with closing(_read_only(database)) as db:
        rows = [_row(r) for r in db.execute(sql + " ORDER BY id", params)]
        chain = audit_chain.verify(Tx(db, Dialect.SQLITE))
    text = _csv(rows) if args.format == "csv" else json.dumps({
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "since": since.isoformat(), "until": until.isoformat() if until else None,
        "chain": {"ok": chain.ok, "problem": None if chain.problem is None else chain.problem.message},
        "canonical": CANONICAL, "rows": rows}, indent=2, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
    state = "intact" if chain.ok else f"BROKEN ({chain.problem.message if chain.problem else ''})"
    sys.stderr.write(f"exported {len(rows)} row(s); chain {state}\n")
    _record(data_dir, AuditRecord(AuditEvent.AUDIT_EXPORTED, actor=cli_actor(), detail={
        "since": since.isoformat(), "until": until.isoformat() if until else None, "format": args.format,
        "rows": len(rows), "first_id": rows[0]["id"] if rows else None,
        "last_id": rows[-1]["id"] if rows else None}))
    return 0


def _row(r: sqlite3.Row) -> dict[str, Any]:
    return export_row(r)


def _csv(rows: list[dict[str, Any]]) -> str:
    return to_csv(rows)
