"""The ``instances`` and ``quarantine`` tables: what was received, where its file is, and what was refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from appliance.db.engine import Tx
from dicom_router.ports import ReceivedInstance


def held(tx: Tx, sop_instance_uid: str) -> bool:
    return tx.one("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)) is not None


def add(tx: Tx, instance: ReceivedInstance, path: Path, size: int, now: float) -> bool:
    """Index a stored instance; ``False`` when it was indexed already (nothing changed)."""
    cur = tx.execute("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, "
                     "transfer_syntax, path, size, received_at) VALUES (?,?,?,?,?,?,?,?) "
                     "ON CONFLICT (sop_instance_uid) DO NOTHING",
                     (instance.sop_instance_uid, instance.study_instance_uid, instance.series_instance_uid,
                      instance.sop_class_uid, instance.transfer_syntax_uid, str(path), size, now))
    return cur.rowcount > 0


def indexed_paths(tx: Tx) -> set[str]:
    return {str(r["path"]) for r in tx.execute("SELECT path FROM instances")}


def unassigned_count(tx: Tx, study_uid: str) -> int:
    """Instances of the study not yet in a run."""
    return int(tx.scalar("SELECT COUNT(*) FROM instances WHERE study_uid = ? AND run_version IS NULL", (study_uid,)))


def assign_run(tx: Tx, study_uid: str, version: int) -> None:
    tx.execute("UPDATE instances SET run_version = ? WHERE study_uid = ? AND run_version IS NULL", (version, study_uid))


def paths_by_series(tx: Tx, study_uid: str, up_to_version: int) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for r in tx.execute("SELECT series_uid, path FROM instances WHERE study_uid = ? AND run_version <= ? "
                        "ORDER BY series_uid, path", (study_uid, up_to_version)):
        out.setdefault(r["series_uid"], []).append(Path(r["path"]))
    return out


def members_by_series(tx: Tx, study_uid: str, up_to_version: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in tx.execute("SELECT series_uid, sop_instance_uid FROM instances WHERE study_uid = ? "
                        "AND run_version <= ? ORDER BY sop_instance_uid", (study_uid, up_to_version)):
        out.setdefault(r["series_uid"], []).append(r["sop_instance_uid"])
    return out


def index(tx: Tx) -> list[dict[str, Any]]:
    return [dict(r) for r in tx.execute("SELECT study_uid, series_uid, sop_class_uid, path FROM instances "
                                        "ORDER BY study_uid, series_uid, path")]


def count(tx: Tx, study_uid: str | None = None) -> int:
    if study_uid is None:
        return int(tx.scalar("SELECT COUNT(*) FROM instances"))
    return int(tx.scalar("SELECT COUNT(*) FROM instances WHERE study_uid = ?", (study_uid,)))


def quarantine(tx: Tx, qid: str, path: Path, reason: str, calling_ae: str, peer: str) -> None:
    tx.execute("INSERT INTO quarantine (id, ts, reason, calling_ae, peer, path) VALUES (?,?,?,?,?,?)",
               (qid, time.time(), reason, calling_ae, peer, str(path)))


def quarantined(tx: Tx) -> list[dict[str, Any]]:
    return [dict(r) for r in tx.execute("SELECT * FROM quarantine ORDER BY ts")]
