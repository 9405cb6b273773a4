"""Patient data stays in: two studies with a distinctive patient through the whole path (a real Orthanc
sends them to a real ``portico serve``), one conformant and one not (birth date ``1980-07-14``, sex
``female``, a one-component name). Both get their SEG, SR and key images back, carrying the
normalised values, and no patient value shows in the log, any table of the database, or any API
answer the dashboard or an operator reads.
"""

from __future__ import annotations

import io
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom

from appliance.demo_study import write_ct_series
from appliance.settings import load_settings
from appliance.store import JobState
from inference.phantom import make_phantom
from tests.integration.conftest import Appliance, Pacs
from tests.support.net import free_port
from tests.support.polling import wait_for

#: the deprecated shared admin token (``api.token``); accounts (``portico users``) are replacing it
TOKEN = "phi-test-admin-token-8f3a"
SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
#: (name, ID, birth date, sex) as sent; each study's derived objects must carry 19800714 and F
CONFORMANT = ("ZZPHIFAMILY^ZZPHIGIVEN", "ZZPHI-ID-A-4711", "19800714", "F")
NON_CONFORMANT = ("ZZSINGLEPHI", "ZZPHI-ID-B-4712", "1980-07-14", "female")


def patient_values() -> list[re.Pattern[str]]:
    """Every form a patient value could take in text: whole, in parts, with other separators."""
    texts = {"ZZPHIFAMILY", "ZZPHIGIVEN", "ZZSINGLEPHI", "ZZPHI-ID-A-4711", "ZZPHI-ID-B-4712", "ZZPHI",
             "1980-07-14", "1980.07.14", "1980/07/14", "14.07.1980", "female"}
    patterns = [re.compile(re.escape(t), re.IGNORECASE) for t in texts]
    # the digits alone only where they are not part of a longer number (a UID, a timestamp)
    patterns.append(re.compile(r"(?<![0-9])19800714(?![0-9])"))
    return patterns


def leaks(where: str, text: str) -> list[str]:
    return [f"{where}: {p.pattern!r}" for p in patient_values() if p.search(text)]


def study_files(folder: Path, patient: tuple[str, str, str, str], seed: int) -> list[Path]:
    name, patient_id, birth, sex = patient
    phantom = make_phantom((12, 128, 128), (2.5, 3.0, 3.0), seed=seed)
    return write_ct_series(phantom.hu, phantom.spacing, folder, patient_name=name, patient_id=patient_id,
                           patient_birth_date=birth, patient_sex=sex, seed=seed).paths


def derived_in(pacs: Pacs, study_id: str) -> dict[str, list[pydicom.Dataset]]:
    """SOP class → the objects Portico made that Orthanc holds in the study."""
    out: dict[str, list[pydicom.Dataset]] = {}
    for series_id in pacs.client.get_studies_id(study_id)["Series"]:
        for instance_id in pacs.client.get_series_id(series_id)["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(instance_id)))
            if ds.SOPClassUID in (SEG, SR, SC):
                out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def results_or_failure(pacs: Pacs, study_id: str, api: str) -> dict[str, list[pydicom.Dataset]] | None:
    """The study's derived objects once all three kinds are in; fails at once when a job failed."""
    try:
        jobs = httpx.get(f"{api}/jobs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5.0).json()
    except httpx.TransportError:  # the API starts last
        jobs = []
    failed = [(j["id"], j["error"]) for j in jobs if j["error"]]
    assert not failed, f"job(s) failed: {failed}"
    derived = derived_in(pacs, study_id)
    return derived if len(derived) == 3 else None


def database_text(path: Path) -> str:
    """Every value of every column of every table, as text."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert tables
        parts: list[str] = []
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # names from sqlite_master
                parts.extend(v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row)
        return "\n".join(parts)
    finally:
        db.close()


def api_answers(base: str, job_ids: list[int], study_uids: list[str]) -> dict[str, str]:
    """What an operator and the dashboard read: every read-only route, raw."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    paths = ["/status", "/jobs", "/audit?limit=1000", "/review?state=all", "/review?state=held", "/models",
             "/ui/", *(f"/jobs/{j}" for j in job_ids), *(f"/review/{j}" for j in job_ids),
             *(f"/jobs?study_uid={s}" for s in study_uids), *(f"/audit?study_uid={s}" for s in study_uids),
             "/overview", "/studies", "/audit/search?limit=500", *(f"/studies/{s}" for s in study_uids),
             *(f"/studies/{s}/routing" for s in study_uids)]
    out = {}
    with httpx.Client(base_url=base, headers=headers, timeout=10.0) as client:
        for path in paths:
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text[:200])
            out[path] = response.text
    return out


def test_patient_values_stay_out_of_logs_database_and_api_and_results_conform(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port, api_port = free_port(), free_port()
    pacs = orthanc_factory(port)
    destination: dict[str, Any] = {"kind": "dimse", "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                   "port": pacs.dicom_port, "secondary_capture": True}
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600, extra={
        "api": {"enabled": True, "port": api_port, "token": TOKEN},
        "dispatch": {"destinations": [destination]},
    })
    studies = []
    for seed, patient in ((11, CONFORMANT), (12, NON_CONFORMANT)):
        study_id = pacs.upload(study_files(tmp_path / f"study-{seed}", patient, seed))
        pacs.send_to("portico", study_id)
        studies.append(study_id)

    # results back in the PACS, in the source study: SEG, SR and key images, values normalised
    api = f"http://127.0.0.1:{api_port}"
    for study_id in studies:
        derived = wait_for(lambda s=study_id: results_or_failure(pacs, s, api),  # type: ignore[misc]
                           timeout=240, interval=0.5, message="SEG, SR and key images in Orthanc")
        assert derived is not None
        for objects in derived.values():
            for ds in objects:
                assert (ds.PatientBirthDate, ds.PatientSex) == ("19800714", "F"), ds.SOPClassUID
                assert ds.PatientID in (CONFORMANT[1], NON_CONFORMANT[1])
                assert str(ds.PatientName) in (CONFORMANT[0], NON_CONFORMANT[0])

    store = portico.store()
    try:
        jobs = store.jobs()
        assert sorted(j.state for j in jobs) == [JobState.DONE, JobState.DONE], [j.error for j in jobs]
        job_ids, study_uids = [j.id for j in jobs], sorted({j.study_uid for j in jobs})
    finally:
        store.close()

    found: list[str] = []
    answers = api_answers(api, job_ids, study_uids)
    for path, text in answers.items():
        found += leaks(f"GET {path}", text)
    portico.process.stop()  # the shutdown's lines are in the log too; the database is quiet

    log = portico.log_text()
    assert "job " in log and " done" in log
    found += leaks("serve.log", log)
    database = load_settings(portico.config).data_dir / "portico.sqlite3"
    found += leaks("portico.sqlite3", database_text(database))
    for extra_log in sorted(portico.config.parent.rglob("*.log")):
        found += leaks(str(extra_log.relative_to(tmp_path)), extra_log.read_text(errors="replace"))
    assert not found, "patient values found:\n" + "\n".join(found)
    # the one-component name made highdicom warn: logged as category and place only
    assert "UserWarning from highdicom" in log
