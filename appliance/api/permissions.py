"""Which permission each route needs, as data: ``(method, path template)`` → :data:`Access`.

The guard (:mod:`appliance.api.auth`) matches every request's path against this table before any
route runs, and checks the permission there. A route that is missing from the table is refused to
everyone twice over: :func:`appliance.api.app.create_app` will not build an app with one, and the
app-wide dependency :func:`appliance.api.auth.require_declared` answers 403 if one runs anyway. A unit
test walks ``app.routes`` and fails on any undeclared route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from enum import StrEnum

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, compile_path

from appliance.roles import Permission


class Open(StrEnum):
    """Access that is not a permission."""

    #: anyone, without credentials
    PUBLIC = "public"
    #: anyone signed in (a session or a token), whatever the role
    SIGNED_IN = "signed-in"
    #: a STOW-RS sender's own token (``router.stow_senders``), from its own addresses; no user may
    STOW_SENDER = "stow-sender"
    #: a metrics scraper: from ``api.metrics.hosts``, with ``api.metrics.token`` when set; no user's token
    METRICS = "metrics"


Access = Permission | Open

ROUTE_ACCESS: dict[tuple[str, str], Access] = {
    ("GET", "/health"): Open.PUBLIC,
    ("GET", "/health/live"): Open.PUBLIC,
    ("GET", "/health/ready"): Open.PUBLIC,
    ("GET", "/metrics"): Open.METRICS,
    # the dashboard's files (its data comes from the routes below)
    ("GET", "/"): Open.PUBLIC,
    ("GET", "/ui"): Open.PUBLIC,
    ("GET", "/ui/"): Open.PUBLIC,
    ("GET", "/ui/{name}"): Open.PUBLIC,
    # accounts
    ("POST", "/auth/login"): Open.PUBLIC,
    ("POST", "/auth/logout"): Open.SIGNED_IN,
    ("GET", "/auth/me"): Open.SIGNED_IN,
    ("GET", "/auth/events"): Permission.AUDIT_READ,
    # read-only views
    ("GET", "/status"): Permission.STATUS_READ,
    ("GET", "/jobs"): Permission.STATUS_READ,
    ("GET", "/jobs/{job_id}"): Permission.STATUS_READ,
    ("GET", "/studies/{study_uid}/routing"): Permission.STATUS_READ,
    ("GET", "/studies"): Permission.STATUS_READ,
    ("GET", "/studies/{study_uid}"): Permission.STATUS_READ,
    ("GET", "/overview"): Permission.STATUS_READ,
    ("GET", "/fl/status"): Permission.STATUS_READ,
    ("GET", "/models"): Permission.MODELS_READ,
    ("GET", "/models/{name}/{version}/card"): Permission.MODELS_READ,
    ("GET", "/destinations"): Permission.STATUS_READ,
    ("GET", "/destinations/{name}/outbox"): Permission.STATUS_READ,
    ("GET", "/rules"): Permission.STATUS_READ,
    # reachability on demand: changes nothing here, and says nothing a status reader may not know
    ("POST", "/destinations/{name}/echo"): Permission.STATUS_READ,
    ("POST", "/peers/{ae_title}/echo"): Permission.STATUS_READ,
    ("GET", "/review"): Permission.REVIEW_READ,
    ("GET", "/review/{job_id}"): Permission.REVIEW_READ,
    ("GET", "/review/{job_id}/images"): Permission.REVIEW_READ,
    ("GET", "/review/{job_id}/images/{number}"): Permission.REVIEW_READ,
    ("GET", "/audit"): Permission.AUDIT_READ,
    ("GET", "/audit/search"): Permission.AUDIT_READ,
    ("GET", "/audit/export"): Permission.AUDIT_READ,
    # decisions and changes
    ("POST", "/review/{job_id}/approve"): Permission.REVIEW_DECIDE,
    ("POST", "/review/{job_id}/reject"): Permission.REVIEW_DECIDE,
    ("POST", "/review/{job_id}/withdraw"): Permission.REVIEW_DECIDE,
    ("POST", "/models/{name}/{version}/promote"): Permission.MODELS_MANAGE,
    ("POST", "/models/{name}/{version}/enable"): Permission.MODELS_MANAGE,
    ("POST", "/models/{name}/{version}/disable"): Permission.MODELS_MANAGE,
    ("POST", "/fl/jobs/{job_id}/approve"): Permission.FL_DECIDE,
    ("POST", "/fl/jobs/{job_id}/reject"): Permission.FL_DECIDE,
    ("POST", "/jobs/{job_id}/retry"): Permission.JOBS_MANAGE,
    ("POST", "/studies/{study_uid}/resend"): Permission.JOBS_MANAGE,
    ("POST", "/destinations/{name}/pause"): Permission.DESTINATIONS_MANAGE,
    ("POST", "/destinations/{name}/resume"): Permission.DESTINATIONS_MANAGE,
    # DICOMweb ingest
    ("POST", "/dicom-web/studies"): Open.STOW_SENDER,
    ("POST", "/dicom-web/studies/{study_uid}"): Open.STOW_SENDER,
}


def access_for(method: str, path: str) -> Access | None:
    """What ``method`` on the route ``path`` (its template) needs; ``None``: undeclared, refused."""
    return ROUTE_ACCESS.get((plain_method(method), path))


def plain_method(method: str) -> str:
    """``HEAD`` is ``GET`` without the body."""
    return "GET" if method == "HEAD" else method


#: the templates as regular expressions, those without parameters first (``/jobs/x`` before ``/jobs/{id}``)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (compile_path(template)[0], template)
    for template in sorted({t for _, t in ROUTE_ACCESS}, key=lambda t: ("{" in t, t))]


def match(method: str, path: str) -> tuple[str | None, bool]:
    """The declared template ``path`` falls under, and whether it is declared for ``method`` too.

    ``(None, False)``: no declared route has this path (the router answers 404, or runs a route that
    declares nothing, which :func:`appliance.api.auth.require_declared` refuses).
    """
    found: str | None = None
    for pattern, template in _PATTERNS:
        if pattern.match(path):
            if (plain_method(method), template) in ROUTE_ACCESS:
                return template, True
            found = found or template
    return found, False


def api_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, APIRoute]]:
    """Every FastAPI route under ``routes`` with its full path, through included routers.

    FastAPI 0.16x keeps an included router as one lazy entry of ``app.routes`` (its ``original_router``
    holds the routes, its ``include_context.prefix`` the prefix it was included with); older versions copy
    the routes into ``app.routes``. Both are walked.
    """
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
            continue
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from api_routes(inner.routes, prefix + str(getattr(context, "prefix", "") or ""))


def undeclared(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    """``(method, path)`` of every route under ``routes`` that :data:`ROUTE_ACCESS` does not name."""
    return sorted((method, path) for path, route in api_routes(routes) for method in route.methods or ()
                  if access_for(method, path) is None)
