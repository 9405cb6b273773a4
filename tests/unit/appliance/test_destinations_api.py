"""``/destinations``, ``/peers/{ae}/echo``: reachability, TLS, the outbox, and pausing a destination.

A store seeded with studies at every stage (:mod:`tests.support.studies`), on SQLite and on PostgreSQL; a
real Verification SCP (pynetdicom) to C-ECHO and a closed port that refuses; real certificates
(:mod:`tests.support.certs`). The dispatcher's view of a paused destination is the outbox's ``due``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.api.app import create_app
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import OUTBOX, Store
from appliance.users import Accounts
from tests.support import studies as seeded
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port

PASSWORD = "a long enough passphrase"


@dataclass
class World:
    client: TestClient
    store: Store
    auth: dict[Role, dict[str, str]]
    pki: Pki
    closed_port: int

    def get(self, path: str, role: Role = Role.VIEWER, **params: Any) -> Any:
        response = self.client.get(path, headers=self.auth[role], params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, role: Role, body: Any = None) -> Any:
        return self.client.post(path, headers=self.auth[role], json=body)


@pytest.fixture(scope="module")
def echo_scp() -> Iterator[int]:
    """A real Verification SCP on a free loopback port."""
    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


@pytest.fixture
def world(tmp_path: Path, database_url: str | None, echo_scp: int) -> Iterator[World]:
    pki = make_pki(tmp_path / "pki")
    closed = free_port()  # nothing listens there: refused at once
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True},
        "review": {"models": ["held-model"]},
        "router": {
            "tls": {"certificate": str(pki.client("portico").cert), "private_key": str(pki.client("portico").key),
                    "ca_bundle": str(pki.ca.cert)},
            "peers": [{"ae_title": "CT_SCANNER", "hosts": ["127.0.0.1"], "query_port": echo_scp,
                       "query_ae_title": "ARCHIVE"},
                      {"ae_title": "MR_SCANNER", "tls": "required",
                       "certificate_subject": "CN=modality-1,O=Portico Test"}]},
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": closed},
            {"kind": "dimse", "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": echo_scp},
            {"kind": "dimse", "name": "secure", "ae_title": "SECURE", "host": "127.0.0.1", "port": closed,
             "tls": "required", "server_hostname": "localhost"},
            {"kind": "stow", "name": "web", "url": f"http://127.0.0.1:{closed}/dicom-web"}]},
    })
    store = Store(settings.data_dir, fsync=False, database=database_url)
    accounts = Accounts(store, settings.api)
    auth = {}
    for role in Role:
        accounts.add(f"{role}-user", PASSWORD, [role], actor="cli:test")
        auth[role] = {"Authorization": f"Bearer {accounts.issue_token(f'{role}-user', actor='cli:test').token}"}
    seeded.seed(store, settings)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield World(client, store, auth, pki, closed)
    store.close()


def a_failed_try(world: World) -> int:
    """The sent study's result queued again for ``pacs``, tried once and failed: due again in a minute."""
    response = world.post(f"/studies/{seeded.SENT}/resend", Role.ADMIN, {"destination": "pacs"})
    assert response.status_code == 200, response.text
    (item,) = world.store.due(10)
    world.store.mark_failed(item.id, "association rejected", 60, permanent=False)
    return item.id


def test_each_destination_shows_its_outbox_tls_and_each_peer_what_it_sent(world: World) -> None:
    a_failed_try(world)
    page = world.get("/destinations")
    by_name = {d["name"]: d for d in page["destinations"]}
    assert list(by_name) == ["pacs", "archive", "secure", "web"]
    pacs = by_name["pacs"]
    assert (pacs["kind"], pacs["configured"], pacs["echo"], pacs["paused"]) == ("dimse", True, "C-ECHO", None)
    assert pacs["address"] == f"PACS@127.0.0.1:{world.closed_port}"
    box = pacs["outbox"]
    assert box["states"] == {"PENDING": 1, "HELD": 1, "CANCELLED": 1}
    assert box["last_error"] == "association rejected"
    assert box["next_retry_at"] is not None and box["oldest_pending"] is not None
    assert box["last_sent"] is not None  # the first time the study's result went out
    assert pacs["tls"]["mode"] == "off" and pacs["tls"]["files"] == []
    assert by_name["archive"]["outbox"] == {"states": {}, "last_error": None, "next_retry_at": None,
                                            "oldest_pending": None, "last_sent": None}
    secure = by_name["secure"]["tls"]
    assert secure["mode"] == "required" and secure["server_name"] == "localhost"
    assert "router.tls.ca_bundle" in secure["summary"] and "we present router.tls.certificate" in secure["summary"]
    files = {f["setting"]: f for f in secure["files"]}
    (ours,) = files["router.tls.certificate"]["certificates"]
    assert ours["subject"] == world.pki.client("portico").subject and ours["valid_now"] and ours["days_left"] > 0
    assert [c["subject"] for c in files["router.tls.ca_bundle"]["certificates"]] == [world.pki.ca.subject]
    web = by_name["web"]
    assert (web["kind"], web["echo"], web["tls"]["mode"]) == ("stow", "TCP connect", "off")
    peers = {p["ae_title"]: p for p in page["peers"]}
    assert peers["CT_SCANNER"]["studies"] == 4 and peers["CT_SCANNER"]["last_received"] is not None
    assert peers["CT_SCANNER"]["query"].startswith("ARCHIVE@127.0.0.1:")
    mr = peers["MR_SCANNER"]
    assert (mr["studies"], mr["query"], mr["tls"]["mode"]) == (1, None, "required")
    assert mr["tls"]["binding"] == "subject CN=modality-1,O=Portico Test"
    assert page["calling_ae"] == "PORTICO"


def test_the_outbox_of_one_destination_pages_newest_first_without_paths(world: World) -> None:
    item = a_failed_try(world)
    page = world.get("/destinations/pacs/outbox")
    assert page["total"] == 3 and [i["state"] for i in page["items"]] == ["CANCELLED", "HELD", "PENDING"]
    assert page["items"][-1]["id"] == item and page["items"][-1]["study_uid"] == seeded.SENT
    assert "path" not in page["items"][0]
    assert [i["id"] for i in world.get("/destinations/pacs/outbox", state="PENDING")["items"]] == [item]
    assert world.get("/destinations/pacs/outbox", limit=1, offset=1)["items"][0]["state"] == "HELD"
    assert world.get("/destinations/nowhere/outbox")["total"] == 0
    refused = world.client.get("/destinations/pacs/outbox", params={"state": "NONSENSE"},
                               headers=world.auth[Role.VIEWER])
    assert refused.status_code == 422


def test_echo_answers_ok_from_a_live_scp_and_says_why_not_from_a_closed_port(world: World) -> None:
    ok = world.post("/destinations/archive/echo", Role.VIEWER)
    assert ok.status_code == 200, ok.text
    assert (ok.json()["ok"], ok.json()["method"]) == (True, "C-ECHO")
    assert ok.json()["detail"] == "answered C-ECHO with success"
    refused = world.post("/destinations/pacs/echo", Role.VIEWER).json()
    assert refused["ok"] is False and refused["detail"]
    web = world.post("/destinations/web/echo", Role.VIEWER).json()
    assert (web["ok"], web["method"]) == (False, "TCP connect") and "cannot be reached" in web["detail"]
    assert world.post("/destinations/nowhere/echo", Role.VIEWER).status_code == 404
    peer = world.post("/peers/CT_SCANNER/echo", Role.VIEWER)
    assert peer.status_code == 200 and peer.json()["ok"] is True, peer.text
    not_queried = world.post("/peers/MR_SCANNER/echo", Role.VIEWER)
    assert not_queried.status_code == 409 and not_queried.json()["code"] == "not_queried"
    assert world.post("/peers/NOBODY/echo", Role.VIEWER).status_code == 404
    assert world.client.post("/destinations/archive/echo").status_code == 401


def test_a_paused_destination_gets_nothing_until_resumed_and_both_are_audited(world: World) -> None:
    item = a_failed_try(world)
    with world.store.transaction() as tx:  # due now rather than in a minute
        tx.execute("UPDATE outbox SET next_attempt_at = 0 WHERE id = ?", (item,))
    assert [i.id for i in world.store.due(10)] == [item]

    refused = world.post("/destinations/pacs/pause", Role.VIEWER, {"reason": "PACS upgrade"})
    assert refused.status_code == 403 and "destinations.manage" in refused.json()["message"]
    for role in (Role.REVIEWER, Role.MODEL_ADMIN, Role.FL_APPROVER):
        assert world.post("/destinations/pacs/pause", role, {"reason": "x"}).status_code == 403
    assert world.post("/destinations/pacs/pause", Role.ADMIN, {"reason": ""}).status_code == 422
    paused = world.post("/destinations/pacs/pause", Role.ADMIN, {"reason": "PACS upgrade tonight"})
    assert paused.status_code == 200, paused.text
    assert paused.json() == {"destination": "pacs", "paused": True, "waiting": 1}
    assert world.store.due(10) == [] and world.store.next_due(OUTBOX) is None
    again = world.post("/destinations/pacs/pause", Role.ADMIN, {"reason": "again"})
    assert again.status_code == 409 and again.json()["code"] == "already_paused"
    shown = {d["name"]: d for d in world.get("/destinations")["destinations"]}["pacs"]["paused"]
    assert (shown["actor"], shown["reason"]) == ("admin-user", "PACS upgrade tonight")
    assert world.post("/destinations/nowhere/pause", Role.ADMIN, {"reason": "x"}).status_code == 404

    assert world.post("/destinations/pacs/resume", Role.VIEWER).status_code == 403
    token = world.store.db.wakeups.token(OUTBOX)
    resumed = world.post("/destinations/pacs/resume", Role.ADMIN)
    assert resumed.status_code == 200 and resumed.json() == {"destination": "pacs", "paused": False, "waiting": 1}
    assert world.store.db.wakeups.token(OUTBOX) != token  # the dispatcher is woken, not left asleep
    assert [i.id for i in world.store.due(10)] == [item]
    not_paused = world.post("/destinations/pacs/resume", Role.ADMIN)
    assert not_paused.status_code == 409 and not_paused.json()["code"] == "not_paused"

    rows = [e for e in world.store.audit_events() if e["event"] in ("destination_paused", "destination_resumed")]
    assert [(e["event"], e["actor"], e["detail"]["destination"], e["detail"]["via"]) for e in rows] == [
        ("destination_paused", "admin-user", "pacs", "api"), ("destination_resumed", "admin-user", "pacs", "api")]
    assert rows[0]["detail"]["reason"] == "PACS upgrade tonight" and rows[0]["detail"]["waiting"] == 1
    assert rows[1]["detail"]["pause_reason"] == "PACS upgrade tonight"


def test_pausing_one_destination_leaves_the_others_due(world: World) -> None:
    a_failed_try(world)
    with world.store.transaction() as tx:
        tx.execute("UPDATE outbox SET next_attempt_at = 0")
    response = world.post(f"/studies/{seeded.SENT}/resend", Role.ADMIN, {"destination": "pacs"})
    assert response.status_code in (200, 409)
    assert world.post("/destinations/archive/pause", Role.ADMIN, {"reason": "not used"}).status_code == 200
    assert {i.destination for i in world.store.due(10)} == {"pacs"}
