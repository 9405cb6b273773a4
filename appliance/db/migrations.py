"""Versioned migrations: numbered steps, each applied once, in order, in its own transaction.

``schema_version`` holds one row per applied step. At start-up :func:`upgrade` applies what is missing;
an appliance whose database predates versioning (tables, no ``schema_version``) takes the baseline as a
no-op on its tables and goes on from there. Before changing a database that already holds data, a SQLite
database is copied with the online backup API (:mod:`appliance.db.backup`); for PostgreSQL the operator's
``pg_dump`` is the backup (docs/operations.md), and each step is one transaction that commits or does not.
Several processes starting at once are safe: steps run inside the serialised write transaction and each
re-reads the version first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.db import (
    m0001_baseline,
    m0002_job_leases,
    m0003_received_index,
    m0004_destination_pauses,
    m0005_job_priority,
)
from appliance.db.backup import backup_sqlite
from appliance.db.engine import Database, SQLiteDatabase, Tx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Tx], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, m0001_baseline.NAME, m0001_baseline.apply),
    Migration(2, m0002_job_leases.NAME, m0002_job_leases.apply),
    Migration(3, m0003_received_index.NAME, m0003_received_index.apply),
    Migration(4, m0004_destination_pauses.NAME, m0004_destination_pauses.apply),
    Migration(5, m0005_job_priority.NAME, m0005_job_priority.apply),
)
#: the version this code expects
LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                  "applied DOUBLE PRECISION NOT NULL)")


class SchemaTooNewError(RuntimeError):
    """The database was upgraded by a newer Portico than this one."""


def version(db: Database) -> int:
    """The database's schema version: 0 when it has never been migrated."""
    with db.reading() as tx:
        if "version" not in tx.columns("schema_version"):
            return 0
        return int(tx.scalar("SELECT MAX(version) FROM schema_version") or 0)


def upgrade(db: Database, *, backup_dir: Path | None = None,
            migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every step the database lacks; returns the versions applied (empty when up to date).

    Raises :class:`SchemaTooNewError` for a database newer than ``migrations``: running older code on it
    could lose data, so the appliance refuses to start instead.
    """
    target = migrations[-1].version
    found = version(db)
    if found > target:
        raise SchemaTooNewError(f"the database is at schema version {found}; this Portico knows up to {target}: "
                                "run the newer Portico, or restore a backup taken before the upgrade")
    if found == target:
        return []
    if backup_dir is not None and isinstance(db, SQLiteDatabase) and _holds_data(db):
        copy = backup_sqlite(db, backup_dir / f"portico-v{found}-{time.strftime('%Y%m%dT%H%M%S')}.sqlite3")
        log.info("database backed up before migrating from version %d: %s", found, copy)
    applied: list[int] = []
    for step in migrations:
        with db.transaction(durable=True) as tx:
            tx.execute(_VERSION_TABLE)
            now = int(tx.scalar("SELECT MAX(version) FROM schema_version") or 0)
            if step.version <= now:
                continue
            step.apply(tx)
            tx.execute("INSERT INTO schema_version (version, name, applied) VALUES (?,?,?)",
                       (step.version, step.name, time.time()))
        applied.append(step.version)
        log.info("database migrated to version %d (%s)", step.version, step.name)
    return applied


def _holds_data(db: Database) -> bool:
    with db.reading() as tx:
        return bool(tx.columns("studies") or tx.columns("audit"))
