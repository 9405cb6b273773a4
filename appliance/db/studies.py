"""The ``studies`` and ``runs`` tables: a study's instance count and openness, and its hand-offs (runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.db.engine import Tx


@dataclass(frozen=True)
class OpenStudy:
    study_uid: str
    calling_ae: str
    last_received: float
    received_count: int
    expected_count: int | None


@dataclass(frozen=True)
class Run:
    study_uid: str
    version: int
    reason: str
    instance_count: int
    last_received: float
    created: float


def count_instance(tx: Tx, study_uid: str, calling_ae: str, now: float) -> None:
    """One more instance of ``study_uid`` arrived: (re)open the study."""
    tx.execute("INSERT INTO studies (study_uid, calling_ae, first_received, last_received, received_count) "
               "VALUES (?,?,?,?,1) ON CONFLICT (study_uid) DO UPDATE SET last_received = excluded.last_received,"
               " received_count = studies.received_count + 1, open = 1", (study_uid, calling_ae, now, now))


def count_echo(tx: Tx, study_uid: str) -> None:
    """One of our own results came back: counted (the PACS counts it), the study stays as it is."""
    tx.execute("UPDATE studies SET received_count = received_count + 1 WHERE study_uid = ?", (study_uid,))


def open_studies(tx: Tx) -> list[OpenStudy]:
    rows = tx.execute("SELECT study_uid, calling_ae, last_received, received_count, expected_count "
                      "FROM studies WHERE open = 1")
    return [OpenStudy(r["study_uid"], r["calling_ae"], r["last_received"], r["received_count"],
                      r["expected_count"]) for r in rows]


def set_expected_count(tx: Tx, study_uid: str, expected: int | None) -> None:
    tx.execute("UPDATE studies SET expected_count = ? WHERE study_uid = ?", (expected, study_uid))


def locked(tx: Tx, study_uid: str) -> Any:
    """The study's row, locked for this transaction (``None`` for an unknown study)."""
    return tx.one(f"SELECT run_version, last_received, received_count FROM studies WHERE study_uid = ?"
                  f"{tx.for_update}", (study_uid,))


def close(tx: Tx, study_uid: str) -> None:
    tx.execute("UPDATE studies SET open = 0 WHERE study_uid = ?", (study_uid,))


def start_run(tx: Tx, run: Run) -> None:
    """Record ``run`` and close the study at its version; the PACS's count is asked afresh for the next."""
    tx.execute("UPDATE studies SET run_version = ?, open = 0, expected_count = NULL WHERE study_uid = ?",
               (run.version, run.study_uid))
    tx.execute("INSERT INTO runs (study_uid, version, created, reason, instance_count, last_received) "
               "VALUES (?,?,?,?,?,?)", (run.study_uid, run.version, run.created, run.reason, run.instance_count,
                                        run.last_received))


def _run(r: Any) -> Run:
    return Run(r["study_uid"], r["version"], r["reason"], r["instance_count"], r["last_received"], r["created"])


def unrouted(tx: Tx) -> list[Run]:
    return [_run(r) for r in tx.execute("SELECT * FROM runs WHERE routed = 0 ORDER BY created")]


def run(tx: Tx, study_uid: str, version: int) -> Run | None:
    row = tx.one("SELECT * FROM runs WHERE study_uid = ? AND version = ?", (study_uid, version))
    return None if row is None else _run(row)


def mark_routed(tx: Tx, run: Run) -> None:
    tx.execute("UPDATE runs SET routed = 1 WHERE study_uid = ? AND version = ?", (run.study_uid, run.version))
