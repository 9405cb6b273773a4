"""A real Orthanc sends a study to Portico over DICOMweb (STOW-RS); SEG and SR come back to it.

Orthanc's DICOMweb plugin is the client: Portico is registered in it as a DICOMweb server with the
sender's bearer token, and Orthanc's own ``/dicom-web/servers/portico/stow`` pushes the study.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.store import JobState
from tests.integration.conftest import Appliance, Pacs
from tests.integration.test_pacs_roundtrip import PATIENT_ID, PATIENT_NAME, phantom_study, wait_for_results
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

SENDER_TOKEN = "orthanc-stow-t0ken"
ADMIN_TOKEN = "admin-t0ken-stow-test"


def _pacs_stowing_to_portico(orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance],
                             token: str) -> tuple[Pacs, Appliance]:
    """Orthanc, and ``portico serve`` with its API; Portico registered in Orthanc as a DICOMweb server."""
    port, api_port = free_port(), free_port()
    pacs = orthanc_factory(port)
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600, extra={
        "router": {"stow_senders": [{"name": "ORTHANC", "token": SENDER_TOKEN, "hosts": ["127.0.0.1"]}]},
        "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": ADMIN_TOKEN}})
    wait_for(lambda: port_open(api_port), 30, 0.1, "Portico's HTTP API")
    pacs.standin.request("PUT", "/dicom-web/servers/portico", {
        "Url": f"http://127.0.0.1:{api_port}/dicom-web/", "HttpHeaders": {"Authorization": f"Bearer {token}"}})
    return pacs, portico


def test_orthanc_stows_a_study_and_gets_seg_and_sr_back(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    pacs, portico = _pacs_stowing_to_portico(orthanc_factory, portico_factory, SENDER_TOKEN)
    paths = phantom_study(tmp_path / "study")
    study_id = pacs.upload(paths)
    pacs.standin.request("POST", "/dicom-web/servers/portico/stow", {"Resources": [study_id], "Synchronous": True})

    # stored under the sender's name; ORTHANC is also a C-FIND peer, so the count hands the study off
    derived = wait_for_results(pacs, study_id)
    assert len(derived["SEG"]) == 1 and len(derived["SR"]) == 1
    store = portico.store()
    try:
        assert store.instance_count() == len(paths)
        assert [j.state for j in store.jobs()] == [JobState.DONE]
        received = [e for e in store.audit_events() if e["event"] == "received"]
        assert {e["actor"] for e in received} == {"ORTHANC"}
        complete = [e for e in store.audit_events() if e["event"] == "study_complete"]
        assert complete[0]["detail"]["reason"] == "count"
    finally:
        store.close()
    log = portico.log_text()
    assert "STOW-RS from ORTHANC" in log
    assert PATIENT_NAME not in log and PATIENT_ID not in log


def test_orthanc_with_a_wrong_token_stores_nothing(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    # the admin token is not a sender's
    pacs, portico = _pacs_stowing_to_portico(orthanc_factory, portico_factory, ADMIN_TOKEN)
    study_id = pacs.upload(phantom_study(tmp_path / "study", slices=4))
    with pytest.raises(Exception, match="HTTP Error"):
        pacs.standin.request("POST", "/dicom-web/servers/portico/stow", {"Resources": [study_id],
                                                                          "Synchronous": True})
    store = portico.store()
    try:
        assert store.instance_count() == 0
    finally:
        store.close()
    assert "refused DICOMweb POST request" in portico.log_text()
