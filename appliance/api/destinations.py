"""``/destinations`` and ``/peers``: reachability, TLS and outbox per destination; C-ECHO on demand; pause/resume.

Pausing and resuming are audited as the signed-in user (``via: api``); a C-ECHO changes nothing and is not.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.auth import principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.api.studies import OutboxRowOut
from appliance.db.outbox import OutboxState
from appliance.destinations import ActionRefused, Echoes, destination_outbox, overview, pause, resume
from appliance.identity import Principal

Who = Annotated[Principal, Depends(principal_of)]
DestinationName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
#: an AE title: up to 16 characters, no backslash or control characters
AeTitle = Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[^\\\x00-\x1f]{1,16}$")]
VIA = "api"
MAX_PAGE = 200


class PauseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: why (recorded in the audit and shown on the page)
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class ResumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str | None, Field(max_length=500)] = None


class OutboxBox(BaseModel):
    states: dict[str, int]
    last_error: str | None
    #: the earliest time a failed item is tried again
    next_retry_at: float | None
    oldest_pending: float | None
    #: when an item was last sent there
    last_sent: float | None


class CertificateOut(BaseModel):
    subject: str
    issuer: str
    not_before: float
    not_after: float
    days_left: int
    valid_now: bool


class CertificateFileOut(BaseModel):
    setting: str
    path: str
    certificates: list[CertificateOut]
    #: certificates in the file beyond those listed
    more: int
    problem: str | None


class TlsOut(BaseModel):
    #: ``required``, ``https`` or ``off``
    mode: str
    summary: str
    server_name: str | None = None
    auth: str | None = None
    binding: str | None = None
    files: list[CertificateFileOut]


class PauseOut(BaseModel):
    paused_at: float
    actor: str
    reason: str


class DestinationOut(BaseModel):
    name: str
    #: ``dimse``, ``stow``, or ``unknown`` (items queued for a destination no longer configured)
    kind: str
    configured: bool
    address: str | None
    #: how reachability is tried: ``C-ECHO``, ``TCP connect``, or ``None``
    echo: str | None
    paused: PauseOut | None
    tls: TlsOut | None
    outbox: OutboxBox


class PeerOut(BaseModel):
    ae_title: str
    hosts: list[str]
    #: the peer's SCP we query (C-FIND), as ``AE@host:port``; ``None``: not queried
    query: str | None
    studies: int
    last_received: float | None
    tls: TlsOut


class DestinationsOut(BaseModel):
    destinations: list[DestinationOut]
    peers: list[PeerOut]
    #: our AE title (what a destination or peer must know us as)
    calling_ae: str


class EchoOut(BaseModel):
    target: str
    method: str
    ok: bool
    detail: str
    at: float
    seconds: float


class PausedOut(BaseModel):
    destination: str
    paused: bool
    #: PENDING items waiting for it
    waiting: int


class OutboxItemOut(OutboxRowOut):
    study_uid: str


class OutboxPageOut(BaseModel):
    destination: str
    total: int
    offset: int
    limit: int
    items: list[OutboxItemOut]


def _refused(exc: ActionRefused) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter()
    echoes = Echoes(ctx.settings)

    @router.get("/destinations")
    def destinations() -> DestinationsOut:
        """Each destination (outbox, pause, TLS) and each peer (last received, TLS); no network is touched."""
        found: dict[str, Any] = overview(ctx.store, ctx.settings)
        return DestinationsOut.model_validate(found)

    @router.get("/destinations/{name}/outbox")
    def outbox(name: DestinationName,
               state: Annotated[str | None, Query(pattern=f"^({'|'.join(OutboxState)})$")] = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
               offset: Annotated[int, Query(ge=0)] = 0) -> OutboxPageOut:
        """The destination's outbox rows, newest first (no file paths)."""
        return OutboxPageOut.model_validate(destination_outbox(ctx.store, name, state, limit, offset))

    @router.post("/destinations/{name}/echo")
    def echo_destination(name: DestinationName) -> EchoOut:
        """C-ECHO a DIMSE destination (a TCP connection to a STOW-RS one) now; answers in seconds."""
        try:
            return EchoOut.model_validate(echoes.destination(name))
        except ActionRefused as exc:
            raise _refused(exc) from None

    @router.post("/peers/{ae_title}/echo")
    def echo_peer(ae_title: AeTitle) -> EchoOut:
        """C-ECHO the SCP of a peer we query (its ``query_port``)."""
        try:
            return EchoOut.model_validate(echoes.peer(ae_title))
        except ActionRefused as exc:
            raise _refused(exc) from None

    @router.post("/destinations/{name}/pause")
    def pause_destination(name: DestinationName, body: PauseIn, who: Who) -> PausedOut:
        """Send nothing more to the destination until resumed; its items wait. Audited."""
        try:
            out = pause(ctx.store, ctx.settings, name, who.name, body.reason.strip() or "-", VIA)
        except ActionRefused as exc:
            raise _refused(exc) from None
        return PausedOut(destination=name, paused=True, waiting=out["waiting"])

    @router.post("/destinations/{name}/resume")
    def resume_destination(name: DestinationName, who: Who,
                           body: Annotated[ResumeIn | None, Body()] = None) -> PausedOut:
        """Send to the destination again: what waits goes when due, overdue items at once. Audited."""
        try:
            out = resume(ctx.store, ctx.settings, name, who.name, VIA, (body.reason or "").strip() or None
                         if body is not None else None)
        except ActionRefused as exc:
            raise _refused(exc) from None
        return PausedOut(destination=name, paused=False, waiting=out["waiting"])

    return router
