"""Which installed model versions may run: one active version per name; each version enabled or not.

Kept in the ``model_versions`` table of the appliance database (:mod:`appliance.db`); this module is that
table's repository. Writes are durable commits (``synchronous=FULL`` on SQLite), so the CLI and a running
service share one truth about what runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.db.engine import Database, Tx, open_database
from appliance.db.migrations import upgrade


class Role(StrEnum):
    """A version's part in its name: the one that runs by default, or one waiting to be promoted."""

    CANDIDATE = "candidate"
    ACTIVE = "active"


@dataclass(frozen=True)
class VersionState:
    """The recorded state of one installed version."""

    name: str
    version: str
    role: Role
    #: a disabled version never runs, not even when a rule pins it
    enabled: bool
    package_hash: str
    #: folder name under the models directory when it was recorded
    folder: str
    added: float
    updated: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ModelStates:
    """The ``model_versions`` table."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    def in_data_dir(cls, data_dir: Path, url: str | None = None) -> ModelStates:
        """The states kept in the appliance database (``storage.database``; default SQLite under ``data_dir``)."""
        database = open_database(url, data_dir)
        upgrade(database, backup_dir=data_dir / "backups")
        return cls(database)

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Tx]:
        """A read, or a write that survives power loss (a promotion decides what runs on patients' studies)."""
        if write:
            with self.database.transaction(durable=True) as tx:
                yield tx
        else:
            with self.database.reading() as tx:
                yield tx

    @staticmethod
    def _state(row: Any) -> VersionState:
        return VersionState(name=row["name"], version=row["version"], role=Role(row["role"]),
                            enabled=bool(row["enabled"]), package_hash=row["package_hash"],
                            folder=row["folder"], added=row["added"], updated=row["updated"])

    def versions(self, name: str | None = None) -> list[VersionState]:
        """Every recorded version (of ``name``), ordered by name then time added."""
        with self._tx() as db:
            if name is None:
                rows = db.execute("SELECT * FROM model_versions ORDER BY name, added").fetchall()
            else:
                rows = db.execute("SELECT * FROM model_versions WHERE name = ? ORDER BY added",
                                  (name,)).fetchall()
        return [self._state(r) for r in rows]

    def get(self, name: str, version: str) -> VersionState | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM model_versions WHERE name = ? AND version = ?",
                             (name, version)).fetchone()
        return None if row is None else self._state(row)

    def add(self, name: str, version: str, package_hash: str, folder: str, role: Role) -> VersionState:
        """Record a newly installed version; an active one displaces the previous active version.

        Raises
        ------
        ValueError
            When ``name@version`` is already recorded.
        """
        now = time.time()
        with self._tx(write=True) as db:
            if db.execute("SELECT 1 FROM model_versions WHERE name = ? AND version = ?",
                          (name, version)).fetchone():
                raise ValueError(f"{name}@{version} is already recorded")
            if role is Role.ACTIVE:
                db.execute("UPDATE model_versions SET role = ?, updated = ? WHERE name = ? AND role = ?",
                           (Role.CANDIDATE, now, name, Role.ACTIVE))
            db.execute("INSERT INTO model_versions (name, version, role, enabled, package_hash, folder, "
                       "added, updated) VALUES (?,?,?,?,?,?,?,?)",
                       (name, version, role, 1, package_hash, folder, now, now))
        return VersionState(name=name, version=version, role=role, enabled=True, package_hash=package_hash,
                            folder=folder, added=now, updated=now)

    def promote(self, name: str, version: str) -> str | None:
        """Make ``name@version`` the active version; returns the version it displaced, if any.

        Raises
        ------
        ValueError
            When the version is not recorded or is disabled.
        """
        now = time.time()
        with self._tx(write=True) as db:
            row = db.execute("SELECT enabled, role FROM model_versions WHERE name = ? AND version = ?",
                             (name, version)).fetchone()
            if row is None:
                raise ValueError(f"{name}@{version} is not recorded")
            if not row["enabled"]:
                raise ValueError(f"{name}@{version} is disabled; enable it before promoting it")
            previous = db.execute("SELECT version FROM model_versions WHERE name = ? AND role = ?",
                                  (name, Role.ACTIVE)).fetchone()
            db.execute("UPDATE model_versions SET role = ?, updated = ? WHERE name = ? AND role = ?",
                       (Role.CANDIDATE, now, name, Role.ACTIVE))
            db.execute("UPDATE model_versions SET role = ?, updated = ? WHERE name = ? AND version = ?",
                       (Role.ACTIVE, now, name, version))
        return None if previous is None else str(previous["version"])

    def set_enabled(self, name: str, version: str, enabled: bool) -> bool:
        """Allow or forbid ``name@version`` to run; returns whether it was enabled before.

        Raises
        ------
        ValueError
            When the version is not recorded.
        """
        with self._tx(write=True) as db:
            row = db.execute("SELECT enabled FROM model_versions WHERE name = ? AND version = ?",
                             (name, version)).fetchone()
            if row is None:
                raise ValueError(f"{name}@{version} is not recorded")
            db.execute("UPDATE model_versions SET enabled = ?, updated = ? WHERE name = ? AND version = ?",
                       (int(enabled), time.time(), name, version))
        return bool(row["enabled"])
