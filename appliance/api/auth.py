"""Bearer-token check and request ids, for every request before any route runs.

Authentication is a middleware, not a per-route dependency, so a route added later is protected
without anyone remembering to, and an unauthenticated caller learns nothing (not even which paths
exist or how a body is validated). Only :data:`PUBLIC_PATHS`, and ``GET`` of the web dashboard's static
files (:func:`is_public`), answer without a token: the dashboard's data comes from the guarded routes.

DICOMweb ingest (:data:`DICOMWEB_PREFIX`) has its own credentials: each STOW-RS sender's token, from
that sender's addresses only. The admin token does not open it, and a sender's token opens nothing else.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from pydantic import SecretStr
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response
from starlette.types import ASGIApp

from appliance.api.errors import REQUEST_ID_HEADER, error_response, new_request_id
from dicom_router.settings import StowSender

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health"})
#: the web dashboard's files (and the redirects to it): public for reading only
PUBLIC_GET_PATHS = frozenset({"/", "/ui"})
PUBLIC_GET_PREFIX = "/ui/"
DICOMWEB_PREFIX = "/dicom-web/"


def is_public(method: str, path: str) -> bool:
    """Whether ``method path`` answers without a token."""
    if path in PUBLIC_PATHS:
        return True
    return method in ("GET", "HEAD") and (path in PUBLIC_GET_PATHS or path.startswith(PUBLIC_GET_PREFIX))


def token_matches(header: str | None, token: SecretStr) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    expected = token.get_secret_value()
    if not header or not expected:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), expected.encode("utf-8"))


class GuardMiddleware(BaseHTTPMiddleware):
    """Give each request an id, refuse it without the token, and turn crashes into a bare 500."""

    def __init__(self, app: ASGIApp, token: SecretStr, senders: tuple[StowSender, ...] = ()) -> None:
        super().__init__(app)
        self._token = token
        self._senders = senders

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        rid = new_request_id()
        request.state.request_id = rid
        header = request.headers.get("authorization")
        if request.url.path.startswith(DICOMWEB_PREFIX):
            sender = next((s for s in self._senders if token_matches(header, s.token)), None)
            client = request.client.host if request.client else ""
            if sender is None or client not in sender.hosts:
                log.warning("refused DICOMweb %s request from %s: %s (request %s)", request.method, client,
                            "unknown token" if sender is None else f"{sender.name} not allowed from there", rid)
                return error_response(401, "unauthorized", "a DICOMweb sender's bearer token is required", rid,
                                      {"WWW-Authenticate": "Bearer"})
            request.state.sender = sender.name
        elif not is_public(request.method, request.url.path) and not token_matches(header, self._token):
            log.warning("refused %s request without a valid token (request %s)", request.method, rid)
            return error_response(401, "unauthorized", "a valid bearer token is required", rid,
                                  {"WWW-Authenticate": "Bearer"})
        try:
            response = await call_next(request)
        except Exception:  # the boundary: log it here, answer without internals
            log.exception("unexpected error answering %s %s (request %s)", request.method,
                          request.scope.get("route_path", request.url.path), rid)
            return error_response(500, "internal", "internal error; see the appliance log", rid)
        response.headers[REQUEST_ID_HEADER] = rid
        return response
