"""``/auth``: signing in and out of the dashboard (a session cookie), who I am, and sign-in events for admins.

``POST /auth/login`` checks a user name and password (argon2id) and answers with an ``HttpOnly``,
``SameSite=Strict`` session cookie (``Secure`` over HTTPS) that ends after ``api.sessions.absolute_hours``
or ``idle_minutes`` without a request. Wrong credentials answer 401 with the same message whatever was
wrong; after repeated failures, 429 with ``Retry-After`` (``api.lockout``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from appliance.api.auth import client_address, cookie_name, cookie_secure, principal_of
from appliance.api.context import ApiContext
from appliance.api.errors import ApiError, request_id_of
from appliance.identity import Principal, SignInFailed
from appliance.lockout import Lock, LockedOut
from appliance.passwords import MAX_LENGTH

LOGIN_ROUTE = "POST /auth/login"


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, Field(min_length=1, max_length=128)]
    password: Annotated[str, Field(min_length=1, max_length=MAX_LENGTH)]


class Me(BaseModel):
    user: str
    roles: list[str]
    permissions: list[str]
    #: ``session``, ``token`` or ``api.token`` (deprecated)
    via: str
    #: when the session ends at the latest (sessions only)
    expires: float | None = None
    idle_minutes: float | None = None

    @classmethod
    def of(cls, who: Principal, idle_minutes: float) -> Me:
        return cls(user=who.name, roles=[str(r) for r in who.roles],
                   permissions=sorted(str(p) for p in who.permissions), via=str(who.via), expires=who.expires,
                   idle_minutes=idle_minutes if who.expires is not None else None)


class LockOut(BaseModel):
    kind: str
    key: str
    failures: int
    last_failure: float
    locked_until: float | None
    refused_while_locked: int

    @classmethod
    def of(cls, lock: Lock) -> LockOut:
        return cls(kind=str(lock.kind), key=lock.key, failures=lock.failures, last_failure=lock.last_failure,
                   locked_until=lock.locked_until or None, refused_while_locked=lock.refused)


class SignInEvents(BaseModel):
    events: list[dict[str, Any]]
    #: failure counts remembered now, locked ones first
    locks: list[LockOut]


def build_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/auth")
    accounts = ctx.accounts
    api = ctx.settings.api

    @router.post("/login")
    def login(body: LoginIn, request: Request, response: Response) -> Me:
        try:
            who, session_id = accounts.sign_in(body.username, body.password, client_address(request), LOGIN_ROUTE,
                                               request_id_of(request))
        except LockedOut as exc:
            raise ApiError(429, exc.code, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except SignInFailed as exc:
            raise ApiError(401, exc.code, str(exc)) from None
        response.set_cookie(cookie_name(api), session_id, max_age=int(api.sessions.absolute_hours * 3600), path="/",
                            secure=cookie_secure(api), httponly=True, samesite="strict")
        return Me.of(who, api.sessions.idle_minutes)

    @router.post("/logout", status_code=204)
    async def logout(request: Request, response: Response) -> None:
        session_id = request.cookies.get(cookie_name(api))
        if session_id:
            await run_in_threadpool(accounts.sign_out, session_id, client_address(request), "POST /auth/logout",
                                    request_id_of(request))
        response.delete_cookie(cookie_name(api), path="/", secure=cookie_secure(api), httponly=True,
                               samesite="strict")

    @router.get("/me")
    def me(who: Annotated[Principal, Depends(principal_of)]) -> Me:
        return Me.of(who, api.sessions.idle_minutes)

    @router.get("/events")
    def events(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> SignInEvents:
        """Sign-ins, failures, locks and account changes, newest first, and the failure counts remembered now."""
        return SignInEvents(events=accounts.events(limit), locks=[LockOut.of(lock) for lock in accounts.locks()])

    return router
