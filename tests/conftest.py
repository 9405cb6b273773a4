"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer, postgres_missing

REPO = Path(__file__).resolve().parent.parent


def real_data_root() -> Path:
    """Where the real, licensed DICOM lives: ``$PORTICO_REAL_DATA`` or ``../shared/data``."""
    return Path(os.environ.get("PORTICO_REAL_DATA", REPO.parent / "shared" / "data"))


def real_data_present() -> bool:
    return (real_data_root() / "MANIFEST.md").is_file()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data`` (or ``$PORTICO_REAL_DATA``): real, licensed DICOM; skip when absent."""
    root = real_data_root()
    if not real_data_present():
        pytest.skip(f"real DICOM data not found at {root} (set PORTICO_REAL_DATA)")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a loopback port for the session; skips with the reason when there is none."""
    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Each backend in turn: ``None`` (SQLite in the data folder), then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture(autouse=True)
def _pynetdicom_acceptor_config() -> Iterator[None]:
    """Our SCP makes pynetdicom's storage negotiation unrestricted process-wide; other receivers must not inherit it."""
    from pynetdicom import _config

    before = _config.UNRESTRICTED_STORAGE_SERVICE
    yield
    _config.UNRESTRICTED_STORAGE_SERVICE = before
