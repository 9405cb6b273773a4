"""``/review``: finished jobs' results waiting for a reviewer, and approving or rejecting them (audited).

The reviewer recorded (and audited, ``via: api``) is the signed-in user the guard let in, never a name
typed in the body: a body that still names a ``reviewer`` is refused (422).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.identity import Principal
from appliance.review import Outcome, Review, ReviewError, Reviews, ReviewState
from appliance.review_images import KeyImage, ReviewImagesUnavailable, key_images
from appliance.withdraw import Withdrawal, withdraw

_STATES = {"all": None, **{s.lower(): s for s in ReviewState}}
StateQuery = Annotated[str, Query(pattern=f"^({'|'.join(_STATES)})$")]
Who = Annotated[Principal, Depends(principal_of)]
#: how a decision made here is recorded (the CLI's are ``cli``)
VIA = "api"


class ResultOut(BaseModel):
    sop_instance_uid: str
    kind: str
    sop_class_uid: str


class ReviewOut(BaseModel):
    job_id: int
    state: str
    held: bool
    study_uid: str
    series_uid: str
    model: str
    model_version: str | None
    finished: float
    reviewer: str | None
    reason: str
    decided_at: float | None

    @classmethod
    def of(cls, r: Review) -> ReviewOut:
        return cls(job_id=r.job.id, state=str(r.state), held=r.held, study_uid=r.job.study_uid,
                   series_uid=r.job.series_uid, model=r.job.model, model_version=r.job.model_version,
                   finished=r.job.updated, reviewer=r.reviewer, reason=r.reason, decided_at=r.decided_at)


class ReviewDetail(ReviewOut):
    results: list[ResultOut]
    measurements: list[dict[str, Any]]
    outbox: dict[str, int]
    #: the configured viewer's link to the study (``review.viewer_url``); ``None`` when none is set
    viewer_url: str | None = None

    @classmethod
    def of(cls, r: Review, viewer_url: str | None = None) -> ReviewDetail:
        return cls(**ReviewOut.of(r).model_dump(), measurements=r.measurements(), outbox=r.outbox,
                   results=[ResultOut(sop_instance_uid=f.sop_instance_uid, kind=f.kind, sop_class_uid=f.sop_class_uid)
                            for f in r.results], viewer_url=viewer_url)


class KeyImageOut(BaseModel):
    number: int
    #: 0-based index of the slice in the source series
    slice_index: int
    url: str


class WithdrawalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class WithdrawalOut(BaseModel):
    job_id: int
    state: str
    #: destination → SOP Instance UID of the rejection note queued to it
    notes: dict[str, str]
    rejected: dict[str, list[str]]
    cancelled: int

    @classmethod
    def of(cls, w: Withdrawal) -> WithdrawalOut:
        return cls(job_id=w.job_id, state=str(ReviewState.WITHDRAWN), notes=w.notes, rejected=w.rejected,
                   cancelled=w.cancelled)


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=1000)] = ""
    #: decide on results that were not held (they went out when the job finished)
    retrospective: bool = False


class RejectionIn(DecisionIn):
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class DecisionOut(BaseModel):
    job_id: int
    state: str
    held: bool
    released: int
    cancelled: int
    already_sent: int

    @classmethod
    def of(cls, o: Outcome) -> DecisionOut:
        return cls(job_id=o.job_id, state=str(o.state), held=o.held, released=o.released, cancelled=o.cancelled,
                   already_sent=o.already_sent)


def _error(exc: ReviewError | ValueError) -> ApiError:
    if isinstance(exc, ValueError):  # a blank reviewer or reason
        return ApiError(422, "invalid_request", str(exc))
    return ApiError(404 if exc.code == "not_found" else 409, exc.code, str(exc))


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/review")

    book = Reviews(ctx.store, ctx.settings.review)

    @router.get("")
    def listing(state: StateQuery = "held") -> list[ReviewOut]:
        """Finished jobs by review state, oldest first (``held``: waiting for a reviewer)."""
        return [ReviewOut.of(r) for r in book.find(_STATES[state])]

    @router.get("/{job_id}")
    def show(job_id: int) -> ReviewDetail:
        try:
            review = book.get(job_id)
        except ReviewError as exc:
            raise _error(exc) from None
        return ReviewDetail.of(review, ctx.settings.review.viewer_link(review.job.study_uid, review.job.series_uid))

    def _images(job_id: int) -> list[KeyImage]:
        job = ctx.store.job(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        try:
            return key_images(ctx.store, ctx.registry, job)
        except ReviewImagesUnavailable as exc:
            raise ApiError(404, "no_images", str(exc)) from None

    @router.get("/{job_id}/images")
    def images(job_id: int) -> list[KeyImageOut]:
        """The job's segmentation over its source images: key slices rendered from its own SEG."""
        return [KeyImageOut(number=k.number, slice_index=k.slice_index, url=f"/review/{job_id}/images/{k.number}")
                for k in _images(job_id)]

    @router.get("/{job_id}/images/{number}", response_class=FileResponse)
    def image(job_id: int, number: int) -> FileResponse:
        """One key image as PNG (segment colours, legend, AI banner)."""
        found = [k for k in _images(job_id) if k.number == number]
        if not found:
            raise ApiError(404, "not_found", f"job {job_id} has no key image {number}")
        return FileResponse(found[0].path, media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.post("/{job_id}/approve")
    def approve(job_id: int, who: Who, body: Annotated[DecisionIn | None, Body()] = None) -> DecisionOut:
        body = body or DecisionIn()
        try:
            return DecisionOut.of(book.approve(job_id, who.name, body.reason, via=VIA,
                                               retrospective=body.retrospective))
        except (ReviewError, ValueError) as exc:
            raise _error(exc) from None

    @router.post("/{job_id}/reject")
    def reject(job_id: int, body: RejectionIn, who: Who) -> DecisionOut:
        try:
            return DecisionOut.of(book.reject(job_id, who.name, body.reason, via=VIA,
                                              retrospective=body.retrospective))
        except (ReviewError, ValueError) as exc:
            raise _error(exc) from None

    @router.post("/{job_id}/withdraw")
    def withdraw_sent(job_id: int, body: WithdrawalIn, who: Who) -> WithdrawalOut:
        """Take back results already sent: an IOCM rejection note to every destination that got them."""
        try:
            return WithdrawalOut.of(withdraw(ctx.store, ctx.settings, job_id, who.name, body.reason, via=VIA))
        except (ReviewError, ValueError) as exc:
            raise _error(exc) from None

    return router
