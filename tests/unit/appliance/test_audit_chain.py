"""The audit hash chain: tampering with raw SQL shows, at the right row; old databases are upgraded once."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from appliance import audit_chain
from appliance.audit import AuditEvent, AuditRecord
from appliance.cli import audit as audit_cli
from appliance.db.engine import Dialect, Tx
from appliance.store import Store
from tests.support.postgres import PostgresServer

OLD_AUDIT = """CREATE TABLE audit (id INTEGER PRIMARY KEY, ts REAL NOT NULL, event TEXT NOT NULL, study_uid TEXT,
    job_id INTEGER, actor TEXT NOT NULL, detail TEXT NOT NULL)"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "var", fsync=False)
    yield s
    s.close()


def fill(store: Store, n: int) -> None:
    for i in range(n):
        store.record(AuditRecord(AuditEvent.SERVICE, "1.2.3" if i % 2 else None, actor=f"t{i}", detail={"n": i}))


def raw(store: Store) -> sqlite3.Connection:
    return sqlite3.connect(store.data_dir / "portico.sqlite3", isolation_level=None)


def verify(store: Store) -> audit_chain.Verification:
    with closing(raw(store)) as db:
        return audit_chain.verify(Tx(db, Dialect.SQLITE))


def test_rows_are_chained_and_verify(store: Store) -> None:
    fill(store, 5)
    result = verify(store)
    assert result.ok and result.rows == 5 and result.last_id == 5
    with closing(raw(store)) as db:
        rows = db.execute("SELECT id, prev_hash, hash FROM audit ORDER BY id").fetchall()
        head = db.execute("SELECT last_id, last_hash FROM audit_head").fetchone()
    assert rows[0][1] == audit_chain.GENESIS
    assert all(rows[i][1] == rows[i - 1][2] for i in range(1, 5))
    assert head == (5, rows[-1][2])


def test_concurrent_writers_keep_one_unbroken_chain(store: Store) -> None:
    def write(k: int) -> None:
        for i in range(40):
            store.record(AuditRecord(AuditEvent.JOB_STATE, detail={"thread": k, "i": i}))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a second process writing at the same time: its own connection, the same chain
    other = Store(store.data_dir, fsync=False)
    try:
        fill(other, 10)
    finally:
        other.close()
    result = verify(store)
    assert result.ok, result.problem
    assert result.rows == 170 and result.last_id == 170


def test_hash_covers_canonical_json_of_the_row() -> None:
    row = {"id": 7, "ts": 1.5, "event": "received", "study_uid": "1.2", "job_id": None, "actor": "PACS",
           "detail": json.dumps({"b": 1, "a": "x"})}
    text = audit_chain.canonical(row, "ab" * 32).decode()
    assert text == ('{"actor":"PACS","detail":{"a":"x","b":1},"event":"received","id":7,"job_id":null,'
                    '"prev_hash":"' + "ab" * 32 + '","study_uid":"1.2","ts":1.5}')


@pytest.mark.parametrize("sql, kind, audit_id", [
    ("UPDATE audit SET detail = '{\"n\": 99}' WHERE id = 4", "edited", 4),
    ("UPDATE audit SET actor = 'someone else' WHERE id = 1", "edited", 1),
    ("UPDATE audit SET ts = ts + 1 WHERE id = 8", "edited", 8),
    ("DELETE FROM audit WHERE id = 5", "deleted", 5),
    ("DELETE FROM audit WHERE id IN (3, 4, 5)", "deleted", 3),
    ("DELETE FROM audit WHERE id = 1", "deleted", 1),
    ("DELETE FROM audit WHERE id = 8", "deleted", 8),
    ("INSERT INTO audit (ts, event, actor, detail) VALUES (1, 'service', 'x', '{}')", "inserted", 9),
    ("INSERT INTO audit (id, ts, event, actor, detail, prev_hash, hash) VALUES (9, 1, 'service', 'x', '{}', "
     "'00', '11')", "inserted", 9),
])
def test_verify_names_the_first_tampered_row(store: Store, sql: str, kind: str, audit_id: int) -> None:
    fill(store, 8)
    with closing(raw(store)) as db:
        db.execute(sql)
    result = verify(store)
    assert result.problem is not None
    assert (result.problem.kind, result.problem.audit_id) == (kind, audit_id), result.problem


def test_an_inserted_row_with_a_forged_link_is_named(store: Store) -> None:
    """Someone who knows the format: row 4 replaced by a forgery hashed to fit is still found."""
    fill(store, 6)
    with closing(raw(store)) as db:
        prev = db.execute("SELECT hash FROM audit WHERE id = 3").fetchone()[0]
        forged = {"id": 4, "ts": 1.0, "event": "service", "study_uid": None, "job_id": None, "actor": "x",
                  "detail": "{}"}
        db.execute("DELETE FROM audit WHERE id = 4")
        db.execute("INSERT INTO audit (id, ts, event, study_uid, job_id, actor, detail, prev_hash, hash) "
                   "VALUES (4, 1.0, 'service', NULL, NULL, 'x', '{}', ?, ?)",
                   (prev, audit_chain.row_hash(forged, prev)))
    problem = verify(store).problem
    assert problem is not None and (problem.kind, problem.audit_id) == ("edited", 4), problem


def test_rows_written_after_a_deletion_keep_showing_it(store: Store) -> None:
    fill(store, 5)
    with closing(raw(store)) as db:
        db.execute("DELETE FROM audit WHERE id = 5")
    fill(store, 2)  # ids continue past the head: 6 and 7, and 6 links to the deleted row 5
    problem = verify(store).problem
    assert problem is not None and (problem.kind, problem.audit_id) == ("deleted", 5)


def test_an_old_database_is_chained_once_at_start(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    with closing(sqlite3.connect(data / "portico.sqlite3", isolation_level=None)) as db:
        db.execute(OLD_AUDIT)
        for i in range(3):
            db.execute("INSERT INTO audit (ts, event, actor, detail) VALUES (?, 'received', 'PACS', ?)",
                       (1000.0 + i, json.dumps({"n": i})))
    store = Store(data, fsync=False)
    try:
        events = store.audit_events()
        assert [e["event"] for e in events] == ["received"] * 3 + ["audit_chained"]
        assert events[-1]["detail"] == {"action": "chained_retroactively", "rows": 3, "first_id": 1, "last_id": 3}
        store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
    finally:
        store.close()
    again = Store(data, fsync=False)  # a second start chains nothing again
    try:
        assert [e["event"] for e in again.audit_events()].count("audit_chained") == 1
        result = verify(again)
        assert result.ok and result.rows == 5 and result.retroactive == [(1, 3, 3)]
    finally:
        again.close()


def test_a_lost_head_is_rebuilt_and_said(store: Store) -> None:
    fill(store, 3)
    with closing(raw(store)) as db:
        db.execute("DELETE FROM audit_head")
    assert verify(store).problem is not None
    reopened = Store(store.data_dir, fsync=False)
    try:
        last = reopened.audit_events()[-1]
        assert last["event"] == "audit_chained" and last["detail"] == {"action": "head_rebuilt", "last_id": 3}
    finally:
        reopened.close()


def test_anchor_catches_a_wholesale_rewrite(store: Store) -> None:
    fill(store, 4)
    with closing(raw(store)) as db:
        anchor_hash = db.execute("SELECT hash FROM audit WHERE id = 2").fetchone()[0]
        # rewrite everything consistently from row 2: the chain alone cannot tell
        db.execute("UPDATE audit SET actor = 'forger' WHERE id >= 2")
        prev = db.execute("SELECT hash FROM audit WHERE id = 1").fetchone()[0]
        for (rid,) in db.execute("SELECT id FROM audit WHERE id >= 2 ORDER BY id").fetchall():
            row = db.execute("SELECT id, ts, event, study_uid, job_id, actor, detail FROM audit WHERE id = ?",
                             (rid,)).fetchone()
            digest = audit_chain.row_hash(dict(zip(("id", "ts", "event", "study_uid", "job_id", "actor", "detail"),
                                                   row, strict=True)), prev)
            db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, rid))
            prev = digest
        db.execute("UPDATE audit_head SET last_hash = ?", (prev,))
        assert audit_chain.verify(Tx(db, Dialect.SQLITE)).ok
        problem = audit_chain.check_anchor(Tx(db, Dialect.SQLITE), 2, anchor_hash)
    assert problem is not None and problem.kind == "edited" and problem.audit_id == 2


# ---- the CLI ----------------------------------------------------------------------------------

def config(tmp_path: Path, store: Store) -> Path:
    path = tmp_path / "portico.yaml"
    path.write_text(f"mode: dev\nstorage:\n  data_dir: {store.data_dir}\n", encoding="utf-8")
    return path


def test_cli_verify_passes_then_names_the_deleted_row(tmp_path: Path, store: Store,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    fill(store, 6)
    cfg = config(tmp_path, store)
    assert audit_cli.main(["verify", "-c", str(cfg)]) == 0
    assert "OK: 6 row(s), chain intact" in capsys.readouterr().out
    with closing(raw(store)) as db:
        db.execute("DELETE FROM audit WHERE id = 3")
    assert audit_cli.main(["verify", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: deleted row 3" in out
    verified = [e for e in store.audit_events() if e["event"] == "audit_verified"]
    assert [e["detail"]["ok"] for e in verified] == [True, False]
    assert verified[-1]["detail"]["audit_id"] == 3 and verified[-1]["actor"].startswith("cli")
    # a copy handed to an auditor: read only, nothing recorded
    assert audit_cli.main(["verify", "--database", str(store.data_dir / "portico.sqlite3"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problem"]["kind"] == "deleted" and report["problem"]["audit_id"] == 3
    assert len([e for e in store.audit_events() if e["event"] == "audit_verified"]) == 2


def test_cli_export_csv_and_json_are_reverifiable(tmp_path: Path, store: Store,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fill(store, 4)
    cfg = config(tmp_path, store)
    out = tmp_path / "audit.json"
    assert audit_cli.main(["export", "-c", str(cfg), "--since", "2000-01-01", "--format", "json",
                           "--out", str(out)]) == 0
    assert "exported 4 row(s); chain intact" in capsys.readouterr().err
    assert out.stat().st_mode & 0o077 == 0
    doc = json.loads(out.read_text())
    assert doc["chain"]["ok"] and [r["id"] for r in doc["rows"]] == [1, 2, 3, 4]
    prev = audit_chain.GENESIS
    for row in doc["rows"]:  # an auditor recomputes the chain from the export alone
        assert row["prev_hash"] == prev
        assert audit_chain.row_hash({**row, "detail": json.dumps(row["detail"])}, prev) == row["hash"]
        prev = row["hash"]
    assert audit_cli.main(["export", "-c", str(cfg), "--since", "2000-01-01T00:00:00+00:00"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(",") == list(audit_cli.COLUMNS) and len(lines) == 1 + 5  # the json export is row 5
    assert audit_cli.main(["export", "-c", str(cfg), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.splitlines() == [",".join(audit_cli.COLUMNS)]
    exported = [e for e in store.audit_events() if e["event"] == "audit_exported"]
    assert [e["detail"]["rows"] for e in exported] == [4, 5, 0]


def test_the_chain_verifies_on_postgresql_too(tmp_path: Path, postgres_server: PostgresServer) -> None:
    store = Store(tmp_path / "var", fsync=False, database=postgres_server.new_database())
    try:
        for n in range(5):
            store.record(AuditRecord(AuditEvent.SERVICE, detail={"n": n}))
        with store.reading() as tx:
            result = audit_chain.verify(tx)
            assert result.ok and result.rows == 5
        with store.transaction() as tx:
            tx.execute("UPDATE audit SET actor = 'someone else' WHERE id = 3")
        with store.reading() as tx:
            problem = audit_chain.verify(tx).problem
        assert problem is not None and (problem.kind, problem.audit_id) == ("edited", 3)
    finally:
        store.close()
