"""``/health``, ``/health/live``, ``/health/ready`` and ``/metrics`` through the app: who may ask, what they learn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from appliance.api.app import create_app
from appliance.health import Readiness
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from dicom_router.ports import ReceivedInstance
from tests.support.stow import CONTENT_TYPE, ct_instance, multipart

LOCAL = ("127.0.0.1", 50000)
REMOTE = ("10.1.2.3", 50000)
SCRAPE_TOKEN = "scrape-t0ken-for-tests-only"
PATIENT = "Doe^Jane"
STUDY = "1.2.826.0.1.3680043.8.498.9"


def settings_for(tmp: Path, min_free_mb: int = 0, **metrics: Any) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp / "var"), "fsync": False,
                                                "min_free_mb": min_free_mb},
                                    "inference": {"models_dir": str(tmp / "models")},
                                    "api": {"enabled": True, "metrics": metrics}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "var", fsync=False)
    yield store
    store.close()


def client(settings: Settings, store: Store, address: tuple[str, int] = LOCAL) -> TestClient:
    return TestClient(create_app(settings, store), raise_server_exceptions=False, client=address)


def test_health_live_and_ready_are_public(tmp_path: Path, store: Store) -> None:
    with client(settings_for(tmp_path), store, REMOTE) as c:
        assert c.get("/health").json() == {"status": "ok"}  # as before
        assert c.get("/health/live").json() == {"status": "ok"}
        ready = c.get("/health/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert {name: check["ok"] for name, check in body["checks"].items()} == {"database": True, "disk": True}


def test_not_ready_below_the_disk_watermark(tmp_path: Path, store: Store) -> None:
    huge = 1 << 40  # MB: more than any disk has free
    with client(settings_for(tmp_path, min_free_mb=huge), store) as c:
        ready = c.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        disk = ready.json()["checks"]["disk"]
        assert not disk["ok"] and "below storage.min_free_mb" in disk["detail"]
        assert c.get("/health/live").status_code == 200  # alive all the same: no restart for a full disk


def test_readiness_follows_the_listeners_and_the_database(tmp_path: Path, store: Store) -> None:
    up = [True]
    readiness = Readiness(store, tmp_path, 0, {"scp": lambda: up[0]})
    assert all(c.ok for c in readiness.checks())
    up[0] = False
    assert {c.name: c.ok for c in readiness.checks()} == {"database": True, "disk": True, "scp": False}
    store.close()
    database = next(c for c in readiness.checks() if c.name == "database")
    assert not database.ok and "not reachable" in database.detail


def test_metrics_answer_this_machine_without_a_token_by_default(tmp_path: Path, store: Store) -> None:
    with client(settings_for(tmp_path), store) as c:
        scrape = c.get("/metrics")
        assert scrape.status_code == 200, scrape.text
        assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "portico_state_up 1.0" in scrape.text
        assert "portico_jobs{state=\"PENDING\"} 0.0" in scrape.text
    with client(settings_for(tmp_path), store, REMOTE) as c:
        refused = c.get("/metrics")
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert "portico_" not in refused.text


def test_metrics_with_a_token_need_it_and_no_users_token_opens_them(tmp_path: Path, store: Store) -> None:
    settings = settings_for(tmp_path, hosts=["127.0.0.1", "10.1.0.0/16"], token=SCRAPE_TOKEN)
    accounts = Accounts(store, settings.api)
    accounts.add("ada", "a long enough passphrase", [Role.ADMIN], actor="cli:test")
    admin = accounts.issue_token("ada", actor="cli:test").token
    with client(settings, store, REMOTE) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).status_code == 200
        # and the scrape token opens nothing else
        assert c.get("/status", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).status_code == 401
    with client(settings, store, ("192.168.9.9", 1)) as c:  # the right token from elsewhere
        assert c.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).status_code == 401


def test_metrics_can_be_turned_off(tmp_path: Path, store: Store) -> None:
    with client(settings_for(tmp_path, enabled=False), store) as c:
        assert c.get("/metrics").status_code == 404


def test_a_scrape_quotes_no_patient_data(tmp_path: Path, store: Store) -> None:
    store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{STUDY}.1.1", STUDY, f"{STUDY}.1",
                                 "1.2.840.10008.1.2.1", "PACS", "127.0.0.1", b"DICM" + PATIENT.encode()))
    with client(settings_for(tmp_path), store) as c:
        text = c.get("/metrics").text
    assert "portico_instances_stored 1.0" in text
    for secret in (PATIENT, STUDY, "PACS"):
        assert secret not in text


def test_stow_rs_ingest_is_counted_as_stow(tmp_path: Path, store: Store) -> None:
    token = "stow-sender-t0ken-for-tests"
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "router": {"stow_senders": [{"name": "PACSWEB", "token": token, "hosts": ["127.0.0.1"]}]},
        "api": {"enabled": True}})
    parts = [ct_instance(STUDY, f"{STUDY}.2", n) for n in range(3)]
    with client(settings, store) as c:
        stored = c.post(f"/dicom-web/studies/{STUDY}", content=multipart(*parts),
                        headers={"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE})
        assert stored.status_code == 200, stored.text
        text = c.get("/metrics").text
    assert 'portico_instances_received_total{protocol="stow"} 3.0' in text
    assert 'portico_instances_received_total{protocol="dimse"} 0.0' in text
    on_disk = sum(p.stat().st_size for p in (tmp_path / "var" / "instances").rglob("*.dcm"))
    assert f'portico_received_bytes_total{{protocol="stow"}} {float(on_disk)}' in text


def test_metrics_settings_refuse_an_open_scrape_beyond_this_machine_in_production(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"api\.metrics\.token"):
        settings_for(tmp_path, hosts=["0.0.0.0/0"])
    with pytest.raises(ValidationError, match="placeholder"):
        settings_for(tmp_path, token="change-me")
    with pytest.raises(ValidationError, match="not an IP address"):
        settings_for(tmp_path, hosts=["prometheus.example"])
    assert settings_for(tmp_path, hosts=["10.0.0.0/8"], token=SCRAPE_TOKEN).api.metrics.allows("::ffff:10.2.3.4")
