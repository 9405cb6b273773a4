"""Taking a result back after it was sent: an IHE IOCM rejection note to every destination that got it.

``withdraw`` builds, for each destination that received some of a job's results, one Key Object
Selection "Rejected for Quality Reasons" (:mod:`inference.results.kos`) referencing exactly the
instances that destination received (the SEG, the SR, and the Secondary Capture images where it
takes them), stores it as a result of the job (kind ``kos``) and queues it to that destination only.
In the same transaction it stops whatever of the job was still waiting to go, marks the review
``WITHDRAWN`` (so the SEG is never a training label) and audits the decision (``reviewed``,
decision ``withdraw``) with who, why, where and the notes' UIDs.

What the destination does with the note is its own business (IHE IOCM): dcm4chee-arc hides the
rejected instances; Orthanc stores the note and keeps the instances; a PACS without IOCM support
stores it as one more object in the study. See ``docs/withdraw.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom

from appliance.audit import AuditEvent, AuditRecord
from appliance.review import Decision, ReviewConflict, ReviewNotFound, ReviewState
from appliance.settings import Settings
from appliance.store import OutboxState, Store
from inference.results.kos import KOS_SOP_CLASS_UID, RejectionReason, build_rejection_kos

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Withdrawal:
    job_id: int
    #: destination → SOP Instance UID of the rejection note queued to it
    notes: dict[str, str]
    #: instances each note rejects, by destination
    rejected: dict[str, list[str]]
    #: outbox rows of the job that had not gone yet and now never will
    cancelled: int


def withdraw(store: Store, settings: Settings, job_id: int, reviewer: str, reason: str, *, via: str,
             why: RejectionReason = RejectionReason.QUALITY) -> Withdrawal:
    """Withdraw job ``job_id``'s sent results (see the module docstring).

    Raises
    ------
    ValueError
        When ``reviewer`` or ``reason`` is blank.
    ReviewNotFound
        When there is no such job.
    ReviewConflict
        When it was withdrawn already or nothing of it was sent.
    """
    if not reviewer.strip():
        raise ValueError("a withdrawal needs the reviewer's name")
    if not reason.strip():
        raise ValueError("a withdrawal needs a reason")
    job = store.job(job_id)
    if job is None:
        raise ReviewNotFound(f"no job {job_id}")
    if any(r["state"] == ReviewState.WITHDRAWN
           for r in store.query("SELECT state FROM reviews WHERE job_id = ?", (job_id,))):
        raise ReviewConflict(f"job {job_id} was withdrawn already")
    sent: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for row in store.query("SELECT destination, sop_instance_uid, path FROM outbox WHERE job_id = ? AND state = ? "
                           "AND sop_class_uid != ? ORDER BY destination, sop_instance_uid",
                           (job_id, OutboxState.SENT, KOS_SOP_CLASS_UID)):
        sent[str(row["destination"])].append((str(row["sop_instance_uid"]), Path(row["path"])))
    if not sent:
        raise ReviewConflict(f"job {job_id} has no results that were sent; reject it in review instead")
    inference = settings.inference
    folder = store.results_dir / f"job-{job_id}"
    folder.mkdir(parents=True, exist_ok=True)
    notes: dict[str, tuple[str, Path]] = {}
    for destination, items in sent.items():
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for _, path in items]
        kos = build_rejection_kos(headers, inference.device, inference.uid_root,
                                  f"job/{job.study_uid}/{job.series_uid}/{job_id}/{destination}", why)
        path = folder / f"kos-{kos.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".tmp")
        kos.save_as(tmp, enforce_file_format=True)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        notes[destination] = (str(kos.SOPInstanceUID), path)

    now = time.time()
    with store.transaction() as db:
        row = db.execute("SELECT state FROM reviews WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None and row["state"] == ReviewState.WITHDRAWN:
            raise ReviewConflict(f"job {job_id} was withdrawn already")
        cancelled = db.execute(
            "UPDATE outbox SET state = ?, last_error = ? WHERE job_id = ? AND state IN (?, ?, ?)",
            (OutboxState.CANCELLED, "withdrawn", job_id, OutboxState.HELD, OutboxState.PENDING,
             OutboxState.FAILED)).rowcount
        for destination, (uid, path) in notes.items():
            db.execute("INSERT OR REPLACE INTO results (sop_instance_uid, job_id, kind, sop_class_uid, path, detail)"
                       " VALUES (?,?,?,?,?,?)", (uid, job_id, "kos", KOS_SOP_CLASS_UID, str(path),
                                                 _detail(destination, why, [u for u, _ in sent[destination]])))
            # a note already queued (a withdrawal retried after a crash) is the same object: keep its row
            db.execute("INSERT OR IGNORE INTO outbox (job_id, destination, sop_instance_uid, sop_class_uid, path, "
                       "state, created) VALUES (?,?,?,?,?,?,?)",
                       (job_id, destination, uid, KOS_SOP_CLASS_UID, str(path), OutboxState.PENDING, now))
        if row is None:
            db.execute("INSERT INTO reviews (job_id, state, held, created) VALUES (?,?,0,?)",
                       (job_id, ReviewState.WITHDRAWN, now))
        db.execute("UPDATE reviews SET state = ?, decided_at = ?, reviewer = ?, reason = ?, via = ? WHERE job_id = ?",
                   (ReviewState.WITHDRAWN, now, reviewer, reason, via, job_id))
        Store.audit_in(db, AuditRecord(AuditEvent.REVIEWED, job.study_uid, job_id, actor=reviewer, detail={
            "decision": str(Decision.WITHDRAW), "reason": reason, "via": via, "model": job.model,
            "rejection": str(why), "destinations": sorted(notes),
            "notes": {d: uid for d, (uid, _) in notes.items()},
            "rejected": {d: [u for u, _ in items] for d, items in sent.items()}, "cancelled": cancelled}))
    log.info("job %d withdrawn by %s (%s): rejection notes queued to %d destination(s), %d cancelled",
             job_id, reviewer, via, len(notes), cancelled)
    return Withdrawal(job_id, {d: uid for d, (uid, _) in notes.items()},
                      {d: [u for u, _ in items] for d, items in sent.items()}, cancelled)


def _detail(destination: str, why: RejectionReason, rejected: list[str]) -> str:
    return json.dumps({"destination": destination, "rejection": str(why), "rejected": rejected})
