"""Why a study got what it got (rules explain, the no_match audit row, rules check warnings), leftovers of a
crash removed at start-up, and the outbox view per destination."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from itertools import pairwise
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.cli import rules as rules_cli
from appliance.cli.status import destination_lines
from appliance.demo_study import write_ct_series
from appliance.durable import remove_stale_temporaries
from appliance.handoff import MAX_QUERY_BACKOFF_SECONDS, HandOff
from appliance.models import ModelRegistry
from appliance.routing_explain import explain_stored, modality_warnings
from appliance.settings import Settings
from appliance.store import ResultFile, Store
from dicom_router.ports import ReceivedInstance
from dicom_router.rules import parse_rules
from dicom_router.settings import Peer, RouterSettings
from inference.phantom import make_phantom

REPO = Path(__file__).resolve().parents[3]
TOKEN = "t0ken-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATIENT = "Explain^Secret^Name"
CT_ONLY = """
rules:
  - name: body
    model: ct-body-composition
    series:
      Modality: {in: [CT]}
"""
NOTHING = """
rules:
  - name: pet-only
    model: ct-body-composition
    series:
      Modality: {in: [PT]}
"""


@pytest.fixture
def study(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A CT and an MR series of one study, as files (patient name inside)."""
    phantom = make_phantom((3, 32, 32), (2.5, 8.0, 8.0), seed=2)
    ct = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "src" / "ct", patient_name=PATIENT)
    mr = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "src" / "mr", patient_name=PATIENT,
                         study_instance_uid=ct.study_instance_uid, series_description="MR ADC")
    for path in mr.paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    return ct.study_instance_uid, {"ct": ct.series_instance_uid, "mr": mr.series_instance_uid}


def receive(store: Store, folder: Path) -> None:
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                     str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1", "PACS", "127.0.0.1",
                                     path.read_bytes()))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "var", fsync=False)
    yield store
    store.close()


def test_explain_a_stored_study(store: Store, tmp_path: Path, study: tuple[str, dict[str, str]]) -> None:
    uid, series = study
    receive(store, tmp_path / "src")
    explanation = explain_stored(store, parse_rules(CT_ONLY), uid)
    assert explanation is not None
    body = explanation.as_dict()["rules"][0]
    assert body["chosen_series"] == series["ct"]
    mr = next(s for s in body["series"] if s["series_uid"] == series["mr"])
    assert mr == {"series_uid": series["mr"], "matched": False, "chosen": False, "reasons": ["Modality not in {CT}"]}
    text = "\n".join(explanation.lines())
    assert f"runs ct-body-composition on {series['ct']}" in text and "no match: Modality not in {CT}" in text
    assert PATIENT not in text and PATIENT not in json.dumps(explanation.as_dict())
    assert explain_stored(store, parse_rules(CT_ONLY), "1.2.999") is None


def test_no_match_audit_row_says_which_series_and_why(store: Store, tmp_path: Path,
                                                      study: tuple[str, dict[str, str]]) -> None:
    uid, series = study
    receive(store, tmp_path / "src")
    run = store.hand_off(uid, "quiet")
    assert run is not None
    HandOff(store, RouterSettings(), parse_rules(NOTHING)).route(run)
    row = next(e for e in store.audit_events(uid) if e["event"] == "no_match")
    detail = row["detail"]
    assert detail["run_version"] == run.version
    assert {s["series_uid"]: s["modality"] for s in detail["series"]} == {series["ct"]: "CT", series["mr"]: "MR"}
    assert detail["reasons"]["pet-only"] == {series["ct"]: ["Modality not in {PT}"],
                                             series["mr"]: ["Modality not in {PT}"]}
    assert PATIENT not in json.dumps(detail)


def test_no_rules_at_all_is_said_too(store: Store, tmp_path: Path, study: tuple[str, dict[str, str]]) -> None:
    uid, _ = study
    receive(store, tmp_path / "src")
    run = store.hand_off(uid, "quiet")
    assert run is not None
    HandOff(store, RouterSettings(), parse_rules("rules: []\n")).route(run)
    row = next(e for e in store.audit_events(uid) if e["event"] == "no_match")
    assert row["detail"]["reasons"] == "no rules are configured"


def test_rules_check_warns_when_a_rule_can_route_what_its_model_refuses(tmp_path: Path) -> None:
    registry = ModelRegistry(REPO / "models")
    assert modality_warnings(parse_rules(CT_ONLY), registry) == []
    warnings = modality_warnings(parse_rules("""
rules:
  - {name: mr-to-ct, model: ct-body-composition, series: {Modality: {in: [MR, CT]}}}
  - {name: anything, model: ct-body-composition}
  - {name: missing, model: no-such-model, series: {Modality: {in: [CT]}}}
"""), registry)
    assert warnings == [
        "rule mr-to-ct: can route MR, which ct-body-composition does not accept (it accepts CT); "
        "such jobs fail with series_not_accepted",
        "rule anything: has no Modality condition, so it can route any modality; ct-body-composition "
        "accepts only CT",
        "rule missing: model no-such-model is not installed",
    ]
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: mr, model: ct-body-composition, series: {Modality: {in: [MR]}}}\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert rules_cli.main(["check", str(path), "--models-dir", str(REPO / "models")]) == 0
    assert "OK" in out.getvalue() and "WARNING: rule mr: can route MR" in out.getvalue()


def config(tmp_path: Path, rules: str) -> Path:
    (tmp_path / "rules.yaml").write_text(rules)
    path = tmp_path / "portico.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
                                    "router": {"rules_file": str(tmp_path / "rules.yaml")},
                                    "inference": {"models_dir": str(REPO / "models")},
                                    "api": {"enabled": True, "token": TOKEN}}))
    return path


def test_cli_rules_explain(store: Store, tmp_path: Path, study: tuple[str, dict[str, str]]) -> None:
    uid, series = study
    receive(store, tmp_path / "src")
    path = config(tmp_path, CT_ONLY)
    out = io.StringIO()
    with redirect_stdout(out):
        assert rules_cli.main(["explain", uid, "-c", str(path), "--json"]) == 0
    assert json.loads(out.getvalue())["rules"][0]["chosen_series"] == series["ct"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert rules_cli.main(["explain", uid, "-c", str(path)]) == 0
        assert rules_cli.main(["explain", "1.2.999", "-c", str(path)]) == 1
    assert "rule body: runs ct-body-composition" in out.getvalue()


def test_api_routing_of_a_study(tmp_path: Path, study: tuple[str, dict[str, str]]) -> None:
    uid, series = study
    settings = Settings.model_validate(yaml.safe_load(config(tmp_path, CT_ONLY).read_text()))
    store = Store(settings.data_dir, fsync=False)
    receive(store, tmp_path / "src")
    try:
        with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
            assert client.get(f"/studies/{uid}/routing").status_code == 401
            answer = client.get(f"/studies/{uid}/routing", headers=AUTH)
            assert answer.status_code == 200, answer.text
            assert answer.json()["rules"][0]["chosen_series"] == series["ct"]
            assert PATIENT not in answer.text
            assert client.get("/studies/1.2.999/routing", headers=AUTH).json()["code"] == "not_found"
            assert client.get("/studies/not-a-uid/routing", headers=AUTH).status_code == 422
    finally:
        store.close()


# ---- crash leftovers -----------------------------------------------------------------------------

def test_temporary_files_left_by_a_crash_are_removed_at_start(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "var", fsync=False)
    series = store.instances_dir / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    old = time.time() - 3600
    leftovers = [series / ".1.2.3.4.5.dcm.140001.tmp", series / "x.part", store.results_dir / "job-1" / "seg-1.tmp"]
    leftovers[2].parent.mkdir()
    for path in leftovers:
        path.write_bytes(b"half a file")
        os.utime(path, (old, old))
    fresh = series / ".1.2.3.4.6.dcm.140002.tmp"  # a write under way in another process
    fresh.write_bytes(b"in progress")
    kept = series / "1.2.3.4.7.dcm"
    kept.write_bytes(b"not dicom")
    os.utime(kept, (old, old))
    with caplog.at_level(logging.WARNING, logger="appliance.store"):
        store.reindex()
    store.close()
    assert not any(p.exists() for p in leftovers)
    assert fresh.exists() and kept.exists()
    assert "removed 3 temporary file(s) left by an interrupted write" in caplog.text
    assert remove_stale_temporaries(tmp_path / "absent") == 0


# ---- the outbox per destination ------------------------------------------------------------------

def test_outbox_view_shows_last_error_and_next_retry(store: Store, tmp_path: Path) -> None:
    store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.1", "1.2.3.4", "1.2.3.4.5",
                                 "1.2.840.10008.1.2.1", "PACS", "127.0.0.1", b"DICM" + b"x" * 64))
    run = store.hand_off("1.2.3.4", "quiet")
    assert run is not None
    store.record_routes(run, [("r", "m", None, "1.2.3.4.5", "k")])
    job = store.claim_job()
    assert job is not None
    files = [ResultFile(f"9.9.{n}", "seg", "1.2.840.10008.5.1.4.1.1.66.4", tmp_path / f"{n}.dcm", {}) for n in (1, 2)]
    store.complete_job(job, files, ["pacs", "archive"], "CPUExecutionProvider", "abc", {})
    before = time.time()
    for item in store.due(10):
        if item.destination == "pacs":
            store.mark_failed(item.id, "association refused (A-ASSOCIATE-RJ)", retry_in_seconds=120, permanent=False)
        else:
            store.mark_sent(item.id)
    status = store.summary()["destinations"]
    assert status["archive"] == {"states": {"SENT": 2}, "last_error": None, "next_retry_at": None,
                                 "oldest_pending": None}
    assert status["pacs"]["oldest_pending"] is not None
    assert status["pacs"]["states"] == {"PENDING": 2}
    assert status["pacs"]["last_error"] == "association refused (A-ASSOCIATE-RJ)"
    assert before + 119 <= status["pacs"]["next_retry_at"] <= time.time() + 121
    lines = destination_lines(status, now=status["pacs"]["next_retry_at"] - 120)
    assert lines[0] == "archive: 2 SENT"
    assert lines[1].startswith("pacs: 2 PENDING; last error: association refused (A-ASSOCIATE-RJ); next retry ")
    assert lines[1].endswith("(in 120 s)")


# ---- a peer that is down is not asked (nor logged) every second ---------------------------------

def test_counts_are_asked_less_often_of_a_peer_that_gives_none(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    calls: list[float] = []

    def down(*args: object, **kwargs: object) -> None:
        calls.append(now)
        return None

    monkeypatch.setattr("appliance.handoff.count_study_instances", down)
    settings = RouterSettings(peers=(Peer(ae_title="PACS", query_host="127.0.0.1", query_port=11112),),
                              quiet_seconds=10_000)
    handoff = HandOff(store, settings, parse_rules("rules: []\n"))
    start = time.time()
    with caplog.at_level(logging.WARNING, logger="appliance.handoff"):
        for second in range(120):
            now = start + second
            # a study still arriving: a new instance every second
            store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.4.5.{second}", "1.2.3.4", "1.2.3.4.5",
                                         "1.2.840.10008.1.2.1", "PACS", "127.0.0.1", b"DICM" + b"x" * 64))
            handoff.tick(now)
    gaps = [b - a for a, b in pairwise(calls)]
    assert gaps[:5] == [2, 4, 8, 16, 32] and max(gaps) <= MAX_QUERY_BACKOFF_SECONDS
    assert len(calls) <= 8  # not 120
    assert caplog.text.count("gave no count") == 1


# ---- jobs: a refused series fails at once; an empty character set does not fail ----------------

def job_on(tmp_path: Path, edit: str) -> tuple[Any, int]:
    from tests.unit.appliance.test_review import make_site, store_file

    site = make_site(tmp_path, {"required": False})
    try:
        phantom = make_phantom((4, 48, 48), (2.5, 8.0, 8.0), seed=3)
        written = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "ct", seed=3)
        for path in written.paths:
            ds = pydicom.dcmread(path)
            if edit == "mr":
                ds.Modality = "MR"
            else:
                ds.SpecificCharacterSet = ""
            ds.save_as(path)
            store_file(site.store, path)
        run = site.store.hand_off(written.study_instance_uid, "quiet")
        assert run is not None
        site.store.record_routes(run, [("r", "tiny", None, written.series_instance_uid, "k")])
        job = site.runner.run_next()
        assert job is not None
        done = site.store.job(job.id)
        assert done is not None
        return done, len(site.store.results(job.id))
    finally:
        site.store.close()


def test_a_series_the_model_does_not_accept_fails_at_once_with_its_reason(tmp_path: Path) -> None:
    job, results = job_on(tmp_path, "mr")
    assert str(job.state) == "FAILED" and job.attempts == 1 and results == 0  # never retried
    assert job.error == "series_not_accepted: the model does not accept this series: modality MR is not CT"


def test_an_empty_character_set_does_not_fail_the_job(tmp_path: Path) -> None:
    job, results = job_on(tmp_path, "charset")
    assert str(job.state) == "DONE", job.error
    assert results == 2
