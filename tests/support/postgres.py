"""A real PostgreSQL server for tests: Debian's binaries, ``initdb`` in a temporary folder, a loopback port.

Run as an unprivileged user: as root (CI, containers) the server runs as Debian's ``postgres`` user, which
the package creates; otherwise as the test's own user. Trust authentication on loopback only; each test
gets a database of its own (:meth:`PostgresServer.new_database`). Durability settings are the server's
defaults unless ``fast`` (tests that kill processes, not machines, lose nothing to ``fsync=off``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from tests.support.net import free_port, port_open
from tests.support.polling import wait_for


def bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def postgres_missing() -> str | None:
    """Why a server cannot be started here, or ``None``."""
    if bindir() is None:
        return "PostgreSQL is not installed: run `make setup` (Debian package postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[dev]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


class PostgresServer:
    """Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, *, fast: bool = True) -> None:
        self.fast = fast
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="portico-pg-"))
        self.data = self.folder / "data"
        self.user = "portico"
        self._process_user = "postgres" if os.geteuid() == 0 else None
        self._bin = bindir()

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self._process_user, "--"] if self._process_user else []
        return subprocess.run([*prefix, *argv], check=True, capture_output=True, text=True, timeout=120,
                              cwd=self.folder)

    def start(self) -> PostgresServer:
        assert self._bin is not None, postgres_missing()
        if self._process_user:
            entry = pwd.getpwnam(self._process_user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._run([str(self._bin / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust",
                   "--no-sync", "-E", "UTF8", "--locale=C"])
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200"
        if self.fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"),
                   "-o", options, "-w", "-t", "60", "start"])
        wait_for(lambda: port_open(self.port), timeout=30, message="PostgreSQL listening")
        return self

    def stop(self) -> None:
        if self._bin is not None and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run([str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
