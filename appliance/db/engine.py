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

import logging
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

log = logging.getLogger(__name__)

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
        #: channels to wake when this transaction commits (:meth:`notify`)
        self.notes: set[str] = set()

    def notify(self, channel: str, *, here_only: bool = False) -> None:
        """Wake whoever waits on ``channel`` (:class:`Wakeups`) once this transaction commits.

        In this process always; in every process on PostgreSQL (``NOTIFY``, delivered at commit) unless
        ``here_only`` (a wake-up only this process's loops need, at no cost to the database).
        """
        if channel not in self.notes and self.dialect is Dialect.POSTGRES and not here_only:
            self._raw.execute(f"NOTIFY {_identifier(channel)}")
        self.notes.add(channel)

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


class Wakeups:
    """Channels a loop can sleep on until a commit says there is work (instead of polling a table).

    Take a :meth:`token` *before* looking for work, then :meth:`wait` with it: a wake-up that came in between
    is not lost. :meth:`interrupt` wakes every waiter (stopping).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation: dict[str, int] = {}

    def token(self, channel: str) -> int:
        with self._cond:
            return self._generation.get(channel, 0)

    def bump(self, channels: Iterable[str]) -> None:
        with self._cond:
            for channel in channels:
                self._generation[channel] = self._generation.get(channel, 0) + 1
            self._cond.notify_all()

    def interrupt(self) -> None:
        with self._cond:
            self._generation = {c: n + 1 for c, n in self._generation.items()}
            self._generation["*"] = self._generation.get("*", 0) + 1
            self._cond.notify_all()

    def wait(self, channel: str, token: int, timeout: float) -> bool:
        """Until ``channel`` moved past ``token`` (True), or ``timeout`` seconds (False)."""
        with self._cond:
            stop = self._generation.get("*", 0)
            return self._cond.wait_for(lambda: self._generation.get(channel, 0) != token
                                       or self._generation.get("*", 0) != stop, timeout)


class Database(ABC):
    """Connections, transactions and the dialect of one appliance database."""

    dialect: Dialect
    #: whether a commit in another process wakes this one's waiters (PostgreSQL's LISTEN/NOTIFY)
    wakes_other_processes: bool = False
    wakeups: Wakeups

    @abstractmethod
    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        """A serialised write transaction: commits when the block ends, rolls back on an exception."""

    @abstractmethod
    @contextmanager
    def reading(self) -> Iterator[Tx]:
        """A read-only transaction: several queries that see one snapshot."""

    def listen(self, *channels: str) -> None:  # noqa: B027  (SQLite: nothing reaches another process)
        """Let commits in other processes wake this one's waiters on ``channels`` (where the engine can)."""

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
        self.wakeups = Wakeups()
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
                tx = Tx(self._db, self.dialect)
                try:
                    yield tx
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                if tx.notes:
                    self.wakeups.bump(tx.notes)
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
    wakes_other_processes = True

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
        self.wakeups = Wakeups()
        self._listening: set[str] = set()
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Tx]:
        # one round trip: the commit's durability (as SQLite's synchronous=NORMAL unless durable: see the
        # module's docstring) and the write lock
        sync = "on" if durable else "off"
        with self._pool.connection() as conn:
            with conn.transaction():
                conn.execute(f"SET LOCAL synchronous_commit TO {sync}; "
                             f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
                tx = Tx(conn, self.dialect)
                yield tx
            if tx.notes:  # this process's waiters at once; others through NOTIFY
                self.wakeups.bump(tx.notes)

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield Tx(conn, self.dialect)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement on its own (autocommit: one round trip, a consistent snapshot of its own)."""
        with self._pool.connection() as conn:
            return list(conn.execute(_native(sql, self.dialect), tuple(params)).fetchall())

    def listen(self, *channels: str) -> None:
        """Wake this process's waiters on ``channels`` when any process commits a notification (a thread)."""
        self._listening.update(_identifier(c) for c in channels)
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="db-listen", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        import psycopg

        backoff = 0.5
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    for channel in sorted(self._listening):
                        conn.execute(f"LISTEN {channel}")
                    self.wakeups.interrupt()  # anything committed while not listening: look again
                    backoff = 0.5
                    while not self._closed.is_set():
                        got = {n.channel for n in conn.notifies(timeout=1.0)}
                        if got:
                            self.wakeups.bump(got)
            except Exception:  # the server restarting: listen again, waiters poll meanwhile
                log.warning("database notifications lost; listening again in %.1f s", backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
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
