"""``/health/live``, ``/health/ready`` and ``/metrics``: what supervisors, load balancers and Prometheus ask.

The health routes are public (a probe carries no credentials) and say nothing about patients: check
names, true/false and value-free details. ``/metrics`` is guarded by the API's guard
(:class:`appliance.api.permissions.Open.METRICS`): ``api.metrics.hosts`` and, when set, ``api.metrics.token``.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from appliance.api.context import ApiContext
from appliance.metrics import CONTENT_TYPE


class CheckOut(BaseModel):
    ok: bool
    detail: str


class ReadyOut(BaseModel):
    #: ``ready`` or ``not_ready``
    status: str
    checks: dict[str, CheckOut]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/health/live")
    def live() -> dict[str, str]:
        """The process answers: nothing else is checked (a supervisor restarts it when this fails)."""
        return {"status": "ok"}

    @router.get("/health/ready", response_model=ReadyOut)
    def ready() -> JSONResponse:
        """Ready for work: database, disk above the watermark, listeners up; 503 when not."""
        checks = ctx.readiness.checks()
        ok = all(c.ok for c in checks)
        body = ReadyOut(status="ready" if ok else "not_ready",
                        checks={c.name: CheckOut(ok=c.ok, detail=c.detail) for c in checks})
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @router.get("/metrics")
    def metrics() -> Response:
        """Prometheus's text format, from this process's own registry."""
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE)

    return router
