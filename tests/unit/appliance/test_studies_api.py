"""``/studies``, ``/overview``, retry and resend, ``/audit/search`` and ``/audit/export`` through TestClient.

A store seeded with studies at every stage (:mod:`tests.support.studies`), on SQLite and on PostgreSQL; users
of each role with their own API tokens, as ``portico users`` makes them.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.db import instances
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from tests.support import studies as seeded
from tests.support.studies import HELD, NO_MATCH, PATIENT, RECEIVING, REJECTED, SENT, Seeded

PASSWORD = "a long enough passphrase"


@dataclass
class World:
    client: TestClient
    store: Store
    seeded: Seeded
    auth: dict[Role, dict[str, str]]

    def get(self, path: str, role: Role = Role.VIEWER, **params: Any) -> Any:
        response = self.client.get(path, headers=self.auth[role], params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def world(tmp_path: Path, database_url: str | None) -> Iterator[World]:
    """On SQLite, then on PostgreSQL (the same SQL on both)."""
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True},
        "review": {"models": ["held-model"]},
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"kind": "dimse", "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}]},
    })
    store = Store(settings.data_dir, fsync=False, database=database_url)
    accounts = Accounts(store, settings.api)
    auth = {}
    for role in Role:
        accounts.add(f"{role}-user", PASSWORD, [role], actor="cli:test")
        auth[role] = {"Authorization": f"Bearer {accounts.issue_token(f'{role}-user', actor='cli:test').token}"}
    made = seeded.seed(store, settings)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield World(client, store, made, auth)
    store.close()


def uids(page: dict[str, Any]) -> list[str]:
    return [s["study_uid"] for s in page["studies"]]


def test_the_list_shows_each_study_its_state_and_stages_newest_first(world: World) -> None:
    page = world.get("/studies")
    assert page["total"] == 5 and page["offset"] == 0 and page["limit"] == 50
    assert uids(page) == [REJECTED, HELD, RECEIVING, NO_MATCH, SENT]
    by_uid = {s["study_uid"]: s for s in page["studies"]}
    assert {u: s["state"] for u, s in by_uid.items()} == {
        SENT: "failed", NO_MATCH: "no_match", RECEIVING: "received", HELD: "inferred", REJECTED: "reviewed"}
    sent = by_uid[SENT]
    assert (sent["short_uid"], sent["calling_ae"], sent["series_count"], sent["instance_count"]) == \
        ("…3.8.498.5101", "CT_SCANNER", 1, 3)
    assert sent["models"] == ["liver-seg", "spleen-seg"] and (sent["jobs"], sent["failed_jobs"]) == (2, 1)
    stages = sent["stages"]
    assert list(stages) == ["received", "complete", "routed", "inferred", "reviewed", "sent"]
    assert [stages[s]["state"] for s in stages] == ["done", "done", "done", "failed", "skipped", "done"]
    assert stages["received"]["at"] <= stages["complete"]["at"] <= stages["routed"]["at"] <= stages["sent"]["at"]
    assert [by_uid[NO_MATCH]["stages"][s]["state"] for s in ("routed", "inferred", "sent")] == \
        ["done", "skipped", "skipped"]
    assert by_uid[NO_MATCH]["series_count"] == 2 and by_uid[NO_MATCH]["instance_count"] == 4
    assert by_uid[RECEIVING]["receiving"] is True
    assert by_uid[RECEIVING]["stages"]["complete"]["state"] == "waiting"
    assert by_uid[HELD]["stages"]["reviewed"]["state"] == "waiting"
    assert by_uid[REJECTED]["stages"]["reviewed"]["state"] == "done"
    assert page["choices"] == {"calling_ae": ["CT_SCANNER", "MR_SCANNER"],
                               "model": ["held-model", "liver-seg", "spleen-seg"],
                               "state": ["received", "complete", "no_match", "routed", "inferred", "reviewed",
                                         "sent", "failed"]}


def test_the_list_filters_and_pages(world: World) -> None:
    assert uids(world.get("/studies", state="no_match")) == [NO_MATCH]
    assert uids(world.get("/studies", failed="true")) == [SENT]
    assert uids(world.get("/studies", failed="true", state="sent")) == []
    assert uids(world.get("/studies", calling_ae="MR_SCANNER")) == [NO_MATCH]
    assert uids(world.get("/studies", model="held-model")) == [REJECTED, HELD]
    assert uids(world.get("/studies", model="held-model", state="inferred")) == [HELD]
    now = time.time()
    assert uids(world.get("/studies", since=now + 60)) == []
    assert world.get("/studies", since=now - 3600, until=now + 60)["total"] == 5
    assert uids(world.get("/studies", until=now - 3600)) == []
    first = world.get("/studies", limit=2)
    second = world.get("/studies", limit=2, offset=2)
    third = world.get("/studies", limit=2, offset=4)
    assert first["total"] == second["total"] == third["total"] == 5
    assert uids(first) + uids(second) + uids(third) == uids(world.get("/studies"))
    for params in ({"state": "nonsense"}, {"limit": 0}, {"limit": 201}, {"offset": -1}, {"calling_ae": "X" * 17}):
        response = world.client.get("/studies", params=params, headers=world.auth[Role.VIEWER])
        assert response.status_code == 422 and response.json()["code"] == "invalid_request", params


def test_a_study_page_has_its_series_jobs_with_errors_results_and_outbox(world: World) -> None:
    study = world.get(f"/studies/{SENT}")
    assert study["state"] == "failed"
    assert [(s["series_uid"], s["instances"], s["sop_classes"]) for s in study["series"]] == \
        [(f"{SENT}.1", 3, [seeded.CT])]
    assert [(r["version"], r["reason"], r["instances"]) for r in study["runs"]] == [(1, "quiet", 3)]
    done, failed = study["job_list"]
    assert (done["id"], done["state"], done["error_code"], done["timings"]) == \
        (world.seeded.done_job, "DONE", None, {"predict": 1.5})
    assert [r["sop_instance_uid"] for r in done["results"]] == [f"9.{SENT}.1"]
    assert (failed["id"], failed["state"], failed["attempts"]) == (world.seeded.failed_job, "FAILED", 1)
    assert (failed["error_code"], failed["error_message"]) == \
        ("series_unusable", "series has inconsistent slice spacing")
    assert failed["created"] is not None and failed["results"] == []
    (row,) = study["outbox"]
    assert (row["job_id"], row["destination"], row["state"], row["attempts"]) == (world.seeded.done_job, "pacs",
                                                                                 "SENT", 1)
    assert "path" not in row
    assert world.client.get(f"/studies/{SENT}.9", headers=world.auth[Role.VIEWER]).status_code == 404
    assert world.client.get("/studies/not-a-uid", headers=world.auth[Role.VIEWER]).status_code == 422
    for path in ("/studies", f"/studies/{SENT}", f"/studies/{HELD}", "/overview"):
        assert PATIENT not in world.client.get(path, headers=world.auth[Role.VIEWER]).text


def audit_rows(world: World, event: str) -> list[dict[str, Any]]:
    return [e for e in world.store.audit_events() if e["event"] == event]


def test_an_admin_retries_a_failed_job_and_it_is_audited(world: World) -> None:
    job = world.seeded.failed_job
    for role in (Role.VIEWER, Role.REVIEWER, Role.MODEL_ADMIN, Role.FL_APPROVER):
        refused = world.client.post(f"/jobs/{job}/retry", headers=world.auth[role])
        assert refused.status_code == 403 and "jobs.manage" in refused.json()["message"]
    response = world.client.post(f"/jobs/{job}/retry", headers=world.auth[Role.ADMIN])
    assert response.status_code == 200, response.text
    assert (response.json()["state"], response.json()["attempts"], response.json()["error"]) == ("PENDING", 0, None)
    (row,) = audit_rows(world, "job_retried")
    assert (row["actor"], row["job_id"], row["study_uid"]) == ("admin-user", job, SENT)
    assert row["detail"]["previous_code"] == "series_unusable" and row["detail"]["via"] == "api"
    again = world.client.post(f"/jobs/{job}/retry", headers=world.auth[Role.ADMIN])
    assert again.status_code == 409 and again.json()["code"] == "not_failed"
    assert world.client.post(f"/jobs/{world.seeded.done_job}/retry", headers=world.auth[Role.ADMIN]).status_code == 409
    assert world.client.post("/jobs/999/retry", headers=world.auth[Role.ADMIN]).status_code == 404
    assert world.get(f"/studies/{SENT}")["state"] == "routed"  # its job waits in the queue again


def test_an_admin_resends_results_but_never_a_rejected_jobs(world: World) -> None:
    assert world.client.post(f"/studies/{SENT}/resend", headers=world.auth[Role.REVIEWER],
                             json={}).status_code == 403
    response = world.client.post(f"/studies/{SENT}/resend", headers=world.auth[Role.ADMIN],
                                 json={"destination": "pacs"})
    assert response.status_code == 200, response.text
    assert response.json() == {"study_uid": SENT, "queued": {"pacs": 1}}
    (row,) = world.get(f"/studies/{SENT}")["outbox"]
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == ("PENDING", 0, 0)
    assert [i.sop_instance_uid for i in world.store.due(10)] == [f"9.{SENT}.1"]
    (audited,) = audit_rows(world, "results_resent")
    assert (audited["actor"], audited["study_uid"], audited["detail"]) == \
        ("admin-user", SENT, {"destination": "pacs", "items": {"pacs": 1}, "via": "api"})
    for study, body in ((REJECTED, {}), (HELD, None), (SENT, {"destination": "archive"})):
        refused = world.client.post(f"/studies/{study}/resend", headers=world.auth[Role.ADMIN], json=body)
        assert refused.status_code == 409 and refused.json()["code"] == "nothing_to_resend", study
    assert world.client.post(f"/studies/{SENT}.9/resend", headers=world.auth[Role.ADMIN]).status_code == 404
    assert world.client.post(f"/studies/{SENT}/resend", headers=world.auth[Role.ADMIN],
                             json={"destination": "pacs", "extra": 1}).status_code == 422


def test_the_overview_counts_jobs_outbox_disk_and_the_last_day_per_hour(world: World) -> None:
    body = world.get("/overview")
    assert body["jobs"] == {"DONE": 3, "FAILED": 1}
    assert set(body["outbox"]) == {"archive", "pacs"}
    assert body["outbox"]["archive"] == {"pending": 0, "held": 1 - 1, "failed": 0, "oldest_pending": None}
    assert body["outbox"]["pacs"]["held"] == 1 and body["outbox"]["pacs"]["pending"] == 0
    assert body["disk"]["free_bytes"] > 0 and body["disk"]["total_bytes"] >= body["disk"]["free_bytes"]
    assert body["sessions_loaded"] is None
    chart = body["received"]
    assert len(chart["instances"]) == len(chart["studies"]) == 24 and chart["hour_seconds"] == 3600
    assert sum(chart["instances"]) == 3 + 4 + 1 + 2 + 2 and chart["instances"][-1] == 12
    assert sum(chart["studies"]) == 5
    assert chart["start"] <= time.time() < chart["start"] + 24 * 3600


def test_received_per_hour_puts_each_instance_in_its_hour(world: World) -> None:
    start = 1_700_000_000 - 1_700_000_000 % 3600
    with world.store.transaction() as tx:
        for n, at in enumerate((start + 0.2, start + 3599.4, start + 3600.0, start + 5 * 3600 + 10, start - 1.0,
                                start + 24 * 3600)):
            tx.execute("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, "
                       "transfer_syntax, path, size, received_at) VALUES (?,?,?,?,?,?,?,?)",
                       (f"7.{n}", "7", "7.1", seeded.CT, "1.2", f"/x/{n}", 1, at))
    with world.store.reading() as tx:
        counts = instances.received_per_hour(tx, start, 24)
    assert counts[:6] == [2, 1, 0, 0, 0, 1] and sum(counts) == 4


def test_audit_search_by_actor_event_study_and_time_pages_newest_first(world: World) -> None:
    for role in (Role.VIEWER, Role.REVIEWER, Role.MODEL_ADMIN, Role.FL_APPROVER):
        assert world.client.get("/audit/search", headers=world.auth[role]).status_code == 403
        assert world.client.get("/audit/export", headers=world.auth[role]).status_code == 403
    rejected = world.get("/audit/search", Role.ADMIN, actor="RIT")
    assert [(r["event"], r["actor"], r["job_id"]) for r in rejected["rows"]] == \
        [("reviewed", "rita", world.seeded.rejected_job)]
    assert rejected["next_before"] is None and "job_retried" in rejected["events"]
    by_study = world.get("/audit/search", Role.ADMIN, study="498.5102")["rows"]
    assert by_study and {r["study_uid"] for r in by_study} == {NO_MATCH}
    assert by_study[0]["event"] == "no_match"
    received = world.get("/audit/search", Role.ADMIN, event="received", limit=5)
    assert len(received["rows"]) == 5 and received["next_before"] == received["rows"][-1]["id"]
    ids = [r["id"] for r in received["rows"]]
    assert ids == sorted(ids, reverse=True)
    rest = world.get("/audit/search", Role.ADMIN, event="received", limit=500, before=received["next_before"])
    assert len(rest["rows"]) == 12 - 5 and rest["next_before"] is None
    assert world.get("/audit/search", Role.ADMIN, since=time.time() + 60)["rows"] == []
    assert world.get("/audit/search", Role.ADMIN, actor="100%_")["rows"] == []  # wildcards are literal
    assert world.client.get("/audit/search", params={"study": "1.2'"},
                            headers=world.auth[Role.ADMIN]).status_code == 422


def test_audit_export_is_csv_oldest_first_and_is_audited(world: World) -> None:
    response = world.client.get("/audit/export", params={"study": "498.5101"}, headers=world.auth[Role.ADMIN])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="portico-audit-')
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == ["id", "time", "ts", "event", "study_uid", "job_id", "actor", "detail", "prev_hash",
                             "hash"]
    assert [r["event"] for r in rows][:4] == ["received", "received", "received", "study_complete"]
    assert {r["study_uid"] for r in rows} == {SENT} and all(len(r["hash"]) == 64 for r in rows)
    assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)
    (exported,) = audit_rows(world, "audit_exported")
    assert exported["actor"] == "admin-user"
    assert exported["detail"]["rows"] == len(rows) and exported["detail"]["filters"]["study"] == "498.5101"
    assert PATIENT not in response.text
