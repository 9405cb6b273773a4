"""Accounts at the API: every route × every role from the permission table, sessions, CSRF, the api.token alias.

Real responses from the app through TestClient; users and tokens made as an administrator would (the
accounts module behind ``portico users``); a controllable clock for session lifetimes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.api.auth import CSRF_HEADER
from appliance.api.permissions import ROUTE_ACCESS, Access, Open, api_routes, undeclared
from appliance.roles import ROLE_PERMISSIONS, Permission, Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts

PASSWORD = "a long enough passphrase"
PAGE = {CSRF_HEADER: "portico"}
#: a value for each path parameter, so every route can be called
SAMPLES = {"job_id": "1", "version": "1.0.0", "study_uid": "1.2.826.0.1.3680043.8.498.1"}


class Clock:
    """Seconds since the epoch that move only when told to."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class World:
    client: TestClient
    accounts: Accounts
    store: Store
    clock: Clock
    #: a bearer header per role (a user holding that role only)
    auth: dict[Role, dict[str, str]]


def make_settings(tmp: Path, **api: Any) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp / "var"), "fsync": False, "min_free_mb": 0},
                                    "inference": {"models_dir": str(tmp / "models")},
                                    "api": {"enabled": True, **api}})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = make_settings(tmp_path_factory.mktemp("auth"))
    store = Store(settings.data_dir, fsync=False)
    clock = Clock()
    accounts = Accounts(store, settings.api, clock)
    auth = {}
    for role in Role:
        name = f"{role}-user"
        accounts.add(name, PASSWORD, [role], actor="cli:test")
        auth[role] = {"Authorization": f"Bearer {accounts.issue_token(name, actor='cli:test').token}"}
    with TestClient(create_app(settings, store, clock=clock), raise_server_exceptions=False) as client:
        yield World(client, accounts, store, clock, auth)
    store.close()


def concrete(template: str) -> str:
    """``template`` with a sample value for each parameter."""
    if template.startswith("/ui/"):
        return template.replace("{name}", "app.js")
    return re.sub(r"{(\w+)}", lambda m: SAMPLES.get(m.group(1), "tiny"), template)


def allowed(access: Access, role: Role) -> bool:
    """What the permission table says ``role`` may do with a route needing ``access``."""
    if isinstance(access, Permission):
        return access in ROLE_PERMISSIONS[role]
    return access in (Open.PUBLIC, Open.SIGNED_IN)


MATRIX = [(method, template, role) for (method, template) in sorted(ROUTE_ACCESS) for role in Role]


def test_every_route_declares_its_access_and_the_table_names_only_real_routes(world: World) -> None:
    routes = world.client.app.routes  # type: ignore[attr-defined]
    assert undeclared(routes) == []
    real = {(method, path) for path, route in api_routes(routes) for method in route.methods or ()}
    assert real == set(ROUTE_ACCESS)


def test_a_route_added_without_a_declared_permission_is_refused_even_to_an_admin(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)
    accounts.add("root-like", PASSWORD, [Role.ADMIN], actor="cli:test")
    token = accounts.issue_token("root-like", actor="cli:test").token
    app = create_app(settings, store)

    @app.get("/forgotten")
    def forgotten() -> dict[str, str]:
        return {"ran": "yes"}

    assert undeclared(app.routes) == [("GET", "/forgotten")]
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/forgotten").status_code == 401
        refused = client.get("/forgotten", headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden", refused.text
        assert "ran" not in refused.text
    store.close()


@pytest.mark.parametrize(("method", "template", "role"), MATRIX,
                         ids=[f"{m} {t} as {r}" for m, t, r in MATRIX])
def test_route_role_matrix(world: World, method: str, template: str, role: Role) -> None:
    access = ROUTE_ACCESS[(method, template)]
    body = {"reason": "matrix"} if method == "POST" and not template.startswith("/dicom-web") else None
    if template == "/auth/login":
        body = {"username": f"{role}-user", "password": PASSWORD}
    headers = {**world.auth[role], **PAGE} if template != "/auth/login" else PAGE
    response = world.client.request(method, concrete(template), headers=headers, json=body)
    if access in (Open.STOW_SENDER, Open.METRICS):  # a user's token never opens ingest or the scrape
        assert response.status_code == 401, response.text
    elif allowed(access, role):
        assert response.status_code not in (401, 403) and response.status_code < 500, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "forbidden" and str(access) in response.json()["message"]
    world.client.cookies.clear()


def test_without_credentials_only_public_routes_answer(world: World) -> None:
    for (method, template), access in ROUTE_ACCESS.items():
        response = world.client.request(method, concrete(template), headers=PAGE, follow_redirects=False,
                                        json={"username": "x", "password": "y"} if method == "POST" else None)
        if access is Open.PUBLIC:  # the route runs (a wrong password is its own answer, not the guard's)
            assert response.status_code in (200, 307) or response.json()["code"] == "sign_in_failed", template
        else:
            assert response.status_code == 401, (method, template)
            assert response.json()["code"] == "unauthorized"


def test_roles_are_cumulative_as_listed() -> None:
    viewer = ROLE_PERMISSIONS[Role.VIEWER]
    assert viewer == {Permission.STATUS_READ, Permission.MODELS_READ, Permission.REVIEW_READ}
    assert all(viewer <= granted for granted in ROLE_PERMISSIONS.values())
    assert ROLE_PERMISSIONS[Role.ADMIN] == set(Permission)
    assert ROLE_PERMISSIONS[Role.REVIEWER] - viewer == {Permission.REVIEW_DECIDE}
    assert ROLE_PERMISSIONS[Role.MODEL_ADMIN] - viewer == {Permission.MODELS_MANAGE}
    assert ROLE_PERMISSIONS[Role.FL_APPROVER] - viewer == {Permission.FL_DECIDE}


# ---- sessions -----------------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[World]:
    """An app of its own (its own lockout counts), with a reviewer and a viewer."""
    settings = make_settings(tmp_path)
    store = Store(settings.data_dir, fsync=False)
    clock = Clock()
    accounts = Accounts(store, settings.api, clock)
    accounts.add("rita", PASSWORD, [Role.REVIEWER], actor="cli:test")
    accounts.add("victor", PASSWORD, [Role.VIEWER], actor="cli:test")
    with TestClient(create_app(settings, store, clock=clock), raise_server_exceptions=False) as client:
        yield World(client, accounts, store, clock, {})
    store.close()


def login(client: TestClient, user: str, password: str = PASSWORD, headers: dict[str, str] = PAGE) -> Any:
    return client.post("/auth/login", json={"username": user, "password": password}, headers=headers)


def test_sign_in_sets_a_strict_http_only_cookie_and_me_says_who(fresh: World) -> None:
    response = login(fresh.client, "Rita ")  # trimmed and lower-cased, as typed on a phone
    assert response.status_code == 200, response.text
    assert response.json()["user"] == "rita" and response.json()["roles"] == ["reviewer"]
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("portico_session=")
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/", "max-age=28800"} <= flags
    assert "secure" not in flags  # plain HTTP on loopback: a Secure cookie would never come back
    me = fresh.client.get("/auth/me").json()
    assert (me["user"], me["roles"], me["via"]) == ("rita", ["reviewer"], "session")
    assert "review.decide" in me["permissions"] and "audit.read" not in me["permissions"]
    assert fresh.client.get("/review").status_code == 200
    assert fresh.client.get("/audit").status_code == 403
    user = fresh.accounts.get("rita")
    assert user is not None and user.last_sign_in == fresh.clock.now and user.last_sign_in_from == "testclient"


def test_over_https_the_cookie_is_secure_and_host_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, tls={"certificate": "unused.pem", "private_key": "unused.key"})
    store = Store(settings.data_dir, fsync=False)
    Accounts(store, settings.api).add("rita", PASSWORD, [Role.REVIEWER], actor="cli:test")
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        cookie = login(client, "rita").headers["set-cookie"]
    assert cookie.startswith("__Host-portico_session=") and "secure" in cookie.lower()
    store.close()


def test_csrf_a_signed_in_browser_must_say_the_page_sent_a_change(fresh: World) -> None:
    refused = login(fresh.client, "rita", headers={})
    assert refused.status_code == 403 and refused.json()["code"] == "csrf"
    assert "set-cookie" not in refused.headers
    assert login(fresh.client, "rita").status_code == 200
    assert fresh.client.get("/review").status_code == 200  # reading needs no header
    forged = fresh.client.post("/review/1/approve", json={})
    assert forged.status_code == 403 and forged.json()["code"] == "csrf"
    assert fresh.client.post("/review/1/approve", json={}, headers=PAGE).status_code == 404  # let through
    assert fresh.client.post("/auth/logout").status_code == 403


def test_logout_and_disabling_end_a_session_at_once(fresh: World) -> None:
    assert login(fresh.client, "rita").status_code == 200
    cookie = dict(fresh.client.cookies)
    assert fresh.client.post("/auth/logout", headers=PAGE).status_code == 204
    fresh.client.cookies.update(cookie)  # a copy of the cookie kept elsewhere is worthless now
    ended = fresh.client.get("/auth/me")
    assert ended.status_code == 401 and "session has ended" in ended.json()["message"]
    fresh.client.cookies.clear()

    assert login(fresh.client, "rita").status_code == 200
    assert fresh.client.get("/auth/me").status_code == 200
    fresh.accounts.set_disabled("rita", True, actor="cli:test")
    assert fresh.client.get("/auth/me").status_code == 401
    assert login(fresh.client, "rita").status_code == 401
    fresh.accounts.set_disabled("rita", False, actor="cli:test")
    assert login(fresh.client, "rita").status_code == 200
    fresh.accounts.set_password("rita", "another long passphrase", actor="cli:test")
    assert fresh.client.get("/auth/me").status_code == 401  # a new password ends the sessions


def test_a_session_ends_after_the_idle_limit_and_the_absolute_limit(fresh: World) -> None:
    assert login(fresh.client, "rita").status_code == 200
    fresh.clock.advance(29 * 60)
    assert fresh.client.get("/auth/me").status_code == 200
    fresh.clock.advance(29 * 60)  # busy, so not idle
    assert fresh.client.get("/auth/me").status_code == 200
    fresh.clock.advance(31 * 60)
    assert fresh.client.get("/auth/me").status_code == 401

    assert login(fresh.client, "rita").status_code == 200
    for _ in range(24):  # a request every 20 minutes for 8 hours
        assert fresh.client.get("/auth/me").status_code == 200
        fresh.clock.advance(20 * 60)
    assert fresh.client.get("/auth/me").status_code == 401


def test_roles_change_at_the_next_request(fresh: World) -> None:
    assert login(fresh.client, "victor").status_code == 200
    assert fresh.client.post("/review/1/approve", json={}, headers=PAGE).status_code == 403
    fresh.accounts.set_roles("victor", [Role.REVIEWER], actor="cli:test")
    assert fresh.client.post("/review/1/approve", json={}, headers=PAGE).status_code == 404


def test_wrong_credentials_say_nothing_about_which_part_was_wrong(fresh: World) -> None:
    unknown = login(fresh.client, "nobody")
    wrong = login(fresh.client, "rita", "not the passphrase!")
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json()["message"] == wrong.json()["message"] == "the user name or password is wrong"
    assert unknown.json()["code"] == "sign_in_failed"
    assert "set-cookie" not in wrong.headers


def test_sign_ins_are_audited_without_secrets_and_an_admin_can_read_them(fresh: World,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fresh.accounts.add("ada", PASSWORD, [Role.ADMIN], actor="cli:test")
    typed_in_the_wrong_box = "my secret words here"
    assert login(fresh.client, "rita", "not the passphrase!").status_code == 401
    assert login(fresh.client, typed_in_the_wrong_box, PASSWORD).status_code == 401
    assert login(fresh.client, "victor").status_code == 200
    assert fresh.client.get("/auth/events").status_code == 403  # a viewer may not
    fresh.client.cookies.clear()
    assert login(fresh.client, "ada").status_code == 200
    body = fresh.client.get("/auth/events").json()
    events = [(e["event"], e["actor"], e["detail"].get("reason")) for e in body["events"]]
    assert events[:4] == [("signed_in", "ada", None), ("signed_in", "victor", None),
                          ("sign_in_failed", "(not a user name)", "unknown_user"),
                          ("sign_in_failed", "rita", "wrong_password")]
    failed = body["events"][3]["detail"]
    assert failed["address"] == "testclient" and failed["route"] == "POST /auth/login"
    assert [(lock["kind"], lock["key"], lock["failures"]) for lock in body["locks"]] == \
        [("user", "rita", 1), ("address", "testclient", 2)]
    everything = str(fresh.store.audit_events()) + caplog.text
    assert PASSWORD not in everything and "not the passphrase" not in everything
    assert typed_in_the_wrong_box not in everything
    # the log line names the address, the route and the request id (the one the client got back)
    assert re.search(r"sign-in failed from testclient on POST /auth/login: wrong_password "
                     r"\(user rita, request [0-9a-f]{32}\)", caplog.text)
    assert failed["request_id"] in caplog.text


# ---- the deprecated api.token -------------------------------------------------------------------


def test_api_token_still_opens_everything_as_the_admin_api_and_is_reported_deprecated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "legacy-shared-t0ken"
    settings = make_settings(tmp_path, token=secret)
    store = Store(settings.data_dir, fsync=False)
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, store)
    assert "api.token is deprecated" in caplog.text and secret not in caplog.text
    with TestClient(app, raise_server_exceptions=False) as client:
        me = client.get("/auth/me", headers={"Authorization": f"Bearer {secret}"}).json()
        assert (me["user"], me["roles"], me["via"]) == ("api", ["admin"], "api.token")
        assert client.get("/audit", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    store.close()


def test_a_placeholder_api_token_opens_nothing(tmp_path: Path) -> None:
    settings = Settings.model_validate({"mode": "dev", "storage": {"data_dir": str(tmp_path / "var")},
                                        "api": {"enabled": True, "token": "change-me"}})
    assert settings.api.legacy_token is None
    store = Store(settings.data_dir, fsync=False)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        assert client.get("/status", headers={"Authorization": "Bearer change-me"}).status_code == 401
    store.close()


def test_no_account_and_no_token_means_nobody_gets_in_and_the_log_says_how_to_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)  # production mode: no default account, no default password
    store = Store(settings.data_dir, fsync=False)
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, store)
    assert "portico users add NAME --role admin" in caplog.text
    with TestClient(app, raise_server_exceptions=False) as client:
        for user, password in (("admin", "admin"), ("admin", "change-me"), ("portico", "portico")):
            assert login(client, user, password).status_code == 401
    assert Accounts(store, settings.api).count() == 0
    store.close()
