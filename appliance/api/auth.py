"""Who is asking, and may they: request ids, credentials and permissions, for every request before any route runs.

Authentication and authorisation are a middleware, not per-route dependencies, so a route added later
is guarded without anyone remembering to: each request's path is matched against
:data:`appliance.api.permissions.ROUTE_ACCESS` before routing, and a route missing there is refused to
everyone (:func:`require_declared`, an app-wide dependency, checks that the route the router chose is
the one the guard checked). An unauthenticated caller learns nothing (not even which paths exist or how
a body is validated).

Credentials, in this order: ``Authorization: Bearer`` (a user's API token, or the deprecated shared
``api.token``), else the dashboard's session cookie. A cookie-authenticated request that changes
anything (not GET/HEAD), and every sign-in, must carry ``X-Requested-With: portico``: a page on another
origin cannot add that header without a CORS preflight, which this API never grants (on top of the
cookie's ``SameSite=Strict``).

DICOMweb ingest (:data:`DICOMWEB_PREFIX`) has its own credentials: each STOW-RS sender's token, from
that sender's addresses only. No user's token opens it, and a sender's token opens nothing else.

``/metrics`` (Prometheus) too: a scrape from ``api.metrics.hosts`` (default: this machine), carrying
``api.metrics.token`` when one is set. No user's token or session opens it.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response
from starlette.types import ASGIApp

from appliance.api.context import ACTOR
from appliance.api.errors import REQUEST_ID_HEADER, ApiError, error_response, new_request_id
from appliance.api.permissions import Open, access_for, match, plain_method
from appliance.identity import Credential, Principal, SignInFailed
from appliance.lockout import LockedOut
from appliance.roles import Permission, Role
from appliance.settings import ApiSettings
from appliance.users import Accounts
from dicom_router.settings import StowSender

log = logging.getLogger(__name__)

DICOMWEB_PREFIX = "/dicom-web/"
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "portico"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BEARER = {"WWW-Authenticate": "Bearer"}


def cookie_secure(api: ApiSettings) -> bool:
    """Whether the browser reaches us over HTTPS (our own TLS, or a proxy's): the cookie is then ``Secure``."""
    return api.tls is not None or api.behind_tls_proxy


def cookie_name(api: ApiSettings) -> str:
    """The session cookie's name; ``__Host-`` (Secure, whole site, this host only) over HTTPS."""
    return "__Host-portico_session" if cookie_secure(api) else "portico_session"


def token_matches(header: str | None, token: SecretStr) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    given = bearer(header)
    expected = token.get_secret_value()
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``; ``None`` for no header, another scheme, or no token."""
    if not header:
        return None
    scheme, _, given = header.partition(" ")
    given = given.strip()
    return given if scheme.lower() == "bearer" and given else None


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def principal_of(request: Request) -> Principal:
    """Who the guard let in (a dependency for routes that record who acted)."""
    found = getattr(request.state, "principal", None)
    if not isinstance(found, Principal):  # only a route the table marks public runs without one
        raise RuntimeError("no principal: the route is public, or ran outside the guard")
    return found


class GuardMiddleware(BaseHTTPMiddleware):
    """Give each request an id, authenticate and authorise it, and turn crashes into a bare 500."""

    def __init__(self, app: ASGIApp, api: ApiSettings, accounts: Accounts,
                 senders: tuple[StowSender, ...] = ()) -> None:
        super().__init__(app)
        self._api = api
        self._legacy = api.legacy_token
        self._accounts = accounts
        self._senders = senders

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        rid = new_request_id()
        request.state.request_id = rid
        if request.url.path.startswith(DICOMWEB_PREFIX):
            refused = self._sender(request, rid)
        else:
            refused = await run_in_threadpool(self._guard, request, rid)
        if refused is not None:
            return refused
        try:
            response = await call_next(request)
        except Exception:  # the boundary: log it here, answer without internals
            log.exception("unexpected error answering %s %s (request %s)", request.method,
                          request.scope.get("route_path", request.url.path), rid)
            return error_response(500, "internal", "internal error; see the appliance log", rid)
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    def _sender(self, request: Request, rid: str) -> Response | None:
        header = request.headers.get("authorization")
        sender = next((s for s in self._senders if token_matches(header, s.token)), None)
        client = client_address(request)
        if sender is None or client not in sender.hosts:
            log.warning("refused DICOMweb %s request from %s: %s (request %s)", request.method, client,
                        "unknown token" if sender is None else f"{sender.name} not allowed from there", rid)
            return error_response(401, "unauthorized", "a DICOMweb sender's bearer token is required", rid, _BEARER)
        request.state.sender = sender.name
        template, matched = match(request.method, request.url.path)
        if matched and access_for(request.method, str(template)) is Open.STOW_SENDER:
            request.state.checked = (plain_method(request.method), template)
        return None

    def _guard(self, request: Request, rid: str) -> Response | None:
        """``None`` to let the request through, else the refusal."""
        method = request.method
        template, matched = match(method, request.url.path)
        access = access_for(method, template) if matched and template is not None else None
        csrf_ok = request.headers.get(CSRF_HEADER, "").lower() == CSRF_VALUE
        if matched and access is Open.METRICS:
            return self._scraper(request, rid, str(template))
        if matched and access is Open.PUBLIC:
            if method not in SAFE_METHODS and not csrf_ok:
                return self._refuse(request, rid, 403, "csrf", f"this request needs the header {CSRF_HEADER}: "
                                    f"{CSRF_VALUE}")
            request.state.checked = (plain_method(method), template)
            return None
        who = self._authenticate(request, rid, f"{method} {template or request.url.path[:200]}")
        if isinstance(who, Response):
            return who
        request.state.principal = who
        if not matched or access is None:
            # no such route (404), not with this method (405), or a route that declares nothing (refused by
            # require_declared): only someone signed in gets this far
            return None
        if who.via is Credential.SESSION and method not in SAFE_METHODS and not csrf_ok:
            return self._refuse(request, rid, 403, "csrf", f"a signed-in browser must send {CSRF_HEADER}: "
                                f"{CSRF_VALUE} with every change")
        if isinstance(access, Permission) and not who.may(access):
            return self._refuse(request, rid, 403, "forbidden",
                                f"your role does not allow this (it needs the {access} permission)", who.name)
        if access is Open.STOW_SENDER:
            return self._refuse(request, rid, 403, "forbidden", "only a DICOMweb sender may use this route")
        request.state.checked = (plain_method(method), template)
        return None

    def _scraper(self, request: Request, rid: str, template: str) -> Response | None:
        """Let a metrics scrape through, or refuse it (404 when metrics are off)."""
        metrics = self._api.metrics
        if not metrics.enabled:
            return error_response(404, "not_found", "metrics are off (api.metrics.enabled)", rid)
        if not metrics.allows(client_address(request)):
            return self._refuse(request, rid, 401, "unauthorized", "metrics are not served to this address "
                                "(api.metrics.hosts)", headers=_BEARER)
        if metrics.token is not None and not token_matches(request.headers.get("authorization"), metrics.token):
            return self._refuse(request, rid, 401, "unauthorized", "the metrics token is required", headers=_BEARER)
        request.state.checked = (plain_method(request.method), template)
        return None

    def _authenticate(self, request: Request, rid: str, route: str) -> Principal | Response:
        header = request.headers.get("authorization")
        address = client_address(request)
        if header is not None:
            token = bearer(header)
            if token is None:
                return self._refuse(request, rid, 401, "unauthorized", "a valid bearer token is required",
                                    headers=_BEARER)
            if self._legacy is not None and token_matches(header, self._legacy):
                return Principal(ACTOR, (Role.ADMIN,), Credential.LEGACY_TOKEN)
            try:
                return self._accounts.authenticate_token(token, address, route, rid)
            except LockedOut as exc:
                return self._locked(request, rid, exc)
            except SignInFailed:
                return self._refuse(request, rid, 401, "unauthorized", "a valid bearer token is required",
                                    headers=_BEARER)
        session_id = request.cookies.get(cookie_name(self._api))
        if session_id:
            found = self._accounts.session(session_id)
            if found is not None:
                return found
            response = self._refuse(request, rid, 401, "unauthorized", "your session has ended; sign in again",
                                    headers=_BEARER)
            response.delete_cookie(cookie_name(self._api), path="/", secure=cookie_secure(self._api),
                                   httponly=True, samesite="strict")
            return response
        return self._refuse(request, rid, 401, "unauthorized", "sign in, or send a valid bearer token",
                            headers=_BEARER)

    def _locked(self, request: Request, rid: str, exc: LockedOut) -> Response:
        return self._refuse(request, rid, 429, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @staticmethod
    def _refuse(request: Request, rid: str, status: int, code: str, message: str, user: str | None = None,
                headers: dict[str, str] | None = None) -> Response:
        # address, route and request id; never the credential
        log.warning("refused %s %s from %s%s: %s (request %s)", request.method, request.url.path[:200],
                    client_address(request), f" ({user})" if user else "", code, rid)
        return error_response(status, code, message, rid, headers)


def require_declared(request: Request) -> None:
    """An app-wide dependency: refuse a route the guard did not check against its declared permission.

    The guard matches paths against the permission table; this makes sure the route the router then
    chose is the one that was checked, so a route missing from the table never runs.
    """
    route = request.scope.get("route")
    chosen = (plain_method(request.method), getattr(route, "path", None))
    if getattr(request.state, "checked", None) != chosen:
        log.error("route %s %s was not checked against a declared permission (appliance.api.permissions); "
                  "refused (request %s)", *chosen, getattr(request.state, "request_id", "-"))
        raise ApiError(403, "forbidden", "this route declares no permission; refused")
