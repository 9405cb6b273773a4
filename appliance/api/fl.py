"""``/fl``: this site's federated-learning status, and approval or rejection of waiting jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.fl import decide_job, layout_of
from appliance.identity import Principal
from fl_client.approvals import DecisionKind
from fl_client.errors import PolicyError
from fl_client.supervisor import site_status

#: NVFlare job ids are UUIDs; the id also names a file, so nothing that could leave its folder
JobId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Who = Annotated[Principal, Depends(principal_of)]


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=1000)] = ""
    #: the client app's content hash the approval binds (``portico fl inspect``, or the pending job's
    #: ``deployed`` content in ``/fl/status``); required to approve
    content_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class DecisionOut(BaseModel):
    job_id: str
    decision: str
    name: str
    submitter: str
    actor: str
    reason: str
    at: float
    client_app_sha256: str = ""
    review: dict[str, Any] = Field(default_factory=dict)


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/fl")

    @router.get("/status")
    def status() -> dict[str, Any]:
        """The supervisor's view while ``portico serve`` runs one, else what the files say."""
        supervisor = ctx.service.fl if ctx.service is not None else None
        if supervisor is not None:
            return supervisor.status()
        return site_status(layout_of(ctx.settings), privacy=ctx.settings.fl.privacy)

    def decide(job_id: str, decision: DecisionKind, body: DecisionIn | None, actor: str) -> DecisionOut:
        try:
            made = decide_job(ctx.settings, ctx.store, job_id, decision, actor, body.reason if body else "",
                              content_sha256=body.content_sha256 if body else None)
        except KeyError:
            raise ApiError(404, "not_found", f"FL job {job_id} has not asked to run at this site") from None
        except PolicyError as exc:
            raise ApiError(409, exc.code, str(exc)) from None
        return DecisionOut(job_id=made.job_id, decision=made.decision, name=made.name, submitter=made.submitter,
                           actor=made.actor, reason=made.reason, at=made.at,
                           client_app_sha256=made.client_app_sha256, review=made.review)

    @router.post("/jobs/{job_id}/approve")
    def approve(job_id: JobId, who: Who, body: Annotated[DecisionIn | None, Body()] = None) -> DecisionOut:
        return decide(job_id, "approved", body, who.name)

    @router.post("/jobs/{job_id}/reject")
    def reject(job_id: JobId, who: Who, body: Annotated[DecisionIn | None, Body()] = None) -> DecisionOut:
        return decide(job_id, "rejected", body, who.name)

    return router
