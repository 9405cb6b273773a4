"""The spine end to end: a real Orthanc sends a study, Portico's SEG and SR arrive back in Orthanc."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from appliance.demo_study import write_ct_series
from appliance.store import JobState
from inference.phantom import make_phantom
from tests.integration.conftest import Appliance, Pacs
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

PATIENT_NAME = "TESTPATIENT^SECRET"
PATIENT_ID = "PID-7741-SECRET"


def phantom_study(folder: Path, slices: int = 24, seed: int = 3, **kw: object) -> list[Path]:
    phantom = make_phantom((slices, 256, 256), (2.5, 1.5, 1.5), seed=seed)
    return write_ct_series(phantom.hu, phantom.spacing, folder, patient_name=PATIENT_NAME,
                           patient_id=PATIENT_ID, seed=seed, **kw).paths  # type: ignore[arg-type]


def wait_for_results(pacs: Pacs, study_id: str, timeout: float = 240.0) -> dict[str, list[str]]:
    return wait_for(lambda: (d := pacs.derived(study_id)) and set(d) == {"SEG", "SR"} and d,
                    timeout=timeout, interval=0.25, message="SEG and SR in Orthanc")


def test_orthanc_sends_study_and_gets_seg_and_sr_back(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    # quiet timer far away: only the PACS's C-FIND count can hand the study off in time
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    study_id = pacs.upload(phantom_study(tmp_path / "study"))
    pacs.send_to("portico", study_id)

    derived = wait_for_results(pacs, study_id)
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1
    seg = pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(derived["SEG"][0])))
    assert seg.Modality == "SEG" and seg.PatientID == PATIENT_ID
    assert [s.SegmentLabel for s in seg.SegmentSequence]
    sr = pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(derived["SR"][0])))
    assert sr.Modality == "SR"

    store = portico.store()
    try:
        jobs = store.jobs()
        assert [j.state for j in jobs] == [JobState.DONE]
        assert jobs[0].provider == "CPUExecutionProvider"
        events = {e["event"] for e in store.audit_events()}
        assert {"received", "study_complete", "routed", "inferred", "dispatched"} <= events
        complete = [e for e in store.audit_events() if e["event"] == "study_complete"]
        assert complete[0]["detail"]["reason"] == "count"
    finally:
        store.close()
    # no patient identifiers in any log line
    log = portico.log_text()
    assert log.strip(), "serve.log is empty"
    assert PATIENT_NAME not in log and PATIENT_NAME.split("^")[0] not in log and PATIENT_ID not in log


def test_no_matching_rule_is_recorded(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    paths = phantom_study(tmp_path / "mr", slices=4)
    for p in paths:  # an MR series: the CT rule does not match
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    study_id = pacs.upload(paths)
    pacs.send_to("portico", study_id)
    store = portico.store()
    try:
        wait_for(lambda: any(e["event"] == "no_match" for e in store.audit_events()), timeout=60,
                 message="no_match audit")
        assert store.jobs() == []
    finally:
        store.close()


def test_kill_mid_study_then_restart_completes_once(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    paths = phantom_study(tmp_path / "study", slices=40)
    study_id = pacs.upload(paths)
    # a DCMTK sender, killed under it after some instances were acknowledged
    sender = subprocess.Popen(["storescu", "-aet", "ORTHANC", "-aec", "PORTICO", "127.0.0.1", str(port),
                               *map(str, paths)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = portico.store()
    try:
        wait_for(lambda: store.instance_count() >= 10, timeout=60, message="10 instances stored")
        portico.process.kill()
        sender.wait(timeout=60)
        acknowledged = store.instance_count()
        assert acknowledged >= 10
    finally:
        store.close()
    portico.process.start()
    store = portico.store()
    try:
        # every acknowledged instance survived the kill, byte for byte readable
        for path in store.instances_dir.rglob("*.dcm"):
            pydicom.dcmread(path, stop_before_pixels=True)
        # and the one in flight when it died may be back too: its file was fsync'd before its row, and the
        # restart re-indexes files the index lost (it was never acknowledged, so the sender sends it again)
        assert acknowledged <= store.instance_count() <= acknowledged + 1
    finally:
        store.close()
    # the PACS sends the whole study again (as a PACS retry would); duplicates are idempotent
    pacs.send_to("portico", study_id)
    derived = wait_for_results(pacs, study_id)
    store = portico.store()
    try:
        assert store.instance_count() == len(paths)
        jobs = store.jobs()
        assert len(jobs) >= 1 and all(j.state is JobState.DONE for j in jobs)
    finally:
        store.close()
    # one SEG and one SR per run version; the study was handed off once, so exactly one of each
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1


def test_kill_during_inference_resumes_without_duplicates(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    study_id = pacs.upload(phantom_study(tmp_path / "study", slices=60))
    pacs.send_to("portico", study_id)
    store = portico.store()
    try:
        wait_for(lambda: any(j.state is JobState.RUNNING for j in store.jobs()), timeout=60,
                 interval=0.01, message="job running")
        portico.process.kill()
    finally:
        store.close()
    portico.process.start()
    derived = wait_for_results(pacs, study_id)
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1
    store = portico.store()
    try:
        jobs = store.jobs()
        assert len(jobs) == 1 and jobs[0].state is JobState.DONE and jobs[0].attempts == 2
    finally:
        store.close()


def test_destination_down_then_up_delivers_exactly_once(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=1.0)
    study_id = pacs.upload(phantom_study(tmp_path / "study"))
    pacs.send_to("portico", study_id)
    pacs.standin.stop()  # the PACS goes down before results are ready
    store = portico.store()
    try:
        wait_for(lambda: any(o["attempts"] >= 2 and o["state"] == "PENDING" for o in store.outbox()),
                 timeout=180, message="failed dispatch attempts")
        failed = [e for e in store.audit_events() if e["event"] == "dispatch_failed"]
        assert failed and not failed[0]["detail"]["permanent"]
    finally:
        store.close()
    pacs.standin.start()
    derived = wait_for_results(pacs, study_id)
    store = portico.store()
    try:
        wait_for(lambda: all(o["state"] == "SENT" for o in store.outbox()), timeout=60, message="outbox drained")
        assert len(store.outbox()) == 2
    finally:
        store.close()
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1


def test_late_instance_starts_a_new_versioned_run(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600)
    paths = phantom_study(tmp_path / "study", slices=20)
    study_id = pacs.upload(paths[:-1])
    pacs.send_to("portico", study_id)
    wait_for_results(pacs, study_id)
    pacs.upload(paths[-1:])  # a late slice
    pacs.send_to("portico", study_id)
    store = portico.store()
    try:
        wait_for(lambda: sum(j.state is JobState.DONE for j in store.jobs()) == 2, timeout=240,
                 message="second run done")
        assert sorted(j.run_version for j in store.jobs()) == [1, 2]
    finally:
        store.close()
    derived = wait_for(lambda: (d := pacs.derived(study_id)) and len(d.get("SR", [])) == 2 and d,
                       timeout=60, message="second SR")
    assert len(derived["SEG"]) == 2
