"""``/audit/search`` and ``/audit/export``: the audit trail searched by actor, event, study and time; CSV out.

Both need ``audit.read`` (:mod:`appliance.roles`). An export is itself audited (``audit_exported``, as the
signed-in user, with the filters and the rows' id range), in the layout ``portico audit export`` writes.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from starlette.responses import Response

from appliance import audit_chain
from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.audit import AuditEvent, AuditRecord
from appliance.audit_chain import AuditQuery
from appliance.audit_csv import export_row, to_csv
from appliance.identity import Principal

Who = Annotated[Principal, Depends(principal_of)]
#: the most rows one export carries (narrow the time range for more)
EXPORT_MAX = 50_000
#: how an export made here is recorded
VIA = "api"

Actor = Annotated[str | None, Query(max_length=128)]
Event = Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_]+$")]
Study = Annotated[str | None, Query(max_length=64, pattern=r"^[0-9.]+$")]
Since = Annotated[float | None, Query(ge=0)]


class AuditHit(BaseModel):
    id: int
    ts: float
    event: str
    study_uid: str | None
    job_id: int | None
    actor: str
    detail: Any


class AuditPage(BaseModel):
    rows: list[AuditHit]
    #: pass as ``before`` for the next (older) page; ``None`` when this page is the last
    next_before: int | None
    #: every event kind there is (for the search form)
    events: list[str]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/audit")

    @router.get("/search")
    def search(actor: Actor = None, event: Event = None, study: Study = None, since: Since = None,
               until: Since = None, before: Annotated[int | None, Query(ge=1)] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 100) -> AuditPage:
        """Rows matching every filter given, newest first; ``study`` matches the end of the UID (short UID)."""
        query = AuditQuery(actor=actor or None, event=event or None, study=study or None, since=since, until=until)
        with ctx.store.reading() as tx:
            rows = audit_chain.search(tx, query, before_id=before, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return AuditPage(rows=[AuditHit(id=r["id"], ts=r["ts"], event=r["event"], study_uid=r["study_uid"],
                                        job_id=r["job_id"], actor=r["actor"], detail=r["detail"]) for r in rows],
                         next_before=rows[-1]["id"] if more and rows else None,
                         events=sorted(str(e) for e in AuditEvent))

    @router.get("/export")
    def export(who: Who, actor: Actor = None, event: Event = None, study: Study = None, since: Since = None,
               until: Since = None) -> Response:
        """The matching rows, oldest first, as CSV (the chain's columns included); at most :data:`EXPORT_MAX`."""
        query = AuditQuery(actor=actor or None, event=event or None, study=study or None, since=since, until=until)
        with ctx.store.reading() as tx:
            found = audit_chain.search(tx, query, limit=EXPORT_MAX)
        rows = [export_row(r) for r in reversed(found)]
        with ctx.store.transaction() as tx:
            ctx.store.audit_in(tx, AuditRecord(AuditEvent.AUDIT_EXPORTED, actor=who.name, detail={
                "via": VIA, "format": "csv", "rows": len(rows), "truncated": len(rows) == EXPORT_MAX,
                "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None,
                "filters": {"actor": actor, "event": event, "study": study, "since": since, "until": until}}))
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        return Response(to_csv(rows), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="portico-audit-{stamp}.csv"',
            "Cache-Control": "no-store"})

    return router
