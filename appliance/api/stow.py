"""``POST /dicom-web/studies[/{study}]``: STOW-RS ingest, the DICOMweb twin of our C-STORE SCP.

The guard has already named the sender (its own token, from its own addresses). The body is read
up to ``router.stow_max_request_mb`` and handed to :func:`dicom_router.stow.store_instances` in a
worker thread (every part is fsync'd before the answer).
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from appliance.api.context import ApiContext
from appliance.api.errors import ApiError
from dicom_router.stow import DICOM_JSON_MEDIA_TYPE, StowRequestError, StowResult, store_instances

StudyPath = Annotated[str, Path(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/dicom-web")
    limit = ctx.settings.router.stow_max_request_mb * 2**20

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"the request is larger than {limit // 2**20} MB "
                                             "(router.stow_max_request_mb); send the study in several requests")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the request is larger than {limit // 2**20} MB")
            chunks.append(chunk)
        return b"".join(chunks)

    async def stow(request: Request, study_uid: str | None) -> Response:
        body = await read_body(request)
        client = request.client.host if request.client else ""
        try:
            result: StowResult = await run_in_threadpool(
                store_instances, body, request.headers.get("content-type", ""), ctx.store,
                str(request.state.sender), client, study_uid)
        except StowRequestError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        return Response(json.dumps(result.as_dicom_json()), status_code=result.http_status,
                        media_type=DICOM_JSON_MEDIA_TYPE)

    @router.post("/studies")
    async def store_studies(request: Request) -> Response:
        """Store the instances of any studies."""
        return await stow(request, None)

    @router.post("/studies/{study_uid}")
    async def store_study(request: Request, study_uid: StudyPath) -> Response:
        """Store the instances of one study; parts of another study are refused."""
        return await stow(request, study_uid)

    return router
