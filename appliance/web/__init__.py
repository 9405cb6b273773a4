"""The web dashboard: static HTML, CSS and JavaScript under ``/ui/``, served as they are (no build step).

The files are public so a browser can load the sign-in form; every piece of data the page shows comes
from the JSON API, as the user who signed in (a session cookie, :mod:`appliance.api.signin`), within what
their roles allow. Each UI response carries a strict
Content-Security-Policy (scripts and styles from these files only, nothing from elsewhere) and refuses
framing, sniffing and referrers.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response

from appliance.api.errors import ApiError

#: where the dashboard lives; ``/`` and ``/ui`` redirect here
UI_PREFIX = "/ui/"
STATIC_DIR = Path(__file__).resolve().parent
#: every file the dashboard serves, and its media type; nothing else in the folder is reachable
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "overview.js": "text/javascript; charset=utf-8",
    "studies.js": "text/javascript; charset=utf-8",
    "audit.js": "text/javascript; charset=utf-8",
    "destinations.js": "text/javascript; charset=utf-8",
    "models.js": "text/javascript; charset=utf-8",
    "rules.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # the files change with the appliance's version: revalidate rather than run a stale script
    "Cache-Control": "no-cache",
}


def build_router() -> APIRouter:
    """``GET /ui/`` and its assets, and redirects from ``/`` and ``/ui``."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    @router.get("/ui", include_in_schema=False)
    def to_ui() -> Response:
        return RedirectResponse(UI_PREFIX, status_code=307, headers=SECURITY_HEADERS)

    @router.get(UI_PREFIX, include_in_schema=False)
    def index() -> Response:
        return _asset("index.html")

    @router.get(UI_PREFIX + "{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        return _asset(name)

    return router


def _asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "no such dashboard file")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)
