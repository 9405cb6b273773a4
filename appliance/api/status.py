"""``/health``, ``/status``, ``/jobs`` and ``/audit``: read-only views of the store.

No patient identifiers leave here: job, study and series UIDs, states and errors only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.routing_explain import explain_stored
from appliance.store import Job
from dicom_router.errors import RulesError
from dicom_router.rules import load_rules

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
RECENT_JOBS = 10

StudyUid = Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)]


class Health(BaseModel):
    status: str


class JobSummary(BaseModel):
    id: int
    model: str
    state: str
    provider: str | None
    error: str | None


class DestinationStatus(BaseModel):
    #: outbox items for this destination by state
    states: dict[str, int]
    #: the error of the unsent item that failed most recently; ``None`` when none failed
    last_error: str | None
    #: epoch seconds when the earliest failed, still pending item is tried again
    next_retry_at: float | None


class Status(BaseModel):
    instances: int
    quarantined: int
    jobs: dict[str, int]
    outbox: dict[str, int]
    destinations: dict[str, DestinationStatus]
    recent_jobs: list[JobSummary]


class JobOut(BaseModel):
    id: int
    study_uid: str
    series_uid: str
    run_version: int
    rule: str
    model: str
    model_version: str | None
    state: str
    attempts: int
    error: str | None
    provider: str | None
    timings: dict[str, float]
    updated: float

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(id=job.id, study_uid=job.study_uid, series_uid=job.series_uid, run_version=job.run_version,
                   rule=job.rule, model=job.model, model_version=job.model_version, state=str(job.state),
                   attempts=job.attempts, error=job.error, provider=job.provider, timings=job.timings,
                   updated=job.updated)


class AuditRow(BaseModel):
    ts: float
    event: str
    study_uid: str | None
    job_id: int | None
    actor: str
    detail: dict[str, Any]


def public_router() -> APIRouter:
    """Routes that answer without a token."""
    router = APIRouter()

    @router.get("/health")
    def health() -> Health:
        return Health(status="ok")

    return router


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/status")
    def status() -> Status:
        return Status.model_validate(ctx.store.summary(recent=RECENT_JOBS))

    @router.get("/jobs")
    def jobs(study_uid: StudyUid = None) -> list[JobOut]:
        return [JobOut.of(j) for j in ctx.store.jobs(study_uid)]

    @router.get("/jobs/{job_id}")
    def job(job_id: int) -> JobOut:
        found = ctx.store.job(job_id)
        if found is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        return JobOut.of(found)

    @router.get("/studies/{study_uid}/routing")
    def routing(study_uid: Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]) -> dict[str, Any]:
        """Each series of a stored study, each rule, and why it matched or not (``portico rules explain``)."""
        try:
            rules = load_rules(ctx.settings.rules_path)
        except RulesError as exc:
            raise ApiError(409, "rules_invalid", "the routing rules file is invalid; see portico rules check") \
                from exc
        explanation = explain_stored(ctx.store, rules, study_uid)
        if explanation is None:
            raise ApiError(404, "not_found", "no stored instances of this study")
        return explanation.as_dict()

    @router.get("/audit")
    def audit(study_uid: StudyUid = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditRow]:
        """The ``limit`` most recent rows, newest first."""
        rows = ctx.store.audit_events(study_uid, limit)
        return [AuditRow(**r) for r in reversed(rows)]

    return router
