"""The FastAPI application: routers, the token guard, and errors as ``{code, message, request_id}``.

Secure by default: every route but ``/health`` needs ``Authorization: Bearer <api.token>`` (STOW-RS
under ``/dicom-web/`` a sender's own token instead), and the interactive docs and OpenAPI schema are
not served. The web dashboard's static files under ``/ui/`` are public to read; its data is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from appliance.api import fl, models, review, status, stow
from appliance.api.auth import GuardMiddleware
from appliance.api.context import ApiContext
from appliance.api.errors import install_error_handlers
from appliance.settings import Settings
from appliance.store import Store
from appliance.web import build_router as web_router

if TYPE_CHECKING:
    from appliance.service import Service


def create_app(settings: Settings, store: Store, service: Service | None = None) -> FastAPI:
    """The API over ``store`` (and ``service``'s FL supervisor and model registry when given).

    Parameters
    ----------
    settings
        The appliance settings; ``settings.api.token`` guards every route but ``/health``.
    store
        The state store the routes read and audit into.
    service
        The running service, if any: its FL supervisor answers ``/fl/status``.
    """
    ctx = ApiContext(settings, store, service)
    app = FastAPI(title="Portico", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GuardMiddleware, token=settings.api.token, senders=settings.router.stow_senders)
    install_error_handlers(app)
    app.include_router(status.public_router())
    app.include_router(status.build_router(ctx))
    app.include_router(fl.build_router(ctx))
    app.include_router(models.build_router(ctx))
    app.include_router(review.build_router(ctx))
    app.include_router(stow.build_router(ctx))
    app.include_router(web_router())
    return app
