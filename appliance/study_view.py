"""The dashboard's studies: a paged, filtered list, one study's way through the house, and an operator's actions.

A study goes received → complete (handed off as a run) → routed (jobs made, or none matched) → inferred
(every job done) → reviewed (when its results were held) → sent (every result at its destinations); a
failed job or a result given up on makes it ``failed``. Nothing here reads a patient value: UIDs, AE titles,
counts, states, times and value-free errors only (modality is not in the index: the study page shows it per
series from the routing explanation, which reads one header per series).

The actions (retry a failed job, send a study's results again) are audited as the user who asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from appliance.audit import AuditEvent, AuditRecord
from appliance.db import instances, jobs, outbox, studies
from appliance.db.jobs import Job, JobState
from appliance.db.studies import STUDY_STATES, StudyFilter
from appliance.handoff import short
from appliance.review import ReviewState
from appliance.store import Store

__all__ = ["STAGES", "STUDY_STATES", "ActionRefused", "StudyFilter", "StudyPage", "list_studies", "resend_results",
           "retry_job", "short_uid", "split_error", "study_detail"]

#: the stages of a study, in order
STAGES = ("received", "complete", "routed", "inferred", "reviewed", "sent")
#: a review state whose results may be sent again (a rejected or withdrawn job's never are)
_RESENDABLE_REVIEWS = (str(ReviewState.APPROVED),)


class ActionRefused(Exception):
    """An action that cannot be done: ``status`` (HTTP), a stable ``code`` and a value-free message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StudyPage:
    total: int
    offset: int
    limit: int
    studies: list[dict[str, Any]]


def short_uid(uid: str) -> str:
    """The last 12 characters of a UID, as the logs show it (:func:`appliance.handoff.short`)."""
    return short(uid)


def split_error(error: str | None) -> tuple[str | None, str | None]:
    """A job's stored error (``code: message``) as (code, message)."""
    if not error:
        return None, None
    code, sep, message = error.partition(": ")
    if not sep or " " in code:
        return None, error
    return code, message


def _stage(state: str, at: float | None) -> dict[str, Any]:
    return {"state": state, "at": at}


def stages(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each stage's state (``done``, ``waiting``, ``failed``, ``skipped``, ``pending``) and when it was reached."""
    n = {k: int(row[k] or 0) for k in ("runs", "unrouted", "jobs", "jobs_active", "jobs_failed", "reviews_decided",
                                       "outbox", "outbox_held", "outbox_pending", "outbox_failed", "outbox_sent")}
    out: dict[str, dict[str, Any]] = {"received": _stage("done", row["first_received"])}
    out["complete"] = _stage("done", row["complete_at"]) if n["runs"] else _stage("waiting", None)
    routed = n["runs"] > 0 and n["unrouted"] == 0
    out["routed"] = _stage("done", row["routed_at"]) if routed else \
        _stage("waiting" if n["runs"] else "pending", None)
    if routed and n["jobs"] == 0:  # no rule matched: nothing further happens to this study
        for stage in ("inferred", "reviewed", "sent"):
            out[stage] = _stage("skipped", None)
        return out
    if n["jobs_failed"]:
        out["inferred"] = _stage("failed", None)
    elif n["jobs_active"] or not routed:
        out["inferred"] = _stage("waiting" if routed else "pending", None)
    else:
        out["inferred"] = _stage("done", row["inferred_at"])
    inferred = out["inferred"]["state"] == "done"
    if n["outbox_held"]:
        out["reviewed"] = _stage("waiting", None)
    elif n["reviews_decided"]:
        out["reviewed"] = _stage("done", row["reviewed_at"])
    else:
        # results queued without a hold, or every job done without one: no review was asked for
        out["reviewed"] = _stage("skipped" if inferred or n["outbox"] else "pending", None)
    if n["outbox_failed"]:
        out["sent"] = _stage("failed", None)
    elif n["outbox_pending"] or n["outbox_held"]:
        out["sent"] = _stage("waiting", None)
    elif n["outbox_sent"]:
        out["sent"] = _stage("done", row["sent_at"])
    else:
        out["sent"] = _stage("skipped" if inferred else "pending", None)
    return out


def _row(row: dict[str, Any], models: list[str]) -> dict[str, Any]:
    uid = str(row["study_uid"])
    return {"study_uid": uid, "short_uid": short_uid(uid), "calling_ae": row["calling_ae"],
            "first_received": float(row["first_received"]), "last_received": float(row["last_received"]),
            "receiving": bool(row["open"]), "instance_count": int(row["instance_count"] or 0),
            "series_count": int(row["series_count"] or 0), "state": str(row["state"]),
            "jobs": int(row["jobs"] or 0), "failed_jobs": int(row["jobs_failed"] or 0), "models": models,
            "stages": stages(row)}


def list_studies(store: Store, flt: StudyFilter, limit: int, offset: int) -> StudyPage:
    """The page of studies matching ``flt`` from ``offset``, most recently received first."""
    with store.reading() as tx:
        total, rows = studies.summaries(tx, flt, limit, offset)
        models: dict[str, list[str]] = {}
        for j in jobs.of_studies(tx, [str(r["study_uid"]) for r in rows]):
            names = models.setdefault(str(j["study_uid"]), [])
            if j["model"] not in names:
                names.append(str(j["model"]))
    return StudyPage(total, offset, limit, [_row(r, models.get(str(r["study_uid"]), [])) for r in rows])


def filter_choices(store: Store) -> dict[str, list[str]]:
    """The values the list's filters offer: sending AE titles, models, states."""
    with store.reading() as tx:
        return {"calling_ae": studies.senders(tx), "model": jobs.models_used(tx), "state": list(STUDY_STATES)}


def _job(job: Job, created: float | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    code, message = split_error(job.error)
    return {"id": job.id, "run_version": job.run_version, "rule": job.rule, "model": job.model,
            "model_version": job.model_version, "series_uid": job.series_uid, "state": str(job.state),
            "attempts": job.attempts, "error_code": code, "error_message": message, "provider": job.provider,
            "progress": list(job.progress) if job.progress else None, "timings": job.timings,
            "created": created, "updated": job.updated, "results": results}


def study_detail(store: Store, study_uid: str) -> dict[str, Any] | None:
    """One study: its row as listed, its series, runs, jobs (with their results) and outbox rows; ``None``
    for a study never received."""
    with store.reading() as tx:
        row = studies.summary(tx, study_uid)
        if row is None:
            return None
        found = jobs.listed(tx, study_uid)
        created = jobs.created_at(tx, [j.id for j in found])
        made = {j.id: [{"sop_instance_uid": r.sop_instance_uid, "kind": r.kind, "sop_class_uid": r.sop_class_uid}
                       for r in jobs.results(tx, j.id)] for j in found}
        out = {
            **_row(row, sorted({j.model for j in found})),
            "series": instances.series_of(tx, study_uid),
            "runs": [{"version": r.version, "reason": r.reason, "instances": r.instance_count, "created": r.created}
                     for r in studies.runs_of(tx, study_uid)],
            "job_list": [_job(j, created.get(j.id), made[j.id]) for j in found],
            "outbox": outbox.of_study(tx, study_uid),
        }
    return out


def retry_job(store: Store, job_id: int, actor: str, via: str) -> Job:
    """Put a FAILED job back in the queue with a fresh attempt count; audited as ``actor``."""
    with store.transaction() as tx:
        job = jobs.get(tx, job_id)
        if job is None:
            raise ActionRefused(404, "not_found", f"no job {job_id}")
        if job.state is not JobState.FAILED:
            raise ActionRefused(409, "not_failed", f"job {job_id} is {job.state}: only a failed job is retried")
        jobs.reset_for_rerun(tx, job_id, time.time())
        code, _ = split_error(job.error)
        store.audit_in(tx, AuditRecord(AuditEvent.JOB_RETRIED, job.study_uid, job_id, actor=actor, detail={
            "state": str(JobState.PENDING), "previous_error": job.error, "previous_code": code,
            "attempts": job.attempts, "via": via}))
        retried = jobs.get(tx, job_id)
    assert retried is not None  # updated in this transaction
    return retried


def resend_results(store: Store, study_uid: str, destination: str | None, actor: str, via: str) -> dict[str, int]:
    """Queue the study's results again (for ``destination``, or every one); audited as ``actor``.

    Sent, given-up and waiting items are due now with a fresh attempt count; results held for review, or
    rejected or withdrawn in review, are not touched. Returns the items queued per destination.
    """
    with store.transaction() as tx:
        if studies.summary(tx, study_uid) is None:
            raise ActionRefused(404, "not_found", "no such study")
        counts = outbox.resend(tx, study_uid, destination, _RESENDABLE_REVIEWS)
        if not counts:
            where = f" for {destination}" if destination else ""
            raise ActionRefused(409, "nothing_to_resend", f"the study has no results to send again{where}")
        store.audit_in(tx, AuditRecord(AuditEvent.RESULTS_RESENT, study_uid, actor=actor, detail={
            "destination": destination, "items": counts, "via": via}))
    return counts
