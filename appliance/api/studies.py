"""``/studies``, ``/overview`` and an operator's actions: retry a failed job, send a study's results again.

No patient identifiers leave here: study, series and SOP Instance UIDs, AE titles, counts, states, times
and value-free errors. The actions are audited as the signed-in user (``via: api``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.api.status import UID_PATTERN, JobOut
from appliance.identity import Principal
from appliance.overview import Overview
from appliance.study_view import (
    STUDY_STATES,
    ActionRefused,
    StudyFilter,
    filter_choices,
    list_studies,
    resend_results,
    retry_job,
    study_detail,
)

Who = Annotated[Principal, Depends(principal_of)]
StudyPath = Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]
#: how an action taken here is recorded (the CLI's are ``cli``)
VIA = "api"
MAX_PAGE = 200


class StageOut(BaseModel):
    #: ``done``, ``waiting``, ``failed``, ``skipped`` or ``pending``
    state: str
    #: when the stage was reached (epoch seconds), when known
    at: float | None


class StudyRow(BaseModel):
    study_uid: str
    short_uid: str
    calling_ae: str
    first_received: float
    last_received: float
    #: still open: more instances may come before it is handed off (again)
    receiving: bool
    instance_count: int
    series_count: int
    #: the furthest stage reached, ``no_match`` or ``failed``
    state: str
    jobs: int
    failed_jobs: int
    models: list[str]
    stages: dict[str, StageOut]


class StudyPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    studies: list[StudyRow]
    #: the values the filters offer (AE titles and models seen, states)
    choices: dict[str, list[str]]


class SeriesOut(BaseModel):
    series_uid: str
    instances: int
    bytes: int
    sop_classes: list[str]
    first_received: float | None
    last_received: float | None


class RunOut(BaseModel):
    version: int
    reason: str
    instances: int
    created: float


class ResultOut(BaseModel):
    sop_instance_uid: str
    kind: str
    sop_class_uid: str


class StudyJobOut(BaseModel):
    id: int
    run_version: int
    rule: str
    model: str
    model_version: str | None
    series_uid: str
    state: str
    attempts: int
    error_code: str | None
    error_message: str | None
    provider: str | None
    #: slices inferred so far and of how many, while it runs
    progress: list[int] | None
    timings: dict[str, float]
    created: float | None
    updated: float
    results: list[ResultOut]


class OutboxRowOut(BaseModel):
    """One outbox row as the dashboard shows it (a study's rows add the destination, a destination's the study)."""

    id: int
    job_id: int
    sop_instance_uid: str
    sop_class_uid: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created: float
    sent_at: float | None


class OutboxOut(OutboxRowOut):
    destination: str


class StudyDetailOut(StudyRow):
    series: list[SeriesOut]
    runs: list[RunOut]
    job_list: list[StudyJobOut]
    outbox: list[OutboxOut]


class ResendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: one destination; ``None``: every destination the study's results went to
    destination: Annotated[str | None, Field(min_length=1, max_length=64)] = None


class ResendOut(BaseModel):
    study_uid: str
    #: items queued again per destination
    queued: dict[str, int]


class DestinationDepth(BaseModel):
    pending: int
    held: int
    failed: int
    #: when the oldest item still to send was queued (epoch seconds)
    oldest_pending: float | None


class DiskOut(BaseModel):
    free_bytes: int | None
    total_bytes: int | None
    min_free_bytes: int


class ChartOut(BaseModel):
    #: the start of the first hour (epoch seconds)
    start: float
    hour_seconds: int
    instances: list[int]
    studies: list[int]


class OverviewOut(BaseModel):
    now: float
    jobs: dict[str, int]
    outbox: dict[str, DestinationDepth]
    disk: DiskOut
    sessions_loaded: int | None
    received: ChartOut


def _refused(exc: ActionRefused) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    service = ctx.service
    overview = Overview(ctx.store, ctx.settings.data_dir, ctx.settings.storage.min_free_mb * 2**20,
                        tuple(d.name for d in ctx.settings.dispatch.destinations),
                        None if service is None else lambda: len(service.sessions))

    @router.get("/studies")
    def studies(since: Annotated[float | None, Query(ge=0)] = None,
                until: Annotated[float | None, Query(ge=0)] = None,
                state: Annotated[str | None, Query(pattern=f"^({'|'.join(STUDY_STATES)})$")] = None,
                calling_ae: Annotated[str | None, Query(max_length=16)] = None,
                model: Annotated[str | None, Query(max_length=64)] = None,
                failed: bool = False,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
                offset: Annotated[int, Query(ge=0)] = 0) -> StudyPageOut:
        """Studies received, most recent first, a page at a time; each with its stages and their times."""
        flt = StudyFilter(since=since, until=until, state=state, calling_ae=calling_ae or None, model=model or None,
                          failed_only=failed)
        page = list_studies(ctx.store, flt, limit, offset)
        return StudyPageOut(total=page.total, offset=page.offset, limit=page.limit,
                            studies=[StudyRow.model_validate(s) for s in page.studies],
                            choices=filter_choices(ctx.store))

    @router.get("/studies/{study_uid}")
    def study(study_uid: StudyPath) -> StudyDetailOut:
        """One study: series, runs, jobs with their errors and results, outbox rows (routing: ``…/routing``)."""
        found = study_detail(ctx.store, study_uid)
        if found is None:
            raise ApiError(404, "not_found", "no such study")
        return StudyDetailOut.model_validate(found)

    @router.post("/studies/{study_uid}/resend")
    def resend(study_uid: StudyPath, who: Who, body: Annotated[ResendIn | None, Body()] = None) -> ResendOut:
        """Send the study's results again (to one destination, or all): due now, tried afresh; audited."""
        destination = (body or ResendIn()).destination
        try:
            queued = resend_results(ctx.store, study_uid, destination, who.name, VIA)
        except ActionRefused as exc:
            raise _refused(exc) from None
        return ResendOut(study_uid=study_uid, queued=queued)

    @router.post("/jobs/{job_id}/retry")
    def retry(job_id: int, who: Who) -> JobOut:
        """Put a failed job back in the queue with a fresh attempt count; audited."""
        try:
            return JobOut.of(retry_job(ctx.store, job_id, who.name, VIA))
        except ActionRefused as exc:
            raise _refused(exc) from None

    @router.get("/overview")
    def overview_now() -> OverviewOut:
        """Jobs by state, outbox per destination, disk, and what arrived per hour (cheap: poll it)."""
        snapshot: dict[str, Any] = overview.snapshot()
        return OverviewOut.model_validate(snapshot)

    return router
