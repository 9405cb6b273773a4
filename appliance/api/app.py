"""The FastAPI application: routers, the guard, and errors as ``{code, message, request_id}``.

Secure by default: every route but ``/health`` (and ``/health/live``, ``/health/ready``), ``POST /auth/login``
and the dashboard's files needs a signed-in user (the dashboard's session cookie, or a user's API token as
``Authorization: Bearer``) whose roles grant the route's permission (:mod:`appliance.api.permissions`);
STOW-RS under ``/dicom-web/`` needs a sender's own token instead, and ``/metrics`` a scraper's address (and
token, :class:`appliance.settings.MetricsSettings`). The interactive docs and OpenAPI schema are not served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from appliance.api import (
    audit_search,
    destinations,
    fl,
    models,
    operations,
    review,
    rules,
    signin,
    status,
    stow,
    studies,
)
from appliance.api.auth import GuardMiddleware, require_declared
from appliance.api.context import ApiContext
from appliance.api.errors import install_error_handlers
from appliance.api.permissions import undeclared
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from appliance.web import build_router as web_router

if TYPE_CHECKING:
    from appliance.service import Service

log = logging.getLogger(__name__)


def create_app(settings: Settings, store: Store, service: Service | None = None, *,
               clock: Callable[[], float] = time.time) -> FastAPI:
    """The API over ``store`` (and ``service``'s FL supervisor and model registry when given).

    Parameters
    ----------
    settings
        The appliance settings: ``api`` (sessions, lockout, the deprecated ``token``), ``router.stow_senders``.
    store
        The state store the routes read and audit into; it holds the accounts too.
    service
        The running service, if any: its FL supervisor answers ``/fl/status``.
    clock
        Seconds since the epoch, for sessions and lockouts; tests pass a controllable one.
    """
    accounts = Accounts(store, settings.api, clock)
    if settings.api.legacy_token is not None:
        log.warning("api.token is deprecated: it opens every route as the admin 'api', and no person is recorded "
                    "as having acted. Create accounts (portico users add NAME --role ROLE; "
                    "portico users token NAME for scripts) and remove api.token")
    elif accounts.count() == 0:
        log.warning("no accounts yet: nobody can sign in to the API or dashboard. Create the first admin on this "
                    "machine with: portico users add NAME --role admin")
    ctx = ApiContext(settings, store, accounts, service)
    app = FastAPI(title="Portico", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_declared)])
    app.add_middleware(GuardMiddleware, api=settings.api, accounts=accounts, senders=settings.router.stow_senders)
    install_error_handlers(app)
    app.include_router(status.public_router())
    app.include_router(operations.build_router(ctx))
    app.include_router(signin.build_router(ctx))
    app.include_router(status.build_router(ctx))
    app.include_router(studies.build_router(ctx))
    app.include_router(audit_search.build_router(ctx))
    app.include_router(fl.build_router(ctx))
    app.include_router(models.build_router(ctx))
    app.include_router(destinations.build_router(ctx))
    app.include_router(rules.build_router(ctx))
    app.include_router(review.build_router(ctx))
    app.include_router(stow.build_router(ctx))
    app.include_router(web_router())
    missing = undeclared(app.routes)
    if missing:  # a programming error: fail before serving rather than refuse at each request
        raise RuntimeError(f"routes without a declared permission (appliance.api.permissions): {missing}")
    return app
