"""Job errors quote no data values: a non-conformant patient module still gets results, and a
library's failure becomes a code and a message that names the type and place, never the value."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.valuerep import DA

import inference.pipeline
from appliance.demo_study import write_ct_series
from appliance.logs import TextFormatter
from appliance.store import Job, JobState
from inference.phantom import make_phantom
from tests.unit.appliance.test_review import Site, make_site, store_file

NAME = "ZZPHIFAMILY^ZZPHIGIVEN"
PATIENT_ID = "ZZPHI-ID-4711"
BIRTH = "1980-07-14"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = make_site(tmp_path, {"required": False})
    yield s
    s.store.close()


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """What the appliance's own formatter writes for the jobs logger, tracebacks included."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("appliance.jobs")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old)


def run_job(site: Site, seed: int) -> Job:
    phantom = make_phantom((4, 48, 48), (2.5, 8.0, 8.0), seed=seed)
    series = write_ct_series(phantom.hu, phantom.spacing, site.tmp / f"ct-{seed}", patient_name=NAME,
                             patient_id=PATIENT_ID, patient_birth_date=BIRTH, patient_sex="female", seed=seed)
    for path in series.paths:
        store_file(site.store, path)
    study = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).StudyInstanceUID)
    run = site.store.hand_off(study, "quiet")
    assert run is not None
    (series_uid,) = site.store.series_members(study, run.version)
    site.store.record_routes(run, [("r", "tiny", None, series_uid, f"k{seed}")])
    job = site.runner.run_next()
    assert job is not None
    done = site.store.job(job.id)
    assert done is not None
    return done


def assert_value_free(*texts: str) -> None:
    for text in texts:
        for value in (BIRTH, BIRTH.replace("-", ""), "female", "ZZPHIFAMILY", "ZZPHIGIVEN", PATIENT_ID):
            assert value not in text, (value, text)


def test_a_non_conformant_patient_module_still_gets_conformant_results(site: Site, log_text: io.StringIO) -> None:
    job = run_job(site, 1)
    assert job.state is JobState.DONE, job.error
    by_kind = {r.kind: r for r in site.store.results(job.id)}
    for kind in ("seg", "sr"):
        ds = pydicom.dcmread(by_kind[kind].path)
        assert (ds.PatientBirthDate, ds.PatientSex, ds.PatientID, str(ds.PatientName)) == (
            "19800714", "F", PATIENT_ID, NAME)
    assert "job 1 done" in log_text.getvalue()
    assert_value_free(log_text.getvalue())


@pytest.mark.parametrize(("target", "code", "state"), [
    ("build_sr", "result_encoding_failed", JobState.FAILED),  # deterministic: not retried
    ("load_series", "unexpected", JobState.PENDING),  # anything else: retried with backoff
])
def test_a_library_failure_becomes_a_code_and_a_value_free_message(
        site: Site, log_text: io.StringIO, monkeypatch: pytest.MonkeyPatch, target: str, code: str,
        state: JobState) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        DA(BIRTH)  # pydicom's ValueError quotes the birth date

    monkeypatch.setattr(inference.pipeline, target, fails)
    job = run_job(site, 2)
    assert job.state is state and job.error is not None
    assert job.error.startswith(f"{code}: ") and "ValueError in pydicom.valuerep." in job.error
    audit = [e for e in site.store.audit_events() if e["event"] == "job_state" and e["detail"].get("code")]
    assert audit and audit[-1]["detail"]["code"] == code
    logged = log_text.getvalue()
    assert "Traceback" in logged and "ValueError" in logged
    assert_value_free(job.error, json.dumps(audit), logged)
