"""The ``instances`` and ``quarantine`` tables: what was received, where its file is, and what was refused."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from appliance.db.engine import Database, Tx
from dicom_router.ports import ReceivedInstance


def known(db: Database, sop_instance_uid: str) -> tuple[bool, bool]:
    """(held as an instance, one of our own results): one statement, outside any transaction."""
    (row,) = db.query("SELECT EXISTS (SELECT 1 FROM instances WHERE sop_instance_uid = ?) AS held, "
                      "EXISTS (SELECT 1 FROM results WHERE sop_instance_uid = ?) AS echoed",
                      (sop_instance_uid, sop_instance_uid))
    return bool(row[0]), bool(row[1])


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


def series_of(tx: Tx, study_uid: str) -> list[dict[str, Any]]:
    """Each series of a study: its UID, instance count, bytes, SOP classes, and when its first and last arrived."""
    out: dict[str, dict[str, Any]] = {}
    for r in tx.execute("SELECT series_uid, sop_class_uid, COUNT(*) AS n, SUM(size) AS bytes, "
                        "MIN(received_at) AS first, MAX(received_at) AS last FROM instances WHERE study_uid = ? "
                        "GROUP BY series_uid, sop_class_uid ORDER BY series_uid, sop_class_uid", (study_uid,)):
        entry = out.setdefault(str(r["series_uid"]), {"series_uid": str(r["series_uid"]), "instances": 0,
                                                      "bytes": 0, "sop_classes": [], "first_received": None,
                                                      "last_received": None})
        entry["instances"] += int(r["n"])
        entry["bytes"] += int(r["bytes"] or 0)
        entry["sop_classes"].append(str(r["sop_class_uid"]))
        first, last = float(r["first"]), float(r["last"])
        entry["first_received"] = first if entry["first_received"] is None else min(first, entry["first_received"])
        entry["last_received"] = last if entry["last_received"] is None else max(last, entry["last_received"])
    return list(out.values())


def received_per_hour(tx: Tx, start: int, hours: int) -> list[int]:
    """Instances received in each of ``hours`` hours from ``start`` (whole epoch seconds), oldest hour first.

    The hour is whole-second arithmetic (integer division on both engines): an instance within half a second
    of an hour's edge may be counted in the hour beside it.
    """
    counts = [0] * hours
    for r in tx.execute("SELECT (CAST(received_at AS BIGINT) - ?) / 3600 AS bucket, COUNT(*) AS n FROM instances "
                        "WHERE received_at >= ? AND received_at < ? GROUP BY 1", (start, start, start + hours * 3600)):
        hour = int(r["bucket"])
        if 0 <= hour < hours:
            counts[hour] += int(r["n"])
    return counts
