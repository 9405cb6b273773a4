"""Several models on one study: independent jobs, a broken model fails alone; Secondary Capture opt-in.

A real Orthanc sends a phantom CT study to a real ``portico serve`` whose models folder holds the
demo package, a renamed copy of it and a package whose ``model.onnx`` is garbage (its digests are
right, so only loading the model fails).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import SecondaryCaptureImageStorage

from appliance.store import JobState, Store
from inference.packages import read_manifest, write_digests, write_manifest
from tests.conftest import REPO
from tests.integration.conftest import Appliance, Pacs
from tests.integration.test_pacs_roundtrip import PATIENT_ID, phantom_study
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

DEMO = REPO / "models" / "ct-body-composition"
CT_SERIES = {"Modality": {"in": ["CT"]}, "ImageType": {"regex": "ORIGINAL"}}


def copy_package(dest: Path, name: str, title: str, model: bytes | None = None) -> Path:
    """The demo package under another name and title; ``model`` replaces ``model.onnx``."""
    shutil.copytree(DEMO, dest)
    if model is not None:
        (dest / "model.onnx").write_bytes(model)
    manifest, _ = read_manifest(dest)
    write_manifest(dest, manifest.model_copy(update={
        "name": name, "title": title, "files": write_digests(dest, sorted(manifest.files)),
    }))
    return dest


def rules_file(path: Path, models: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"rules": [
        {"name": f"rule-{m}", "model": m, "series": CT_SERIES} for m in models]}), encoding="utf-8")
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(DEMO, root / "ct-body-composition")
    copy_package(root / "ct-body-composition-b", "ct-body-composition-b", "CT body composition B")
    copy_package(root / "ct-broken", "ct-broken", "Broken model", model=b"this is not an ONNX model\n" * 64)
    return root


def series_of(pacs: Pacs, study_id: str) -> dict[str, list[dict[str, Any]]]:
    """Modality → the study's series in Orthanc (with their instance ids)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for series_id in pacs.client.get_studies_id(study_id)["Series"]:
        series = pacs.client.get_series_id(series_id)
        out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return out


def instance(pacs: Pacs, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(pacs.client.get_instances_id_file(instance_id)))


def with_store(appliance: Appliance, fn: Callable[[Store], Any]) -> Any:
    store = appliance.store()
    try:
        return fn(store)
    finally:
        store.close()


def test_two_models_each_deliver_and_a_broken_model_fails_alone(
        tmp_path: Path, models_dir: Path, orthanc_factory: Callable[..., Pacs],
        portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    # the broken model's rule comes first, so its job is claimed first by the single worker
    rules = rules_file(tmp_path / "rules.yaml", ["ct-broken", "ct-body-composition", "ct-body-composition-b"])
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600, extra={
        "inference": {"models_dir": str(models_dir)},
        "router": {"rules_file": str(rules)},
        "jobs": {"max_attempts": 2, "retry_seconds": 0.2},
    })
    source = phantom_study(tmp_path / "study")
    study_id = pacs.upload(source)
    pacs.send_to("portico", study_id)

    found = wait_for(lambda: (s := series_of(pacs, study_id)) and len(s.get("SEG", [])) == 2
                     and len(s.get("SR", [])) == 2 and s, timeout=300, interval=0.25,
                     message="two SEGs and two SRs in Orthanc")
    jobs = wait_for(lambda: (j := with_store(portico, lambda s: s.jobs()))
                    and all(x.state in (JobState.DONE, JobState.FAILED) for x in j) and j,
                    timeout=120, message="every job finished")
    by_model = {j.model: j for j in jobs}
    assert set(by_model) == {"ct-broken", "ct-body-composition", "ct-body-composition-b"}
    broken = by_model["ct-broken"]
    assert broken.state is JobState.FAILED and broken.attempts == 2
    assert broken.error is not None and broken.error.startswith("runtime_unavailable")
    for name in ("ct-body-composition", "ct-body-composition-b"):
        assert by_model[name].state is JobState.DONE and by_model[name].error is None

    # each good model delivered its own SEG and SR; the broken one left nothing in the outbox
    segs = [instance(pacs, s["Instances"][0]) for s in found["SEG"]]
    assert sorted(s.ContentLabel for s in segs) == ["CT_BODY_COMPOSIT", "CT_BODY_COMPOSIT"]
    assert {s.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName
            for s in segs} == {"CT body composition (demo)", "CT body composition B"}
    assert len({s.SOPInstanceUID for s in segs}) == 2 and all(s.PatientID == PATIENT_ID for s in segs)
    assert "OT" not in found  # nobody asked for Secondary Capture
    outbox = with_store(portico, lambda s: s.outbox())
    assert len(outbox) == 4 and all(o["state"] == "SENT" for o in outbox)
    assert broken.id not in {o["job_id"] for o in outbox}
    # the source series is untouched: exactly the instances that were sent
    assert len(found["CT"]) == 1 and len(found["CT"][0]["Instances"]) == len(source)
    events = with_store(portico, lambda s: s.audit_events())
    assert sum(e["event"] == "inferred" for e in events) == 2


def test_secondary_capture_goes_only_where_asked(
        tmp_path: Path, orthanc_factory: Callable[..., Pacs], portico_factory: Callable[..., Appliance]) -> None:
    port = free_port()
    pacs = orthanc_factory(port)
    viewer = orthanc_factory(port, name="viewer")
    portico = portico_factory(pacs.dicom_port, port=port, quiet_seconds=600, extra={"dispatch": {"destinations": [
        {"kind": "dimse", "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port,
         "secondary_capture": True},
        {"kind": "dimse", "name": "viewer", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": viewer.dicom_port},
    ]}})
    study_id = pacs.upload(phantom_study(tmp_path / "study"))
    pacs.send_to("portico", study_id)

    # the key images arrive one C-STORE at a time: wait for all three, not for the series to appear
    found = wait_for(lambda: (s := series_of(pacs, study_id)) and {"SEG", "SR", "OT"} <= set(s)
                     and sum(len(x["Instances"]) for x in s["OT"]) >= 3 and s,
                     timeout=300, interval=0.25, message="SEG, SR and three SC images in the PACS")
    assert len(found["OT"]) == 1 and len(found["OT"][0]["Instances"]) == 3
    images = [instance(pacs, i) for i in found["OT"][0]["Instances"]]
    seg = instance(pacs, found["SEG"][0]["Instances"][0])
    for sc in images:
        assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
        assert sc.StudyInstanceUID == seg.StudyInstanceUID and sc.PatientID == PATIENT_ID
        assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD"
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
    assert sorted(int(sc.InstanceNumber) for sc in images) == [1, 2, 3]

    # the viewer gets SEG and SR only
    def viewer_study() -> dict[str, list[dict[str, Any]]] | None:
        studies = viewer.client.get_studies()
        if not studies:
            return None
        s = series_of(viewer, studies[0])
        return s if {"SEG", "SR"} <= set(s) else None

    at_viewer = wait_for(viewer_study, timeout=120, interval=0.25, message="SEG and SR at the viewer")
    outbox = wait_for(lambda: (o := with_store(portico, lambda s: s.outbox()))
                      and all(x["state"] == "SENT" for x in o) and o, timeout=60, message="outbox drained")
    assert "OT" not in at_viewer
    assert sorted(o["destination"] for o in outbox) == ["pacs"] * 5 + ["viewer"] * 2
    results = with_store(portico, lambda s: s.results())
    assert sorted(r.kind for r in results) == ["sc", "sc", "sc", "seg", "sr"]
    job = with_store(portico, lambda s: s.jobs())[0]
    assert job.state is JobState.DONE and "summary" in job.timings
