"""Real NVFlare on localhost: one server, two Portico appliances, each with its own data.

site-a holds synthetic labelled phantoms and runs the FL supervisor alone (``portico fl run``);
site-b holds phantoms plus the real CT from ``../shared/data`` (labels from the HU rule, stored as a
SEG beside it) and runs as the whole appliance (``portico serve``: SCP, HTTP API and the supervisor).
The tests share one federation and run in file order: approvals, BYOC refusal, two FedAvg rounds to a
candidate used for inference, what left the sites, supervisor restart, a clean stop of ``serve``
mid-job, a site killed mid-job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509

from appliance.models import ModelRegistry
from appliance.settings import load_settings
from appliance.store import Store
from fl_client.job_review import content_hash
from fl_client.kit import fingerprint
from fl_client.supervisor import descendants
from inference.phantom import make_phantom
from inference.predict import segment
from inference.runtime.onnxruntime import OnnxRuntime
from tests.conftest import real_data_present
from tests.integration.fl.harness import (
    PATIENT_PREFIX,
    Federation,
    Site,
    job_folder,
    make_base_package,
    phantom_studies,
    real_ct_study,
)
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: the floor is on (clip, noise, budget, local normalisation) at test scale: tiny cohorts, and noise small
#: enough that two rounds still learn (std = 1e-5 x 100 = 1e-3 per coordinate; the budget is nominal)
CLIP_NORM, NOISE_MULTIPLIER = 100.0, 1e-5
# run_as None: these sites run NVFlare as the test's own user (root here); the box test runs one as its own user
SITE_SETTINGS = {"enabled": True, "restart_backoff_s": 1.0, "stop_timeout_s": 5.0, "run_as": None,
                 "privacy": {"min_series": 2, "min_patients": 2, "min_examples_per_round": 16,
                             "clip_norm": CLIP_NORM, "noise_multiplier": NOISE_MULTIPLIER, "epsilon": 1e15}}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("fl")
    federation = Federation(root, free_port())
    try:
        federation.provision(["site-a", "site-b"])
        federation.start_server()
        for name, seeds in (("site-a", [11, 12, 13, 14]), ("site-b", [21, 22, 23])):
            site = federation.add_site(name, SITE_SETTINGS, serve=name == "site-b")
            package = make_base_package(site.models_dir)
            store = Store(site.data_dir, fsync=False)
            phantom_studies(store, site.root / "work", package, seeds)
            if name == "site-b":
                # the real CT when ../shared/data is here; without it, one more phantom
                if real_data_present():
                    real_ct_study(store, site.root / "work", package)
                else:
                    phantom_studies(store, site.root / "work", package, [24])
            store.close()
            root_ca = x509.load_pem_x509_certificate((site.kit / "startup" / "rootCA.pem").read_bytes())
            site.portico("fl", "enrol", str(site.kit), "--fingerprint", fingerprint(root_ca))
            site.portico("fl", "cohort", "refresh")
            federation.start_site(site)
        for site in federation.sites.values():
            wait_for(lambda s=site: s.status()["state"] == "connected", 120, 1.0, f"{site.name} connected")
        federation.session = federation.admin()
        yield federation
    finally:
        session = getattr(federation, "session", None)
        if session is not None:
            session.close()
        federation.close()
        # nothing started by the tests outlives them: no process mentions the federation's folder
        leftovers = [pid for pid in _pids() if str(root) in _cmdline(pid)]
        assert not leftovers, f"processes outlived the tests: {[_cmdline(p) for p in leftovers]}"


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _status(fed: Federation, job_id: str) -> str:
    return str(fed.session.get_job_meta(job_id).get("status", ""))


def _finished(fed: Federation, job_id: str) -> str | None:
    status = _status(fed, job_id)
    return status if status.startswith("FINISHED") else None


def _pending(site: Site, job_id: str) -> dict[str, Any] | None:
    return next((p for p in site.status()["pending_approval"] if p["job_id"] == job_id), None)


def _approve_all(fed: Federation, job_id: str, job: Path) -> None:
    """Each site reviews the submitted folder; the approval binds its client app's content hash."""
    for site in fed.sites.values():
        wait_for(lambda s=site: _pending(s, job_id), 60, 0.5, f"{job_id} waiting at {site.name}")
        out = site.portico("fl", "approve", job_id, "--job", str(job)).stdout
        assert "content sha256" in out and "privacy floor that applies" in out, out


def _audit(site: Site) -> list[dict[str, Any]]:
    store = Store(site.data_dir, fsync=False)
    try:
        return store.audit_events()
    finally:
        store.close()


def test_unapproved_job_does_not_run(fed: Federation, tmp_path: Path) -> None:
    job_id = fed.session.submit_job(str(job_folder(tmp_path, name="unapproved")))
    site_a, site_b = fed.sites["site-a"], fed.sites["site-b"]
    pending = wait_for(lambda: _pending(site_a, job_id), 60, 0.5, "the job waiting at site-a")
    assert "waiting for approval" in pending["reason"] and job_id in pending["reason"]
    site_b_pending = wait_for(lambda: _pending(site_b, job_id), 60, 0.5, "the job waiting at site-b")
    assert site_b_pending["name"] == "unapproved"
    site_b.portico("fl", "reject", job_id, "--reason", "not our protocol")
    # the scheduler keeps asking; nothing is deployed while a site refuses
    wait_for(lambda: (_pending(site_a, job_id) or {}).get("attempts", 0) >= 2, 60, 0.5, "a second attempt")
    assert _status(fed, job_id) == "SUBMITTED"
    for site in (site_a, site_b):
        assert not (site.data_dir / "fl" / "site" / job_id).exists()
        assert job_id not in site.status()["running_jobs"]
    assert "rejected by the site: not our protocol" in _pending(site_b, job_id)["reason"]
    fed.session.abort_job(job_id)
    events = [e["event"] for e in _audit(site_b)]
    assert "fl_job_rejected" in events and "fl_enrolled" in events


def test_job_with_custom_code_is_refused(fed: Federation, tmp_path: Path) -> None:
    job = job_folder(tmp_path, name="byoc", custom_client_code=True)
    job_id = fed.session.submit_job(str(job))
    site = fed.sites["site-a"]
    wait_for(lambda: _pending(site, job_id), 60, 0.5, f"{job_id} waiting at site-a")
    # the review refuses client code at once
    refused = site.portico("fl", "approve", job_id, "--job", str(job), check=False)
    assert refused.returncode == 1 and "custom" in refused.stdout + refused.stderr
    # an administrator who approves the bare hash anyway: NVFlare's byoc: none still refuses the deploy
    sha = content_hash(job / "app_client")
    for s in fed.sites.values():
        wait_for(lambda s=s: _pending(s, job_id), 60, 0.5, f"{job_id} waiting at {s.name}")
        s.portico("fl", "approve", job_id, "--content-sha256", sha)
    status = wait_for(lambda: _finished(fed, job_id) or ("FAILED" in _status(fed, job_id) and _status(fed, job_id)),
                      120, 1.0, "the BYOC job to end")
    assert "COMPLETED" not in status
    for site in fed.sites.values():
        assert not (site.data_dir / "fl" / "portico" / "jobs" / job_id / "rounds.jsonl").exists()
    assert not Path("/tmp/pwned").exists()


def test_two_rounds_improve_dice_and_candidate_runs(fed: Federation, tmp_path: Path) -> None:
    started = time.monotonic()
    job = job_folder(tmp_path, rounds=2, min_responses=2, steps=40)
    job_id = fed.session.submit_job(str(job))
    _approve_all(fed, job_id, job)
    status = wait_for(lambda: _finished(fed, job_id), 300, 1.0, "two FedAvg rounds")
    assert status == "FINISHED:COMPLETED", status
    fed.job_id = job_id
    for site in fed.sites.values():
        job_dir = site.data_dir / "fl" / "portico" / "jobs" / job_id
        rounds = [json.loads(line) for line in (job_dir / "rounds.jsonl").read_text().splitlines()]
        final = json.loads((job_dir / "final.json").read_text())
        assert [r["round"] for r in rounds] == [0, 1]
        assert final["rounds"] == 2 and sorted(final["contributors"]) == ["site-a", "site-b"]
        # the global model after two rounds beats the initial model on this site's own validation data
        assert final["dice_local"] > rounds[0]["dice_global"] + 0.05, (site.name, rounds, final)
        exported = wait_for(lambda d=job_dir: json.loads((d / "exported.json").read_text())
                            if (d / "exported.json").is_file() else None, 60, 0.5, "the automatic export")
        assert exported["role"] == "candidate" and exported["onnx_max_abs_diff"] < 1e-3
        status_now = site.status()
        assert status_now["jobs"][job_id]["last_round"]["round"] == 1
        events = [e["event"] for e in _audit(site)]
        assert {"fl_job_approved", "fl_round", "fl_job_finished", "fl_exported", "model_added"} <= set(events)

    # promoted at site-a, the candidate is what inference uses on a new study
    site = fed.sites["site-a"]
    ref = json.loads((site.data_dir / "fl" / "portico" / "jobs" / job_id / "exported.json").read_text())["installed"]
    settings = load_settings(site.config)
    assert ModelRegistry.from_settings(settings).get("ct-body-composition").manifest.version == "1.0.0"
    site.portico("models", "promote", ref)
    package = ModelRegistry.from_settings(settings).get("ct-body-composition")
    assert package.ref == ref and package.manifest.provenance["fl_job_id"] == job_id
    phantom = make_phantom((4, 96, 96), (2.5, 4.0, 4.0), seed=777)
    labels = segment(phantom.hu, phantom.spacing, package.manifest, OnnxRuntime(package.model_path,
                                                                                ("CPUExecutionProvider",)))
    assert labels.shape == phantom.hu.shape and set(np.unique(labels)) - {0}
    assert time.monotonic() - started < 240


def test_only_weights_and_metrics_leave_a_site(fed: Federation) -> None:
    job_id = fed.job_id
    received = sorted((fed.root / "received").glob("*.bin"))
    assert len(received) >= 6  # 2 sites x (2 train + 1 validate)
    forbidden = [PATIENT_PREFIX.encode(), b"FLPAT", b"FLREAL", b"DICM", b"1.2.840.10008.5.1.4.1.1.2",
                 b"1.2.840.10008.5.1.4.1.1.66.4", b"PHA00000", b"Synthetic CT phantom"]
    for site in fed.sites.values():
        store = Store(site.data_dir, fsync=False)
        try:
            rows = store.db.query("SELECT study_uid, series_uid, sop_instance_uid, path FROM instances")
        finally:
            store.close()
        for r in rows[:40]:
            forbidden += [r["study_uid"].encode(), r["series_uid"].encode(), r["sop_instance_uid"].encode()]
        # a run of raw pixel bytes from a stored CT slice
        ct = next(Path(r["path"]) for r in rows if "seg" not in Path(r["path"]).name)
        raw = ct.read_bytes()
        forbidden.append(raw[-4096:-4032])
        ledger = [json.loads(line) for line in
                  (site.data_dir / "fl" / "portico" / "jobs" / job_id / "ledger.jsonl").read_text().splitlines()]
        assert ledger and not any(e["blocked"] for e in ledger)
        # updates leave as weight differences (after the privacy floor), metrics as metrics
        assert {e["kind"] for e in ledger} == {"DataKind.WEIGHT_DIFF", "DataKind.METRICS"}
        assert all(set(e["meta"]) <= {"NUM_STEPS_CURRENT_ROUND", "initial_metrics.dice", "dice"} for e in ledger)
        floor = [json.loads(line) for line in
                 (site.data_dir / "fl" / "portico" / "jobs" / job_id / "privacy.jsonl").read_text().splitlines()]
        assert len(floor) == 2 and not any(e["blocked"] for e in floor)
        assert all(e["noise_std"] == pytest.approx(CLIP_NORM * NOISE_MULTIPLIER) for e in floor)
        assert all(e["clip_norm"] == CLIP_NORM and any("running_mean" in d for d in e["dropped"]) for e in floor)
        budget = site.status()["privacy"]["budget"]
        assert budget["rounds_accounted"] >= 2 and budget["epsilon_spent"] > 0 and not budget["exhausted"]
    for path in received:
        data = path.read_bytes()
        for needle in forbidden:
            assert needle not in data, f"{needle[:40]!r} left a site in {path.name}"
    # every training update as the server received it, against the floor
    _check_received_against_floor(received)


def _check_received_against_floor(received: list[Path]) -> None:
    from nvflare.apis.dxo import DataKind, from_shareable
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs

    from fl_client.architectures import build_network
    from fl_client.privacy import is_sendable

    common_decomposers.register()
    fobs.register(TensorDecomposer)
    allowed = {k for k in build_network("ct-body-composition").state_dict() if is_sendable(k)}
    updates = 0
    for path in received:
        dxo = from_shareable(fobs.loads(path.read_bytes()))
        if dxo.data_kind == DataKind.METRICS:
            continue
        assert dxo.data_kind == DataKind.WEIGHT_DIFF, (path.name, dxo.data_kind)
        names = set(dxo.data)
        assert names <= allowed and not [n for n in names if "running_" in n or "num_batches" in n], names
        arrays = [np.asarray(v, np.float64) for v in dxo.data.values()]
        size = sum(a.size for a in arrays)
        norm = float(np.sqrt(sum(float(np.sum(a * a)) for a in arrays)))
        # clipped to CLIP_NORM, plus Gaussian noise of norm about std x sqrt(size)
        assert norm <= CLIP_NORM + 5 * CLIP_NORM * NOISE_MULTIPLIER * np.sqrt(size), (path.name, norm)
        updates += 1
    assert updates >= 4, updates  # 2 sites x 2 rounds


def test_serve_reports_the_federation_through_its_api(fed: Federation) -> None:
    site = fed.sites["site-b"]
    status = site.api_get("/fl/status")
    assert status["state"] == "connected" and status["site"] == "site-b"
    assert status["process"]["running"] and status["process"]["pid"] == site.status()["process"]["pid"]
    assert fed.job_id in status["jobs"] and status["jobs"][fed.job_id]["last_round"]["round"] == 1
    assert site.api_get("/health")["status"] == "ok"


def test_supervisor_restarts_a_killed_client(fed: Federation) -> None:
    site = fed.sites["site-b"]
    before = site.status()["process"]
    assert before["running"]
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for(lambda: (p := site.status()["process"])["running"] and p["pid"] != before["pid"] and p,
                     60, 0.5, "the restarted client")
    assert after["pid"] != before["pid"]
    wait_for(lambda: site.status()["state"] == "connected", 90, 1.0, "site-a connected again")
    exits = [e for e in _audit(site) if e["event"] == "fl_client" and e["detail"].get("kind") == "exited"]
    assert exits


def test_serve_stops_cleanly_mid_job_with_its_job_processes(fed: Federation, tmp_path: Path) -> None:
    job = job_folder(tmp_path, rounds=1, min_responses=1, steps=2000, timeout=120, wait_after_min=1,
                     name="interrupted")
    job_id = fed.session.submit_job(str(job))
    _approve_all(fed, job_id, job)
    site = fed.sites["site-b"]
    assert site.proc is not None
    proc = site.proc

    def job_process() -> dict[int, int] | None:
        tree = descendants(proc.pid)
        return tree if any(job_id in _cmdline(pid) for pid in tree) else None

    tree = wait_for(job_process, 120, 0.5, "site-b's job process")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    site.proc = None
    # the client and the job process (in a session of its own) went with the appliance, unforced
    alive = [pid for pid in tree if _cmdline(pid)]
    assert not alive, [_cmdline(pid) for pid in alive]
    events = [e for e in _audit(site) if e["event"] == "service"]
    assert events[-1]["detail"].get("action") == "stop"
    fed.session.abort_job(job_id)
    wait_for(lambda: _finished(fed, job_id), 90, 1.0, "the aborted job")
    fed.start_site(site)
    wait_for(lambda: site.status()["state"] == "connected", 120, 1.0, "site-b connected again")


def test_a_dead_site_does_not_stall_the_round(fed: Federation, tmp_path: Path) -> None:
    job = job_folder(tmp_path, rounds=2, min_responses=1, steps=10, timeout=90, wait_after_min=3,
                     name="tolerant")
    job_id = fed.session.submit_job(str(job))
    _approve_all(fed, job_id, job)
    site_b = fed.sites["site-b"]
    rounds_b = site_b.data_dir / "fl" / "portico" / "jobs" / job_id / "rounds.jsonl"
    wait_for(rounds_b.is_file, 180, 0.2, "site-b's first round")
    # the whole appliance of site-b dies at once: supervisor, NVFlare client and job process
    assert site_b.proc is not None
    tree = {site_b.proc.pid: 0, **descendants(site_b.proc.pid)}
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    site_b.proc.wait(timeout=10)
    site_b.proc = None
    # rounds go on with site-a alone; the final global model reaches it and becomes a candidate
    job_a = fed.sites["site-a"].data_dir / "fl" / "portico" / "jobs" / job_id
    wait_for((job_a / "exported.json").is_file, 180, 0.5, "site-a's final model without site-b")
    final = json.loads((job_a / "final.json").read_text())
    rounds = [json.loads(line)["round"] for line in (job_a / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [0, 1] and final["rounds"] == 2 and final["contributors"] == ["site-a"], final
    # NVFlare's server keeps the job RUNNING until it gives up on the dead client: end it
    fed.session.abort_job(job_id)
    wait_for(lambda: _finished(fed, job_id), 60, 1.0, "the aborted job")
    shutil.rmtree(fed.root / "received", ignore_errors=True)
