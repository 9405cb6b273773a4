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

import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from appliance.audit import AuditEvent, AuditRecord
from appliance.db import jobs, outbox, reviews
from appliance.review import Decision, ReviewConflict, ReviewNotFound, ReviewState
from appliance.settings import Settings
from appliance.store import OUTBOX, OutboxState, ResultFile, Store
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
    with store.reading() as tx:
        review = reviews.get(tx, job_id)
        items = outbox.sent_items(tx, job_id, except_class=KOS_SOP_CLASS_UID)
    if review is not None and review["state"] == ReviewState.WITHDRAWN:
        raise ReviewConflict(f"job {job_id} was withdrawn already")
    sent: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for row in items:
        sent[str(row["destination"])].append((str(row["sop_instance_uid"]), Path(row["path"])))
    if not sent:
        raise ReviewConflict(f"job {job_id} has no results that were sent; reject it in review instead")
    inference = settings.inference
    folder = store.results_dir / f"job-{job_id}"
    folder.mkdir(parents=True, exist_ok=True)
    notes: dict[str, tuple[str, Path]] = {}
    for destination, objects in sent.items():
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for _, path in objects]
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
    with store.transaction() as tx:
        row = reviews.get(tx, job_id)
        if row is not None and row["state"] == ReviewState.WITHDRAWN:
            raise ReviewConflict(f"job {job_id} was withdrawn already")
        cancelled = outbox.cancel(tx, job_id, (OutboxState.HELD, OutboxState.PENDING, OutboxState.FAILED), "withdrawn")
        for destination, (uid, path) in notes.items():
            jobs.save_result(tx, job_id, ResultFile(uid, "kos", KOS_SOP_CLASS_UID, path,
                                                    _detail(destination, why, [u for u, _ in sent[destination]])))
            # a note already queued (a withdrawal retried after a crash) is the same object: keep its row
            outbox.add(tx, job_id, destination, uid, KOS_SOP_CLASS_UID, path, OutboxState.PENDING, now)
            tx.notify(OUTBOX)
        if row is None:
            reviews.start_retrospective(tx, job_id, ReviewState.WITHDRAWN, now)
        reviews.decide(tx, job_id, ReviewState.WITHDRAWN, now, reviewer, reason, via)
        Store.audit_in(tx, AuditRecord(AuditEvent.REVIEWED, job.study_uid, job_id, actor=reviewer, detail={
            "decision": str(Decision.WITHDRAW), "reason": reason, "via": via, "model": job.model,
            "rejection": str(why), "destinations": sorted(notes),
            "notes": {d: uid for d, (uid, _) in notes.items()},
            "rejected": {d: [u for u, _ in items] for d, items in sent.items()}, "cancelled": cancelled}))
    log.info("job %d withdrawn by %s (%s): rejection notes queued to %d destination(s), %d cancelled",
             job_id, reviewer, via, len(notes), cancelled)
    return Withdrawal(job_id, {d: uid for d, (uid, _) in notes.items()},
                      {d: [u for u, _ in items] for d, items in sent.items()}, cancelled)


def _detail(destination: str, why: RejectionReason, rejected: list[str]) -> dict[str, Any]:
    return {"destination": destination, "rejection": str(why), "rejected": rejected}
