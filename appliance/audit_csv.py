"""Audit rows as an auditor gets them (``portico audit export``, the dashboard's export): one layout for both."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterable, Mapping
from contextlib import suppress
from typing import Any

from appliance.db.engine import Row

#: the columns of an export, in order
COLUMNS = ("id", "time", "ts", "event", "study_uid", "job_id", "actor", "detail", "prev_hash", "hash")


def export_row(r: Row) -> dict[str, Any]:
    """One audit row (its columns, ``detail`` as stored or parsed) as exported: with its UTC time, detail parsed."""
    detail: Any = r["detail"]
    if isinstance(detail, str):
        with suppress(ValueError):  # a tampered row: exported as it is
            detail = json.loads(detail)
    return {"id": r["id"], "time": dt.datetime.fromtimestamp(r["ts"], dt.UTC).isoformat(timespec="milliseconds"),
            "ts": r["ts"], "event": r["event"], "study_uid": r["study_uid"], "job_id": r["job_id"],
            "actor": r["actor"], "detail": detail, "prev_hash": r["prev_hash"], "hash": r["hash"]}


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """:func:`export_row` rows as CSV with a header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        # ts as repr: the exact float the hash covers; detail as its canonical JSON
        writer.writerow([row["id"], row["time"], repr(row["ts"]), row["event"], row["study_uid"] or "",
                         "" if row["job_id"] is None else row["job_id"], row["actor"],
                         json.dumps(row["detail"], sort_keys=True), row["prev_hash"] or "", row["hash"] or ""])
    return out.getvalue()
