"""Review through a real Orthanc: a held result stays out of the PACS until approved, then arrives once."""

from __future__ import annotations

import getpass
import io
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from appliance.review import Reviews, ReviewState
from appliance.settings import ReviewSettings
from tests.conftest import REPO
from tests.integration.conftest import Appliance, Pacs
from tests.integration.test_pacs_roundtrip import PATIENT_ID, PATIENT_NAME, phantom_study, wait_for_results
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow


def portico_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "review", *args, "-c", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def key_objects(pacs: Pacs, study_id: str) -> list[str]:
    """Instance ids of the study's KO (Key Object Selection) series."""
    return [i for s in pacs.client.get_studies_id(study_id)["Series"]
            if (series := pacs.client.get_series_id(s))["MainDicomTags"].get("Modality") == "KO"
            for i in series["Instances"]]


def test_held_result_reaches_orthanc_only_after_approval_and_exactly_once(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600, extra={"review": {"required": True}})
    study_id = pacs.upload(phantom_study(tmp_path / "study"))
    pacs.send_to("portico", study_id)

    store = portico.store()
    try:
        reviews = Reviews(store, ReviewSettings())
        (held,) = wait_for(lambda: reviews.find(ReviewState.HELD), timeout=240, message="job held for review")
        # the review and the HELD outbox rows were written in the job's own transaction
        assert {o["state"] for o in store.outbox()} == {"HELD"} and len(store.outbox()) == 2
    finally:
        store.close()

    # a reviewer looks (another process: the CLI); meanwhile the dispatcher has had many polls
    listed = portico_cli(portico.config, "list")
    assert listed.returncode == 0 and f"{held.job.id}" in listed.stdout and "HELD" in listed.stdout, listed.stderr
    shown = portico_cli(portico.config, "show", str(held.job.id))
    assert shown.returncode == 0 and "measurements" in shown.stdout, shown.stderr
    assert PATIENT_NAME not in listed.stdout + shown.stdout and PATIENT_ID not in listed.stdout + shown.stdout
    assert pacs.derived(study_id) == {}
    store = portico.store()
    try:
        assert {o["state"] for o in store.outbox()} == {"HELD"}
        assert not any(e["event"] == "dispatched" for e in store.audit_events())
    finally:
        store.close()

    approved = portico_cli(portico.config, "approve", str(held.job.id))
    assert approved.returncode == 0 and "2 item(s) released" in approved.stdout, approved.stderr
    derived = wait_for_results(pacs, study_id, timeout=60)
    store = portico.store()
    try:
        wait_for(lambda: {o["state"] for o in store.outbox()} == {"SENT"}, timeout=60, message="outbox sent")
        assert len([e for e in store.audit_events() if e["event"] == "dispatched"]) == 2
        reviewed = [e for e in store.audit_events() if e["event"] == "reviewed"]
        # the CLI records the operating-system user it runs as
        assert [(e["actor"], e["detail"]["released"]) for e in reviewed] == [(f"cli:{getpass.getuser()}", 2)]
    finally:
        store.close()
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1

    again = portico_cli(portico.config, "approve", str(held.job.id))
    assert again.returncode == 1 and "already approved" in again.stderr
    assert len(pacs.derived(study_id)["SEG"]) == 1

    # taking it back: Orthanc gets an IOCM rejection note referencing the SEG and SR it got
    withdrawn = portico_cli(portico.config, "withdraw", str(held.job.id), "--reason", "outline misses the liver")
    assert withdrawn.returncode == 0 and "rejection note queued to 1 destination" in withdrawn.stdout, \
        withdrawn.stderr
    (note,) = wait_for(lambda: key_objects(pacs, study_id), timeout=60, interval=0.25, message="KOS in Orthanc")
    kos = pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(note)))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    referenced = {i.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
                  for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    sent = {pacs.client.get_instances_id(i)["MainDicomTags"]["SOPInstanceUID"]
            for ids in pacs.derived(study_id).values() for i in ids}
    assert referenced == sent and len(sent) == 2
    if shutil.which("dciodvfy"):
        path = tmp_path / "kos.dcm"
        path.write_bytes(pacs.client.get_instances_id_file(note))
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert not [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line], run.stderr
    store = portico.store()
    try:
        wait_for(lambda: {o["state"] for o in store.outbox()} == {"SENT"} and len(store.outbox()) == 3,
                 timeout=60, message="rejection note sent")
        (event,) = [e for e in store.audit_events() if e["event"] == "reviewed"
                    and e["detail"]["decision"] == "withdraw"]
        assert event["detail"]["reason"] == "outline misses the liver" and event["detail"]["destinations"]
        assert Reviews(store, ReviewSettings()).get(held.job.id).state is ReviewState.WITHDRAWN
    finally:
        store.close()
    twice = portico_cli(portico.config, "withdraw", str(held.job.id), "--reason", "again")
    assert twice.returncode == 1 and "withdrawn already" in twice.stderr
    log = portico.log_text()
    assert PATIENT_NAME not in log and PATIENT_ID not in log
