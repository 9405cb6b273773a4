"""``/health``, ``/status``, ``/jobs`` and ``/audit``: read-only views of the store.

No patient identifiers leave here: job, study and series UIDs, states and errors only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.store import Job

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


class Status(BaseModel):
    instances: int
    quarantined: int
    jobs: dict[str, int]
    outbox: dict[str, int]
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

    @router.get("/audit")
    def audit(study_uid: StudyUid = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditRow]:
        """The ``limit`` most recent rows, newest first."""
        rows = ctx.store.audit_events(study_uid, limit)
        return [AuditRow(**r) for r in reversed(rows)]

    return router
