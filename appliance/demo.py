"""The demo: Orthanc as the PACS, Portico beside it, a phantom CT study through the whole path.

Everything runs on loopback, on free ports, under one working folder; :meth:`Demo.stop` stops all
it started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from appliance.demo_study import write_ct_series
from appliance.pacs_standin import OrthancStandIn
from appliance.settings import load_settings
from appliance.store import Store
from inference.phantom import make_phantom

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def portico_config(workdir: Path, *, port: int, orthanc_dicom_port: int, models_dir: Path, rules_file: Path,
                   quiet_seconds: float = 10.0, extra: dict[str, Any] | None = None) -> Path:
    """Write a ``portico.yaml`` for a Portico beside a loopback Orthanc; returns its path."""
    cfg: dict[str, Any] = {
        "mode": "dev",
        "storage": {"data_dir": str(workdir / "var"), "fsync": True, "min_free_mb": 64},
        "router": {
            "ae_title": "PORTICO", "bind_host": "127.0.0.1", "port": port, "quiet_seconds": quiet_seconds,
            "poll_seconds": 0.1, "rules_file": str(rules_file),
            "peers": [{"ae_title": "ORTHANC", "hosts": ["127.0.0.1"], "query_host": "127.0.0.1",
                       "query_port": orthanc_dicom_port, "query_ae_title": "ORTHANC"}],
        },
        "dispatch": {"destinations": [{"kind": "dimse", "name": "pacs", "ae_title": "ORTHANC",
                                       "host": "127.0.0.1", "port": orthanc_dicom_port}],
                     "retry_initial_seconds": 0.5, "retry_max_seconds": 5, "poll_seconds": 0.1},
        "inference": {"models_dir": str(models_dir)},
    }
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "portico.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class PorticoProcess:
    """``portico serve`` as a real subprocess."""

    config: Path
    port: int
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"portico serve exited with {self._proc.returncode}; see {self.log_path}")
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"portico serve did not listen on port {self.port} within {timeout:.0f}s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Demo:
    workdir: Path
    slices: int = 100
    orthanc: OrthancStandIn | None = None
    portico: PorticoProcess | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        portico_port, http_port, dicom_port = free_port(), free_port(), free_port()
        self.orthanc = OrthancStandIn(self.workdir / "orthanc", http_port, dicom_port,
                                      modalities={"portico": ("PORTICO", "127.0.0.1", portico_port)})
        self.orthanc.start()
        config = portico_config(self.workdir / "portico", port=portico_port, orthanc_dicom_port=dicom_port,
                                models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml")
        self.portico = PorticoProcess(config, portico_port, self.workdir / "portico" / "serve.log")
        self.portico.start()

    def run_study(self, timeout: float = 600.0) -> dict[str, Any]:
        """Load the phantom into Orthanc, have Orthanc send it to Portico, wait for SEG + SR back."""
        assert self.orthanc is not None and self.portico is not None
        phantom = make_phantom((self.slices, 512, 512), (2.5, 0.8, 0.8), seed=7)
        study = write_ct_series(phantom.hu, phantom.spacing, self.workdir / "study", seed=7)
        ids = [self.orthanc.request("POST", "/instances", p.read_bytes())["ParentStudy"] for p in study.paths]
        orthanc_study = ids[0]
        t_send = time.time()
        self.orthanc.request("POST", "/modalities/portico/store", {"Resources": [orthanc_study],
                                                                   "Synchronous": True})
        t_sent = time.time()
        deadline = time.monotonic() + timeout
        found: dict[str, str] = {}
        while time.monotonic() < deadline and len(found) < 2:
            for series_id in self.orthanc.request("GET", f"/studies/{orthanc_study}")["Series"]:
                modality = self.orthanc.request("GET", f"/series/{series_id}")["MainDicomTags"].get("Modality")
                if modality in ("SEG", "SR"):
                    found[modality] = series_id
            time.sleep(0.2)
        t_back = time.time()
        self.report = {
            "study_instance_uid": study.study_instance_uid,
            "instances": len(study.paths),
            "orthanc_study": orthanc_study,
            "seg_and_sr_in_pacs": sorted(found) == ["SEG", "SR"],
            "seconds": {"orthanc_send": round(t_sent - t_send, 2),
                        "last_instance_to_results_in_pacs": round(t_back - t_sent, 2)},
            "explorer": f"{self.orthanc.url}/app/explorer.html#study?uuid={orthanc_study}",
            **self._portico_facts(study.study_instance_uid),
        }
        return self.report

    def _portico_facts(self, study_uid: str) -> dict[str, Any]:
        assert self.portico is not None
        settings = load_settings(self.portico.config)
        store = Store(settings.data_dir, fsync=False)
        try:
            jobs = store.jobs(study_uid)
            facts: dict[str, Any] = {"jobs": []}
            sent = {o["sop_instance_uid"]: o["sent_at"] for o in store.outbox() if o["sent_at"]}
            for job in jobs:
                results = store.results(job.id)
                sr = [r for r in results if r.kind == "sr"]
                run = store.run(study_uid, job.run_version)
                stages = {"completeness": run.created - run.last_received} if run else {}
                stages.update(job.timings)
                sent_at = [sent[r.sop_instance_uid] for r in results if r.sop_instance_uid in sent]
                if sent_at and len(sent_at) == len(results):
                    stages["dispatch"] = max(sent_at) - job.updated
                facts["jobs"].append({
                    "model": job.model, "state": str(job.state), "provider": job.provider,
                    "run_version": job.run_version,
                    "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
                    "measurements": sr[0].detail.get("measurements", []) if sr else [],
                })
            facts["audit_events"] = len(store.audit_events(study_uid))
            return facts
        finally:
            store.close()

    def stop(self) -> None:
        if self.portico is not None:
            self.portico.stop()
        if self.orthanc is not None:
            self.orthanc.stop()


def format_report(report: dict[str, Any]) -> str:
    lines = ["", "Portico demo", "============",
             f"study            {report['study_instance_uid']} ({report['instances']} CT instances, synthetic)",
             f"SEG + SR in PACS {'yes' if report['seg_and_sr_in_pacs'] else 'NO'}",
             f"Orthanc send     {report['seconds']['orthanc_send']} s",
             f"last instance → results in PACS  {report['seconds']['last_instance_to_results_in_pacs']} s"]
    for job in report.get("jobs", []):
        lines.append(f"model            {job['model']} [{job['state']}] on {job['provider']}")
        lines.append("stages           " + ", ".join(f"{k} {v} s" for k, v in job["stage_seconds"].items()))
        for m in job["measurements"]:
            lines.append(f"  {m.get('name', '?'):<24} volume {m.get('volume_ml', 0):9.1f} ml   "
                         f"mean {m.get('mean') if m.get('mean') is None else round(m['mean'], 1)} HU")
    lines += [f"see it           {report['explorer']}", ""]
    return "\n".join(lines) + "\n"
