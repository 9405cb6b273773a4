"""The HTTP API through FastAPI's TestClient on a temporary store: auth, shapes, status, models, FL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.audit import AuditEvent
from appliance.fl import layout_of
from appliance.settings import Settings
from appliance.store import Store
from dicom_router.ports import ReceivedInstance
from fl_client.approvals import Approvals
from tests.support.packages import make_package

TOKEN = "t0ken-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = f"{STUDY}.1"
PATIENT = "Doe^Jane"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
                                    "inference": {"models_dir": str(tmp_path / "models")},
                                    "api": {"enabled": True, "token": TOKEN}})


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store(settings.data_dir, fsync=False)
    yield store
    store.close()


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield client


def seed(store: Store, n: int = 3) -> list[int]:
    """``n`` instances of one study (with a patient name in the bytes), routed to two jobs: one done, one failed."""
    for i in range(n):
        store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{SERIES}.{i}", STUDY, SERIES,
                                     "1.2.840.10008.1.2.1", "PACS", "127.0.0.1",
                                     b"DICM" + PATIENT.encode() + bytes([i]) * 64))
    run = store.hand_off(STUDY, "quiet")
    assert run is not None
    ids = store.record_routes(run, [("r1", "tiny", None, SERIES, "k1"), ("r2", "other", None, SERIES, "k2")])
    done = store.claim_job()
    assert done is not None
    store.complete_job(done, [], [], "CPUExecutionProvider", "abc", {"predict": 0.1})
    failed = store.claim_job()
    assert failed is not None
    store.fail_job(failed, "bad geometry", "series_unusable", None)
    return ids


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "request_id"}
    assert body["code"] == code
    assert len(body["request_id"]) == 32
    assert response.headers["X-Request-ID"] == body["request_id"]
    return body


def test_health_is_public_and_everything_else_needs_the_token(client: TestClient) -> None:
    ok = client.get("/health")
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}
    assert len(ok.headers["X-Request-ID"]) == 32
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer "}, {"Authorization": TOKEN}):
        for method, path in (("GET", "/status"), ("GET", "/jobs"), ("GET", "/audit"), ("GET", "/fl/status"),
                             ("GET", "/models"), ("POST", "/models/tiny/1.0.0/promote"),
                             ("POST", "/fl/jobs/abc/approve"), ("GET", "/no-such-path"), ("GET", "/docs"),
                             ("GET", "/openapi.json")):
            response = client.request(method, path, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/status", headers=AUTH).status_code == 200


def test_no_docs_or_schema_are_served(client: TestClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_error(client.get(path, headers=AUTH), 404, "not_found")


def test_status_counts_and_recent_jobs(client: TestClient, store: Store) -> None:
    ids = seed(store)
    store.quarantine(b"junk", "unparseable", "PACS", "127.0.0.1")
    body = client.get("/status", headers=AUTH).json()
    assert body["instances"] == 3
    assert body["quarantined"] == 1
    assert body["jobs"] == {"DONE": 1, "FAILED": 1}
    assert body["outbox"] == {}
    assert [(j["id"], j["model"], j["state"]) for j in body["recent_jobs"]] == \
        [(ids[0], "tiny", "DONE"), (ids[1], "other", "FAILED")]
    assert body["recent_jobs"][0]["provider"] == "CPUExecutionProvider"
    assert body["recent_jobs"][1]["error"] == "series_unusable: bad geometry"


def test_jobs_list_filter_and_one(client: TestClient, store: Store) -> None:
    ids = seed(store)
    jobs = client.get("/jobs", headers=AUTH).json()
    assert [j["id"] for j in jobs] == ids
    assert jobs[0]["study_uid"] == STUDY and jobs[0]["series_uid"] == SERIES
    assert client.get("/jobs", params={"study_uid": STUDY}, headers=AUTH).json() == jobs
    assert client.get("/jobs", params={"study_uid": "1.2.3"}, headers=AUTH).json() == []
    one = client.get(f"/jobs/{ids[1]}", headers=AUTH).json()
    assert one["state"] == "FAILED" and one["attempts"] == 1
    missing = assert_error(client.get("/jobs/999", headers=AUTH), 404, "not_found")
    assert "999" in missing["message"]


def test_validation_errors_share_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/jobs", params={"study_uid": "not-a-uid"}, headers=AUTH), 422, "invalid_request")
    assert_error(client.get("/jobs/abc", headers=AUTH), 422, "invalid_request")
    assert_error(client.get("/audit", params={"limit": 0}, headers=AUTH), 422, "invalid_request")
    assert_error(client.post("/fl/jobs/abc/approve", json={"reason": 5, "x": 1}, headers=AUTH), 422,
                 "invalid_request")
    assert_error(client.post("/fl/jobs/.hidden/approve", headers=AUTH), 422, "invalid_request")
    assert_error(client.post("/fl/jobs/..%2Fetc/approve", headers=AUTH), 404, "not_found")
    assert_error(client.post("/models/tiny/1.0.0/promote", headers={**AUTH, "Content-Type": "application/json"},
                             content=b"{not json"), 404, "not_found")
    assert_error(client.delete("/status", headers=AUTH), 405, "method_not_allowed")


def test_audit_newest_first_filtered_and_limited(client: TestClient, store: Store) -> None:
    seed(store)
    rows = client.get("/audit", headers=AUTH).json()
    assert len(rows) == len(store.audit_events())
    assert rows[0]["ts"] >= rows[-1]["ts"]
    assert rows[0]["event"] == AuditEvent.JOB_STATE
    assert all(r["study_uid"] == STUDY for r in client.get("/audit", params={"study_uid": STUDY},
                                                           headers=AUTH).json())
    assert len(client.get("/audit", params={"limit": 2}, headers=AUTH).json()) == 2


def test_no_patient_identifiers_in_responses(client: TestClient, store: Store) -> None:
    ids = seed(store)
    for path in ("/status", "/jobs", f"/jobs/{ids[0]}", "/audit", "/fl/status", "/models"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 200
        assert PATIENT not in response.text and "Doe" not in response.text


def test_unexpected_errors_are_500_without_internals(client: TestClient, store: Store,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def broken(study_uid: str | None = None) -> list[Any]:
        raise RuntimeError("disk /secret/path exploded")

    monkeypatch.setattr(store, "jobs", broken)
    body = assert_error(client.get("/jobs", headers=AUTH), 500, "internal")
    assert "secret" not in body["message"]
    assert body["request_id"] in caplog.text  # the log ties the answer to the traceback


def test_models_list_promote_enable_disable_audited(client: TestClient, settings: Settings, store: Store) -> None:
    make_package(settings.models_dir / "tiny-1.0.0", "1.0.0")
    make_package(settings.models_dir / "tiny-1.1.0", "1.1.0")
    listed = {m["version"]: m for m in client.get("/models", headers=AUTH).json()}
    # nothing recorded yet: the highest release runs
    assert listed["1.0.0"]["role"] == "candidate" and listed["1.1.0"]["role"] == "active"
    assert listed["1.0.0"]["installed"] and not listed["1.0.0"]["recorded"]

    promoted = client.post("/models/tiny/1.0.0/promote", headers=AUTH)  # a roll-back
    assert promoted.status_code == 200, promoted.text
    assert promoted.json() == {"name": "tiny", "version": "1.0.0", "previous": "1.1.0"}
    roles = {m["version"]: (m["role"], m["recorded"]) for m in client.get("/models", headers=AUTH).json()}
    assert roles == {"1.0.0": ("active", True), "1.1.0": ("candidate", True)}

    disabled = client.post("/models/tiny/1.1.0/disable", headers=AUTH).json()
    assert disabled == {"name": "tiny", "version": "1.1.0", "enabled": False, "was_enabled": True}
    assert_error(client.post("/models/tiny/1.1.0/promote", headers=AUTH), 409, "conflict")
    assert client.post("/models/tiny/1.1.0/enable", headers=AUTH).json()["enabled"] is True

    assert_error(client.post("/models/tiny/9.9.9/promote", headers=AUTH), 404, "not_found")
    assert_error(client.post("/models/nothing/1.0.0/enable", headers=AUTH), 404, "not_found")

    events = [(e["event"], e["detail"].get("version"), e["actor"]) for e in store.audit_events()
              if e["event"] != AuditEvent.MODEL_ADDED]
    assert events == [(AuditEvent.MODEL_PROMOTED, "1.0.0", "api"), (AuditEvent.MODEL_DISABLED, "1.1.0", "api"),
                      (AuditEvent.MODEL_ENABLED, "1.1.0", "api")]
    assert {e["actor"] for e in store.audit_events()} == {"api"}


def test_models_tampered_package_is_422(client: TestClient, settings: Settings, store: Store) -> None:
    make_package(settings.models_dir / "tiny-1.0.0", "1.0.0")
    make_package(settings.models_dir / "tiny-1.1.0", "1.1.0")
    (settings.models_dir / "tiny-1.1.0" / "MODEL_CARD.md").write_text("# tampered\n")
    body = assert_error(client.post("/models/tiny/1.1.0/promote", headers=AUTH), 422, "package_invalid")
    assert str(settings.data_dir) not in body["message"]
    assert any(e["event"] == AuditEvent.MODEL_REFUSED and e["actor"] == "api" for e in store.audit_events())


def test_fl_status_without_enrolment(client: TestClient) -> None:
    body = client.get("/fl/status", headers=AUTH).json()
    assert body["enrolled"] is False and body["state"] == "not_enrolled"


def test_fl_approve_and_reject(client: TestClient, settings: Settings, store: Store) -> None:
    assert_error(client.post("/fl/jobs/unknown-job/approve", json={"reason": "ok"}, headers=AUTH), 404,
                 "not_found")
    assert_error(client.post("/fl/jobs/unknown-job/reject", headers=AUTH), 404, "not_found")

    layout = layout_of(settings)
    layout.ensure()
    Approvals(layout).note_pending("job-1", name="liver-fedavg", submitter="admin@hub", command="check",
                                   reason="not approved yet", meta={})
    # an approval binds the job's content: without a content hash there is nothing to approve
    refused = assert_error(client.post("/fl/jobs/job-1/approve", json={"reason": "IRB 42"}, headers=AUTH), 409,
                           "fl_policy")
    assert "content" in refused["message"]
    sha = "ab" * 32
    approved = client.post("/fl/jobs/job-1/approve", json={"reason": "IRB 42", "content_sha256": sha}, headers=AUTH)
    assert approved.status_code == 200, approved.text
    assert approved.json()["decision"] == "approved" and approved.json()["actor"] == "api"
    assert approved.json()["client_app_sha256"] == sha
    assert client.post("/fl/jobs/job-1/reject", headers=AUTH).json()["decision"] == "rejected"
    events = [(e["event"], e["actor"], e["detail"]["reason"]) for e in store.audit_events()]
    assert events == [(AuditEvent.FL_JOB_APPROVED, "api", "IRB 42"), (AuditEvent.FL_JOB_REJECTED, "api", "")]
    pending = client.get("/fl/status", headers=AUTH).json()["pending_approval"]
    assert [p["job_id"] for p in pending] == ["job-1"]
