"""Versioned migrations: from an empty database, from the previous version, and from the unversioned schema
an installed appliance has (with data in it), on SQLite and PostgreSQL; backups before an upgrade."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from appliance import audit_chain
from appliance.cli import db as db_cli
from appliance.db.engine import Database, Dialect, SQLiteDatabase, Tx, open_database
from appliance.db.migrations import LATEST, MIGRATIONS, SchemaTooNewError, upgrade, version
from appliance.store import JobState, Store
from tests.support.legacy_schema import UNVERSIONED_SCHEMA

TABLES = {"studies", "instances", "runs", "jobs", "results", "outbox", "audit", "audit_head", "atna_outbox",
          "quarantine", "reviews", "model_versions", "users", "api_tokens", "sessions", "sign_in_failures",
          "destination_pauses"}


def _tables(db: Database) -> set[str]:
    with db.reading() as tx:
        return {t for t in TABLES if tx.columns(t)}


def test_an_empty_database_gets_every_table_and_the_latest_version(tmp_path: Path, database_url: str | None) -> None:
    db = open_database(database_url, tmp_path)
    try:
        assert version(db) == 0
        assert upgrade(db) == [m.version for m in MIGRATIONS]
        assert version(db) == LATEST
        assert _tables(db) == TABLES
        assert upgrade(db) == []  # idempotent
        with db.reading() as tx:
            assert {"lease_owner", "lease_expires", "progress_done", "progress_total"} <= tx.columns("jobs")
    finally:
        db.close()


def test_the_previous_version_upgrades_and_keeps_its_rows(tmp_path: Path, database_url: str | None) -> None:
    db = open_database(database_url, tmp_path)
    try:
        upgrade(db, migrations=MIGRATIONS[:-1])
        assert version(db) == LATEST - 1
        with db.transaction() as tx:
            tx.execute("INSERT INTO jobs (study_uid, run_version, rule, model, series_uid, content_key, state, "
                       "created, updated) VALUES ('1.2', 1, 'r', 'm', '1.2.3', 'k', 'PENDING', 1, 1)")
        assert upgrade(db) == [LATEST]
        with db.reading() as tx:
            row = tx.one("SELECT * FROM jobs")
        assert row["study_uid"] == "1.2" and row["lease_owner"] is None and row["progress_total"] is None
    finally:
        db.close()


def _legacy(data: Path) -> None:
    """An appliance from before migrations: its tables, a study with one instance, a job, an audit row."""
    data.mkdir(parents=True)
    with closing(sqlite3.connect(data / "portico.sqlite3", isolation_level=None)) as raw:
        raw.executescript(UNVERSIONED_SCHEMA)
        raw.execute("INSERT INTO studies (study_uid, calling_ae, first_received, last_received, received_count, "
                    "run_version, open) VALUES ('1.2.3', 'PACS', 10, 11, 1, 1, 0)")
        raw.execute("INSERT INTO instances VALUES ('1.2.3.4.1', '1.2.3', '1.2.3.4', '1.2.840.10008.5.1.4.1.1.2', "
                    "'1.2.840.10008.1.2.1', '/nowhere.dcm', 10, 10, 1)")
        raw.execute("INSERT INTO jobs (study_uid, run_version, rule, model, series_uid, content_key, state, attempts,"
                    " created, updated) VALUES ('1.2.3', 1, 'r', 'm', '1.2.3.4', 'k', 'RUNNING', 1, 12, 12)")
        raw.execute("INSERT INTO audit (ts, event, actor, detail) VALUES (10, 'received', 'PACS', ?)",
                    (json.dumps({"n": 1}),))
        raw.execute("INSERT INTO model_versions VALUES ('m', '1.0.0', 'active', 1, 'h', 'm-1.0.0', 1, 1)")


def test_an_installed_unversioned_appliance_upgrades_in_place_after_a_backup(tmp_path: Path) -> None:
    data = tmp_path / "var"
    _legacy(data)
    store = Store(data, fsync=False)
    try:
        assert version(store.db) == LATEST
        backups = list((data / "backups").glob("portico-v0-*.sqlite3"))
        assert len(backups) == 1  # the database as it was, before any step changed it
        with closing(sqlite3.connect(backups[0])) as copy:
            assert copy.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'schema_version'").fetchone()[0] == 0
            assert copy.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
        assert store.instance_count("1.2.3") == 1
        (job,) = store.jobs()
        assert job.state is JobState.RUNNING and job.lease_owner is None
        assert store.resume_interrupted() == 1  # a job of the old process has no lease: back in the queue
        events = [e["event"] for e in store.audit_events()]
        assert events[0] == "received" and "audit_chained" in events
        with store.reading() as tx:
            assert audit_chain.verify(tx).ok
            assert tx.one("SELECT role FROM model_versions WHERE name = 'm'")["role"] == "active"
    finally:
        store.close()
    again = Store(data, fsync=False)  # a second start neither migrates nor backs up again
    again.close()
    assert len(list((data / "backups").glob("*.sqlite3"))) == 1


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "portico.sqlite3")
    try:
        upgrade(db)
        with db.transaction() as tx:
            tx.execute("INSERT INTO schema_version (version, name, applied) VALUES (?, 'from the future', 0)",
                       (LATEST + 1,))
        with pytest.raises(SchemaTooNewError, match="newer Portico"):
            upgrade(db)
    finally:
        db.close()


def test_placeholders_and_percent_signs_read_the_same_on_both_engines(tmp_path: Path,
                                                                      database_url: str | None) -> None:
    db = open_database(database_url, tmp_path)
    try:
        upgrade(db)
        with db.transaction() as tx:
            tx.execute("INSERT INTO quarantine (id, ts, reason, calling_ae, peer, path) VALUES (?,?,?,?,?,?)",
                       ("q1", 1.5, "100% unreadable? yes", "A", "p", "/x"))
        rows = db.query("SELECT reason FROM quarantine WHERE reason LIKE '100%' AND id = ?", ("q1",))
        assert [r["reason"] for r in rows] == ["100% unreadable? yes"]
        assert rows[0][0] == "100% unreadable? yes"  # by position too
    finally:
        db.close()


def test_backup_and_restore_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "portico.yaml"
    data = tmp_path / "var"
    config.write_text(f"storage:\n  data_dir: {data}\n")
    store = Store(data, fsync=False)
    store.set_expected_count("none", 1)
    with store.transaction() as tx:
        tx.execute("INSERT INTO quarantine (id, ts, reason, calling_ae, peer, path) VALUES ('before', 1, 'r', 'A', "
                   "'p', '/x')")
    store.close()
    copy = tmp_path / "copy.sqlite3"
    assert db_cli.main(["--config", str(config), "backup", "--out", str(copy)]) == 0
    assert "backed up" in capsys.readouterr().out
    store = Store(data, fsync=False)
    with store.transaction() as tx:
        tx.execute("DELETE FROM quarantine")  # a mistake, after the backup
    store.close()
    assert db_cli.main(["--config", str(config), "restore", str(copy)]) == 0
    store = Store(data, fsync=False)
    try:
        assert [q["id"] for q in store.quarantined()] == ["before"]
        assert any(e["detail"].get("action") == "database restore" for e in store.audit_events())
    finally:
        store.close()
    assert list((data / "backups").glob("replaced-*.sqlite3"))  # what the restore replaced is kept
    assert db_cli.main(["--config", str(config), "status"]) == 0
    assert f"schema version: {LATEST}" in capsys.readouterr().out


def test_a_corrupt_backup_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "portico.yaml"
    config.write_text(f"storage:\n  data_dir: {tmp_path / 'var'}\n")
    Store(tmp_path / "var", fsync=False).close()
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    assert db_cli.main(["--config", str(config), "restore", str(bad)]) == 1
    assert "portico db restore" in capsys.readouterr().err


def test_a_tx_over_a_raw_sqlite_connection_reads_columns(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "x.sqlite3")) as raw:
        raw.execute("CREATE TABLE t (a INTEGER, b TEXT)")
        assert Tx(raw, Dialect.SQLITE).columns("t") == {"a", "b"}
        assert Tx(raw, Dialect.SQLITE).columns("missing") == set()
