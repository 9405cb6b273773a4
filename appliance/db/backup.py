"""Backups of the appliance database: SQLite's online backup API (a consistent copy while it is in use).

PostgreSQL is backed up with its own tools (``pg_dump``/``pg_restore``, docs/operations.md): they know its
roles, sequences and concurrent writers, and a site running PostgreSQL already runs them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.db.engine import SQLiteDatabase
from appliance.file_modes import create_private, make_private_dirs


def backup_sqlite(db: SQLiteDatabase, target: Path) -> Path:
    """Copy the live database to ``target`` (owner-only), page by page, without stopping writers."""
    make_private_dirs(target.parent)
    create_private(target)
    copy = sqlite3.connect(target)
    try:
        db.raw_connection().backup(copy)
    finally:
        copy.close()
    return target


def check_sqlite(path: Path) -> str:
    """SQLite's own ``integrity_check`` of a backup file ("ok" when sound)."""
    copy = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return str(copy.execute("PRAGMA integrity_check").fetchone()[0])
    except sqlite3.DatabaseError as exc:  # not a database at all
        return f"not a SQLite database ({exc.__class__.__name__})"
    finally:
        copy.close()


def restore_sqlite(source: Path, target: Path) -> None:
    """Replace the database file ``target`` with the backup ``source`` (the appliance must be stopped).

    Copied through the backup API too, so ``target``'s WAL and shared-memory files stay consistent.
    """
    if check_sqlite(source) != "ok":
        raise ValueError("the backup file fails SQLite's integrity check")
    make_private_dirs(target.parent)
    create_private(target)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
