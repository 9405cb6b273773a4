"""``POST /dicom-web/studies[/{study}]``: STOW-RS ingest, the DICOMweb twin of our C-STORE SCP.

The guard has already named the sender (its own token, from its own addresses). At most
``router.stow_max_concurrent`` requests are handled at once: one more is answered 503 with
``Retry-After`` before its body is read; a body that stalls for ``router.stow_idle_seconds`` is cut
short with 408. The body is streamed (never held whole): chunks are handed
to :class:`dicom_router.stow.StowIngest` about a MiB at a time in a worker thread, which stores each
part as it completes (fsync'd before the answer). A request cut short (over
``router.stow_max_request_mb`` or ``stow_max_parts``, or broken framing) after some parts were
handled answers its status with the DICOM JSON of what was stored and refused so far, and says why
in a ``Warning`` header; before any part, it answers ``{code, message, request_id}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from appliance.audit import AuditEvent, AuditRecord
from appliance.metrics import Ingest, MeteredSink
from dicom_router.stow import DICOM_JSON_MEDIA_TYPE, StowIngest, StowLimits, StowRequestError, StowResult
from dicom_router.stow_budget import QuarantineBudget
from dicom_router.uids import is_valid_uid

log = logging.getLogger(__name__)

StudyPath = Annotated[str, Path(max_length=64)]

#: chunks handed to the worker thread together (one thread hop per MiB, not per 64 KiB)
BATCH_BYTES = 2**20
#: what a refused client is told to wait before trying again
RETRY_AFTER_SECONDS = 5
#: a response before the whole body was read: the connection cannot be reused
_CLOSE = {"Connection": "close"}


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/dicom-web")
    settings = ctx.settings.router
    limit = settings.stow_max_request_mb * 2**20
    limits = StowLimits.from_settings(settings)

    def budget_spent(sender: str) -> None:
        ctx.store.record(AuditRecord(AuditEvent.QUARANTINE_BUDGET_SPENT, actor=sender, detail={
            "mb_per_hour": settings.stow_quarantine_mb_per_hour,
            "parts_per_hour": settings.stow_quarantine_parts_per_hour}))

    budget = QuarantineBudget.from_settings(settings, on_spent=budget_spent)
    sink = MeteredSink(ctx.store, ctx.metrics, Ingest.STOW)
    # handlers run on the event loop's one thread: a plain counter is enough
    active = [0]

    async def receive(request: Request, ingest: StowIngest) -> bool:
        """Feed the body to ``ingest``; whether it was read to its end."""
        batch: list[bytes] = []
        batched = size = 0
        async for chunk in _with_idle_timeout(request.stream(), settings.stow_idle_seconds):
            if chunk is None:
                await run_in_threadpool(ingest.feed, batch)
                ingest.refuse(408, "timeout", f"no data for {settings.stow_idle_seconds:g} s "
                                              "(router.stow_idle_seconds); the rest was not read")
                log.warning("STOW-RS from %s: the body stalled for %g s; cut short", request.state.sender,
                            settings.stow_idle_seconds)
                return False
            size += len(chunk)
            if size > limit:  # parts complete within the first `limit` bytes are stored, however it was chunked
                batch.append(chunk[:len(chunk) - (size - limit)])
                await run_in_threadpool(ingest.feed, batch)
                ingest.refuse(413, "too_large", f"the request is larger than {limit // 2**20} MB "
                                                "(router.stow_max_request_mb); the rest was not read")
                return False
            batch.append(chunk)
            batched += len(chunk)
            if batched >= BATCH_BYTES:
                await run_in_threadpool(ingest.feed, batch)
                batch, batched = [], 0
                if ingest.stopped:  # refused, or past the close delimiter: the rest is not read
                    return False
        await run_in_threadpool(ingest.feed, batch)
        return ingest.result.refusal is None

    async def stow(request: Request, study_uid: str | None) -> Response:
        if study_uid is not None and not is_valid_uid(study_uid):
            raise ApiError(422, "invalid_request", "study_uid: not a DICOM UID")
        sender = str(request.state.sender)
        if active[0] >= settings.stow_max_concurrent:
            log.warning("STOW-RS from %s refused: %d requests in progress (router.stow_max_concurrent)",
                        sender, active[0])
            raise ApiError(503, "busy", f"{active[0]} STOW-RS requests are in progress "
                                        "(router.stow_max_concurrent); try again later",
                           {"Retry-After": str(RETRY_AFTER_SECONDS), **_CLOSE})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"the request is larger than {limit // 2**20} MB "
                                             "(router.stow_max_request_mb); send the study in several requests",
                           _CLOSE)
        client = request.client.host if request.client else ""
        active[0] += 1
        try:
            ingest = StowIngest(request.headers.get("content-type", ""), sink, sender, client, study_uid,
                                limits=limits, budget=budget)
            try:
                whole = await receive(request, ingest)
                result: StowResult = await run_in_threadpool(ingest.finish)
            finally:
                ingest.close()
        except StowRequestError as exc:
            raise ApiError(exc.status, exc.code, exc.message, _CLOSE) from None
        except ClientDisconnect:
            log.warning("STOW-RS from %s: the client went away mid-request; parts completed before were stored",
                        sender)
            return Response(status_code=400, headers=_CLOSE)
        finally:
            active[0] -= 1
        headers = {} if whole else dict(_CLOSE)
        warnings = result.warnings
        if warnings:  # as DICOMweb does: warn-code 299 (RFC 7234) per text, in one comma-separated field
            headers["Warning"] = ", ".join(f'299 portico "{_quoted(text)}"' for text in warnings)
        return Response(json.dumps(result.as_dicom_json()), status_code=result.http_status,
                        media_type=DICOM_JSON_MEDIA_TYPE, headers=headers)

    @router.post("/studies")
    async def store_studies(request: Request) -> Response:
        """Store the instances of any studies."""
        return await stow(request, None)

    @router.post("/studies/{study_uid}")
    async def store_study(request: Request, study_uid: StudyPath) -> Response:
        """Store the instances of one study; parts of another study are refused."""
        return await stow(request, study_uid)

    return router


async def _with_idle_timeout(chunks: AsyncIterator[bytes], seconds: float) -> AsyncIterator[bytes | None]:
    """``chunks``, ending with ``None`` when the next one takes longer than ``seconds`` to come."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            yield None
            return
        yield chunk


def _quoted(text: str) -> str:
    """``text`` as the inside of an HTTP quoted-string (ASCII, no quotes or backslashes)."""
    return text.encode("ascii", "replace").decode("ascii").replace("\\", "/").replace('"', "'")
