"""Errors at the API boundary: every failure answers ``{code, message, request_id}``.

Each request gets a fresh id (uuid4 hex), echoed in the ``X-Request-ID`` header of every response.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
               422: "invalid_request"}


class ErrorBody(BaseModel):
    """What every error response carries."""

    code: str
    message: str
    request_id: str


class ApiError(Exception):
    """An error the API answers on purpose.

    Parameters
    ----------
    status
        HTTP status code.
    code
        Stable machine-readable code (``not_found``, ``conflict``, ``package_invalid``…).
    message
        Human-readable explanation; never internals or patient identifiers.
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    """The id the middleware gave this request (a fresh one if it ran outside the middleware)."""
    rid = getattr(request.state, "request_id", None)
    if not isinstance(rid, str):
        rid = new_request_id()
        request.state.request_id = rid
    return rid


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(code=code, message=message, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status,
                        headers={**(headers or {}), REQUEST_ID_HEADER: request_id})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, request_id_of(request), exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), request_id_of(request),
                          dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # location and message only: the offending input is not echoed back
    parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
             for err in exc.errors()]
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request", request_id_of(request))


def install_error_handlers(app: FastAPI) -> None:
    """Map :class:`ApiError`, HTTP errors and validation errors to :class:`ErrorBody` responses."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
