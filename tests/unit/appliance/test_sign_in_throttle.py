"""Failed sign-ins slow down and are audited: per user name, per address, wrong bearer tokens; a controlled clock.

Defaults (``api.lockout``): the 5th failure for a user name (10th from an address) locks it for 30 s,
each further failure doubles the wait, up to 900 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.lockout import LockKind, lock_seconds
from appliance.roles import Role
from appliance.settings import LockoutSettings, Settings
from appliance.store import Store
from appliance.users import Accounts
from tests.unit.appliance.test_api_auth import PAGE, PASSWORD, Clock

WRONG = "not the right passphrase"


@dataclass
class Site:
    app: FastAPI
    accounts: Accounts
    store: Store
    clock: Clock

    def client(self, address: str = "10.0.0.1") -> TestClient:
        return TestClient(self.app, raise_server_exceptions=False, client=(address, 40000))

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.store.audit_events() if e["event"] == event]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False,
                                                    "min_free_mb": 0},
                                        "inference": {"models_dir": str(tmp_path / "models")},
                                        "api": {"enabled": True}})
    store = Store(settings.data_dir, fsync=False)
    clock = Clock()
    accounts = Accounts(store, settings.api, clock)
    accounts.add("rita", PASSWORD, [Role.REVIEWER], actor="cli:test")
    yield Site(create_app(settings, store, clock=clock), accounts, store, clock)
    store.close()


def attempt(client: TestClient, user: str = "rita", password: str = WRONG) -> Any:
    return client.post("/auth/login", json={"username": user, "password": password}, headers=PAGE)


def assert_locked(response: Any, retry_after: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == str(retry_after)
    body = response.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == "locked"
    assert body["message"] == f"too many failed sign-ins; try again in {retry_after} s"


def test_the_schedule_doubles_from_30_seconds_to_15_minutes() -> None:
    settings = LockoutSettings()
    user = [lock_seconds(settings, LockKind.USER, n) for n in range(1, 13)]
    assert user == [0, 0, 0, 0, 30, 60, 120, 240, 480, 900, 900, 900]
    address = [lock_seconds(settings, LockKind.ADDRESS, n) for n in range(9, 16)]
    assert address == [0, 30, 60, 120, 240, 480, 900]
    assert lock_seconds(settings, LockKind.USER, 10_000) == 900


def test_a_user_name_is_locked_after_5_failures_from_any_address_doubling_to_15_minutes(site: Site) -> None:
    addresses = iter(f"10.0.1.{n}" for n in range(1, 250))  # one address each: only the user name's count grows

    def one(password: str = WRONG) -> Any:
        with site.client(next(addresses)) as client:
            return attempt(client, password=password)

    for _ in range(5):
        assert one().status_code == 401
    assert_locked(one(PASSWORD), 30)  # even the right password is not looked at
    site.clock.advance(29)
    assert_locked(one(), 1)
    site.clock.advance(1)
    for wait in (60, 120, 240, 480, 900, 900):
        assert one().status_code == 401  # the lock ended; this failure starts the next, longer one
        assert_locked(one(PASSWORD), wait)
        site.clock.advance(wait)
    ok = one(PASSWORD)
    assert ok.status_code == 200, ok.text
    assert site.accounts.lock(LockKind.USER, "rita") is None  # a success clears the user name's count

    locks = site.events("sign_in_locked")
    assert [(e["detail"]["kind"], e["detail"]["failures"], e["detail"]["seconds"]) for e in locks] == \
        [("user", n, s) for n, s in zip(range(5, 12), (30, 60, 120, 240, 480, 900, 900), strict=True)]
    failures = site.events("sign_in_failed")
    assert len(failures) == 11 and all(e["actor"] == "rita" for e in failures)
    assert {e["detail"]["reason"] for e in failures} == {"wrong_password"}


def test_an_address_is_locked_after_10_failures_whatever_the_names(site: Site) -> None:
    with site.client("10.0.2.1") as client:
        for n in range(10):
            assert attempt(client, f"guess{n}").status_code == 401
        assert_locked(attempt(client, "rita", PASSWORD), 30)
    with site.client("10.0.2.2") as elsewhere:
        assert attempt(elsewhere, "rita", PASSWORD).status_code == 200
    (locked,) = site.events("sign_in_locked")
    assert locked["detail"] | {"seconds": 30} == {"kind": "address", "key": "10.0.2.1", "failures": 10,
                                                  "address": "10.0.2.1", "route": "POST /auth/login",
                                                  "seconds": 30}


def test_failures_are_forgotten_after_an_hour_and_cleared_by_a_success(site: Site) -> None:
    with site.client() as client:
        for _ in range(4):
            assert attempt(client).status_code == 401
        assert attempt(client, password=PASSWORD).status_code == 200
        for _ in range(4):
            assert attempt(client).status_code == 401
        site.clock.advance(3601)
        for _ in range(4):
            assert attempt(client).status_code == 401
        lock = site.accounts.lock(LockKind.USER, "rita")
        assert lock is not None and lock.failures == 4 and lock.locked_until == 0


def test_70_wrong_bearer_tokens_are_audited_slowed_and_counted(site: Site) -> None:
    good = site.accounts.issue_token("rita", actor="cli:test").token
    site.accounts.add("ada", PASSWORD, [Role.ADMIN], actor="cli:test")
    admin = {"Authorization": f"Bearer {site.accounts.issue_token('ada', actor='cli:test').token}"}
    with site.client("10.0.3.1") as client:
        statuses = [client.get("/status", headers={"Authorization": f"Bearer pt_guess{n}"}).status_code
                    for n in range(70)]
        assert statuses == [401] * 10 + [429] * 60
        # a real token is not guessable: it still works from the locked address
        assert client.get("/status", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    failed = site.events("sign_in_failed")
    assert len(failed) == 10
    assert {(e["actor"], e["detail"]["reason"], e["detail"]["route"], e["detail"]["address"]) for e in failed} == \
        {("anonymous", "unknown_token", "GET /status", "10.0.3.1")}
    assert len(site.events("sign_in_locked")) == 1
    with site.client("10.0.3.2") as other:
        events = other.get("/auth/events", headers=admin).json()
    (lock,) = [x for x in events["locks"] if x["key"] == "10.0.3.1"]
    assert (lock["failures"], lock["refused_while_locked"]) == (10, 60)

    site.clock.advance(30)
    with site.client("10.0.3.1") as client:
        assert client.get("/status", headers={"Authorization": "Bearer pt_once-more"}).status_code == 401
        assert_locked(client.get("/status", headers={"Authorization": "Bearer pt_again"}), 60)
    latest = site.events("sign_in_failed")[-1]
    assert latest["detail"]["refused_while_locked"] == 60  # the refusals reach the audit with the next row
    assert site.events("sign_in_locked")[-1]["detail"]["seconds"] == 60
    for e in site.store.audit_events():
        assert good not in str(e) and "pt_guess" not in str(e)


def test_expired_revoked_and_disabled_tokens_are_refused_and_say_why_in_the_audit(site: Site) -> None:
    soon = site.accounts.issue_token("rita", actor="cli:test", days=1)
    revoked = site.accounts.issue_token("rita", actor="cli:test")
    site.accounts.revoke_token("rita", revoked.id, actor="cli:test")
    with site.client() as client:
        def status(token: str) -> int:
            return client.get("/review", headers={"Authorization": f"Bearer {token}"}).status_code

        assert status(soon.token) == 200
        assert status(revoked.token) == 401
        site.clock.advance(86400)
        assert status(soon.token) == 401
        fresh = site.accounts.issue_token("rita", actor="cli:test")
        site.accounts.set_disabled("rita", True, actor="cli:test")
        assert status(fresh.token) == 401
    reasons = [(e["actor"], e["detail"]["reason"], e["detail"]["token_id"]) for e in site.events("sign_in_failed")]
    assert reasons == [("rita", "revoked_token", revoked.id), ("rita", "expired_token", soon.id),
                       ("rita", "disabled_user", fresh.id)]
