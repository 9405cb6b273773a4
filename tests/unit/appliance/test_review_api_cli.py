"""``/review`` and ``portico review`` on a seeded store: listing, detail, decisions, errors, exit codes."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.cli.main import main
from appliance.handoff import short
from appliance.review import Reviews
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import ResultFile, Store
from appliance.users import Accounts
from dicom_router.ports import ReceivedInstance

REVIEWER = "dr.api"
STUDY = "1.2.826.0.1.3680043.8.498.77"
SERIES = f"{STUDY}.1"
PATIENT = "Doe^Jane"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "portico.yaml"
    path.write_text(yaml.safe_dump({
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "api": {"enabled": True},
        "review": {"models": ["held-model"]},
    }))
    return path


@pytest.fixture
def settings(config: Path) -> Settings:
    return Settings.model_validate(yaml.safe_load(config.read_text()))


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = Store(settings.data_dir, fsync=False)
    yield store
    store.close()


def seed(store: Store, settings: Settings) -> dict[str, int]:
    """One study with three jobs: ``held`` (held-model), ``sent`` (not held) and ``pending`` (not run)."""
    for i in range(2):
        store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{SERIES}.{i}", STUDY, SERIES,
                                     "1.2.840.10008.1.2.1", "PACS", "127.0.0.1",
                                     b"DICM" + PATIENT.encode() + bytes([i]) * 64))
    run = store.hand_off(STUDY, "quiet")
    assert run is not None
    ids = store.record_routes(run, [("r1", "held-model", "2.0.0", SERIES, "k1"), ("r2", "other", None, SERIES, "k2"),
                                    ("r3", "late", None, SERIES, "k3")])
    reviews = Reviews(store, settings.review)
    for n in range(2):
        job = store.claim_job()
        assert job is not None
        folder = store.results_dir / f"job-{job.id}"
        folder.mkdir(parents=True)
        results = [
            ResultFile(f"9.{n}.1", "seg", SEG_CLASS, folder / "seg.dcm", {"model": f"{job.model}@2.0.0"}),
            ResultFile(f"9.{n}.2", "sr", SR_CLASS, folder / "sr.dcm", {"model": f"{job.model}@2.0.0", "measurements": [
                {"label": 1, "name": "Liver", "voxel_count": 10, "volume_ml": 1520.34, "mean": 55.21, "stddev": 3.0,
                 "min": 1.0, "max": 90.0}]}),
        ]
        for r in results:
            r.path.write_bytes(b"DICM")
        store.complete_job(job, results, ["pacs"], "CPUExecutionProvider", "abc", {}, hold=reviews.hold_for(job))
    return {"held": ids[0], "sent": ids[1], "pending": ids[2]}


@pytest.fixture
def client(settings: Settings, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def auth(settings: Settings, store: Store) -> dict[str, str]:
    """A reviewer's API token, made as an administrator would (``portico users add`` / ``token``)."""
    accounts = Accounts(store, settings.api)
    accounts.add(REVIEWER, "a long enough passphrase", [Role.REVIEWER], actor="cli:test")
    return {"Authorization": f"Bearer {accounts.issue_token(REVIEWER, actor='cli:test').token}"}


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "request_id"} and body["code"] == code


def test_api_lists_shows_and_approves_a_held_job_once(client: TestClient, store: Store, settings: Settings,
                                                       auth: dict[str, str]) -> None:
    ids = seed(store, settings)
    assert_error(client.get("/review"), 401, "unauthorized")
    listed = client.get("/review", headers=auth).json()
    assert [(r["job_id"], r["state"], r["held"]) for r in listed] == [(ids["held"], "HELD", True)]
    assert [r["job_id"] for r in client.get("/review?state=unreviewed", headers=auth).json()] == [ids["sent"]]
    assert_error(client.get("/review?state=bogus", headers=auth), 422, "invalid_request")

    shown = client.get(f"/review/{ids['held']}", headers=auth).json()
    assert shown["outbox"] == {"HELD": 2} and shown["study_uid"] == STUDY
    assert shown["measurements"][0]["volume_ml"] == pytest.approx(1520.34)
    assert {r["kind"] for r in shown["results"]} == {"seg", "sr"}
    assert_error(client.get("/review/999", headers=auth), 404, "not_found")

    # the reviewer is whoever signed in: a name in the body is refused, not recorded
    assert_error(client.post(f"/review/{ids['held']}/approve", headers=auth,
                             json={"reviewer": "Dr Someone Else", "reason": "fine"}), 422, "invalid_request")
    approved = client.post(f"/review/{ids['held']}/approve", headers=auth, json={"reason": "fine"})
    assert approved.status_code == 200, approved.text
    assert approved.json() == {"job_id": ids["held"], "state": "APPROVED", "held": True, "released": 2,
                               "cancelled": 0, "already_sent": 0}
    assert len(store.due(10)) == 4  # its two, plus the unheld job's two
    assert_error(client.post(f"/review/{ids['held']}/approve", headers=auth), 409, "conflict")
    assert_error(client.post(f"/review/{ids['held']}/reject", headers=auth, json={"reason": "x"}), 409, "conflict")
    event = [e for e in store.audit_events() if e["event"] == "reviewed"][-1]
    assert event["actor"] == REVIEWER and event["detail"]["via"] == "api"
    assert Reviews(store, settings.review).get(ids["held"]).reviewer == REVIEWER


def test_api_rejects_with_a_reason_and_refuses_what_cannot_be_decided(client: TestClient, store: Store,
                                                                        settings: Settings,
                                                                        auth: dict[str, str]) -> None:
    ids = seed(store, settings)
    assert_error(client.post(f"/review/{ids['held']}/reject", headers=auth), 422, "invalid_request")
    assert_error(client.post(f"/review/{ids['held']}/reject", headers=auth, json={"reason": "  "}),
                 422, "invalid_request")
    assert_error(client.post("/review/999/reject", headers=auth, json={"reason": "x"}), 404, "not_found")
    assert_error(client.post(f"/review/{ids['pending']}/approve", headers=auth, json={"retrospective": True}),
                 409, "conflict")
    assert_error(client.post(f"/review/{ids['sent']}/approve", headers=auth), 409, "conflict")
    rejected = client.post(f"/review/{ids['held']}/reject", headers=auth, json={"reason": "wrong organ"})
    assert rejected.status_code == 200 and rejected.json()["cancelled"] == 2
    retro = client.post(f"/review/{ids['sent']}/approve", headers=auth, json={"retrospective": True})
    assert retro.status_code == 200 and retro.json()["held"] is False and retro.json()["released"] == 0
    assert [r["job_id"] for r in client.get("/review?state=all", headers=auth).json()] == [ids["held"], ids["sent"]]
    assert {o["state"] for o in store.outbox()} == {"CANCELLED", "PENDING"}


def run(config: Path, *argv: str) -> int:
    return main([*argv, "-c", str(config), "--log-level", "WARNING"])


def test_cli_list_show_approve_reject_and_exit_codes(config: Path, store: Store, settings: Settings,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ids = seed(store, settings)
    cli = f"cli:{getpass.getuser()}"  # the operating-system user, never a typed name
    assert run(config, "review", "list") == 0
    out = capsys.readouterr().out
    assert str(ids["held"]) in out and "HELD" in out and short(STUDY) in out and "held-model@2.0.0" in out
    assert STUDY not in out and PATIENT not in out

    assert run(config, "review", "show", str(ids["held"])) == 0
    out = capsys.readouterr().out
    assert "Liver: 1520.3 ml, mean 55.2" in out and "held-model@2.0.0" in out and "1 HELD" not in out
    assert "2 HELD" in out and "seg.dcm" in out and STUDY not in out and PATIENT not in out

    assert run(config, "review", "approve", str(ids["held"])) == 0
    assert "approved job" in capsys.readouterr().out
    assert run(config, "review", "approve", str(ids["held"])) == 1
    assert f"already approved by {cli}" in capsys.readouterr().err
    assert run(config, "review", "approve", "999") == 1
    assert "no job 999" in capsys.readouterr().err
    assert run(config, "review", "reject", str(ids["sent"]), "--reason", "bad") == 1
    assert "--retrospective" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # a rejection without a reason is a usage error
        run(config, "review", "reject", str(ids["sent"]))
    assert exited.value.code == 2
    capsys.readouterr()
    assert run(config, "review", "reject", str(ids["sent"]), "--reason", "bad", "--retrospective") == 0
    assert "retrospective" in capsys.readouterr().out

    assert run(config, "review", "list", "--state", "all", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed[0]["job_id"], listed[0]["state"], listed[0]["reviewer"]) == (ids["held"], "APPROVED", cli)
    assert listed[1]["state"] == "REJECTED"
    reviewed = [e for e in store.audit_events() if e["event"] == "reviewed"]
    assert reviewed[0]["actor"] == cli and all(e["detail"]["via"] == "cli" for e in reviewed)
