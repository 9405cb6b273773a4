"""The appliance database: one connection layer over SQLite (embedded default) and PostgreSQL (several machines).

Callers write one SQL text for both: ``?`` placeholders, ``ON CONFLICT … DO NOTHING/UPDATE``, ``RETURNING``
(both engines have them) and :attr:`Tx.for_update` where a row must be locked. The only translation is the
placeholder style (``?`` → ``%s`` for psycopg).

Transactions:

- :meth:`Database.transaction` is a *write* transaction, and write transactions are serialised: SQLite by
  ``BEGIN IMMEDIATE`` (one writer per database file, across processes), PostgreSQL by one transaction-scoped
  advisory lock taken first. Almost every write appends to the audit hash chain, whose head is one row, so
  writes are serial either way; taking the lock up front keeps every read-then-write inside a transaction
  exactly as correct on PostgreSQL (READ COMMITTED) as it is on SQLite, without a retry loop.
- :meth:`Database.query` reads outside any write transaction (a consistent snapshot per statement).
- ``durable=True`` asks for a commit that survives power loss (SQLite ``synchronous=FULL``, PostgreSQL
  ``synchronous_commit=on`` for that commit). Other commits survive a killed process but may be lost with the
  machine (SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``: never corruption, at most the
  last moment's commits): instance files are fsync'd before their index rows and ``Store.reindex`` restores rows
  for files the index lost, and a result sent twice after a power loss carries the same SOP Instance UID. With
  every write serialised, a synchronous commit per instance would cap ingest at one disk flush per instance.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from appliance.file_modes import create_private, make_private_dirs

#: the SQLite file's name in the data folder
SQLITE_NAME = "portico.sqlite3"
#: the advisory lock every PostgreSQL write transaction takes (any fixed 64-bit number; "PORTICO1")
WRITE_LOCK_KEY = 0x504F525449434F31 - (1 << 63)


class Dialect(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgresql"


class Row(Protocol):
    """A result row: by column name or position (``sqlite3.Row`` and :class:`PgRow`)."""

    def __getitem__(self, key: Any, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx:
    """One open transaction: statements run in it commit or roll back together."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self.dialect = dialect
        #: append to a SELECT whose rows the transaction will update (PostgreSQL row locks; SQLite has none)
        self.for_update = " FOR UPDATE" if dialect is Dialect.POSTGRES else ""
        #: ``for_update`` that passes over rows another transaction holds (a queue's claim)
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if dialect is Dialect.POSTGRES else ""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cursor: Cursor = self._raw.execute(_native(sql, self.dialect), tuple(params))
        return cursor

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int | None:
        """Run an ``INSERT`` and return the new row's ``id`` (``None`` when ``ON CONFLICT`` skipped it)."""
        row = self.execute(f"{sql} RETURNING id", params).fetchone()
        return None if row is None else int(row[0])

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or ``None``."""
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(sql, params).fetchall())

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def columns(self, table: str) -> set[str]:
        """The column names of ``table`` (empty when there is no such table)."""
        if self.dialect is Dialect.SQLITE:
            return {str(r[1]) for r in self._raw.execute(f"PRAGMA table_info({_identifier(table)})")}
        rows = self._raw.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                 "current_schema() AND table_name = %s", (table,))
        return {str(r[0]) for r in rows}


class Database(ABC):
    """Connections, transactions and the dialect of one appliance database."""

    dialect: Dialect

    @abstractmethod
    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        """A serialised write transaction: commits when the block ends, rolls back on an exception."""

    @abstractmethod
    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A read-only transaction: several queries that see one snapshot."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read-only statement."""
        with self.reading() as tx:
            return tx.all(sql, params)

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """Where the database is, for logs and ``portico doctor`` (no password)."""


class SQLiteDatabase(Database):
    """One SQLite file in WAL mode; one connection per process, guarded by a lock (thread-safe).

    ``synchronous=NORMAL``: a commit survives a killed process but may be lost with power; instance files are
    fsync'd before their index rows and ``Store.reindex`` restores rows for files the index lost, so one
    fsync per instance is saved. Transactions that must survive power loss ask for ``durable=True``.
    """

    dialect = Dialect.SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        make_private_dirs(path.parent)
        # owner-only before SQLite opens it: its -wal and -shm files take the database file's mode
        create_private(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(self._db, self.dialect)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        with self._lock:
            if self._db.in_transaction:  # a read inside this thread's own write transaction
                yield Tx(self._db, self.dialect)
                return
            self._db.execute("BEGIN")
            try:
                yield Tx(self._db, self.dialect)
            finally:
                self._db.execute("COMMIT")

    def raw_connection(self) -> sqlite3.Connection:
        """The connection itself, for SQLite's online backup (:mod:`appliance.db.backup`)."""
        return self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return f"sqlite:{self.path}"


class PgRow(dict[str, Any]):
    """A PostgreSQL row that, like ``sqlite3.Row``, is read by column name or by position."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


class PostgresDatabase(Database):
    """A PostgreSQL database (psycopg 3) shared by every process of a site; a small pool per process."""

    dialect = Dialect.POSTGRES

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        try:
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # the [postgres] extra is not installed
            raise RuntimeError("storage.database names PostgreSQL but psycopg is not installed: "
                               "pip install 'portico[postgres]'") from exc

        def row(cursor: Any) -> Any:
            make = dict_row(cursor)
            return lambda values: PgRow(make(values))

        self.url = url
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, timeout=30.0,
                                    kwargs={"autocommit": True, "row_factory": row}, name="portico")
        self._pool.wait(timeout=30.0)

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        with self._pool.connection() as conn, conn.transaction():
            if not durable:  # as SQLite's synchronous=NORMAL: see the module's docstring
                conn.execute("SET LOCAL synchronous_commit TO off")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            yield Tx(conn, self.dialect)

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield Tx(conn, self.dialect)

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> str:
        return redact(self.url)


def open_database(url: str | None, data_dir: Path) -> Database:
    """The database ``storage.database`` names: ``None``/``""``/``sqlite`` for the file in ``data_dir``,
    ``sqlite:///PATH`` for another file, or a ``postgresql://`` URL."""
    if not url or url == "sqlite":
        return SQLiteDatabase(data_dir / SQLITE_NAME)
    if url.startswith("sqlite:///"):
        return SQLiteDatabase(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise ValueError("storage.database must be 'sqlite', 'sqlite:///PATH' or a postgresql:// URL")


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_QUOTED_OR_MARK = re.compile(r"'(?:[^']|'')*'|\?|%")


@lru_cache(maxsize=1024)
def _native(sql: str, dialect: Dialect) -> str:
    """``sql`` in the engine's placeholder style: psycopg takes ``%s`` (and a literal ``%`` doubled)."""
    if dialect is Dialect.SQLITE:
        return sql

    def swap(m: re.Match[str]) -> str:  # psycopg reads % even inside quoted literals; ? only outside
        token = m.group(0)
        return "%s" if token == "?" else token.replace("%", "%%")

    return _QUOTED_OR_MARK.sub(swap, sql)


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError("not a table name")
    return name
