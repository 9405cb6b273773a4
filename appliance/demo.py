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
from pydicom.uid import generate_uid

from appliance.demo_study import write_ct_series
from appliance.pacs_standin import OrthancStandIn
from appliance.settings import load_settings
from appliance.store import JobState, Store
from appliance.viewer import OHIF_DIST, OhifServer
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
    path.touch(mode=0o600)  # owner-only, as `portico serve` asks of a configuration file in production
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    path.chmod(0o600)
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

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit (after a signal sent to it); its exit status."""
        assert self._proc is not None
        return self._proc.wait(timeout=timeout)

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
    #: progress lines on stdout while it works (on a terminal)
    show_progress: bool = False
    #: the model packages Portico serves (the shipped demo model by default)
    models_dir: Path = REPO / "models"
    #: the OHIF viewer against Orthanc's DICOMweb, when its build is here (``make ohif``)
    ohif: OhifServer | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        portico_port, http_port, dicom_port = free_port(), free_port(), free_port()
        self.progress(f"starting Orthanc (the PACS) on ports {http_port} and {dicom_port}")
        self.orthanc = OrthancStandIn(self.workdir / "orthanc", http_port, dicom_port,
                                      modalities={"portico": ("PORTICO", "127.0.0.1", portico_port)})
        self.orthanc.start()
        if (OHIF_DIST / "index.html").is_file():
            self.ohif = OhifServer(self.orthanc.url)
            self.progress(f"serving the OHIF viewer on {self.ohif.url}")
        config = portico_config(self.workdir / "portico", port=portico_port, orthanc_dicom_port=dicom_port,
                                models_dir=self.models_dir, rules_file=REPO / "config" / "rules.yaml")
        self.portico = PorticoProcess(config, portico_port, self.workdir / "portico" / "serve.log")
        self.progress(f"starting Portico on port {portico_port} (log: {self.portico.log_path})")
        self.portico.start()

    def run_study(self, timeout: float = 600.0) -> dict[str, Any]:
        """Load the phantom into Orthanc, have Orthanc send it to Portico, wait for SEG + SR back.

        Every run is a new study (fresh UIDs, the same pixels), so the report can only be this run's:
        results found in the PACS are this study's, and the jobs are this study's. A job that fails
        for good, or a study no rule routes, ends the wait at once (``report["failure"]``).
        """
        assert self.orthanc is not None and self.portico is not None
        phantom = make_phantom((self.slices, 512, 512), (2.5, 0.8, 0.8), seed=7)
        study = write_ct_series(phantom.hu, phantom.spacing, self.workdir / "study" / str(int(time.time())), seed=7,
                                study_instance_uid=generate_uid())
        ids = [self.orthanc.request("POST", "/instances", p.read_bytes())["ParentStudy"] for p in study.paths]
        orthanc_study = ids[0]
        self.progress(f"study loaded into Orthanc ({len(study.paths)} CT instances); Orthanc sends it to Portico")
        t_send = time.time()
        self.orthanc.request("POST", "/modalities/portico/store", {"Resources": [orthanc_study],
                                                                   "Synchronous": True})
        t_sent = time.time()
        self.progress(f"sent in {t_sent - t_send:.1f} s; Portico waits until the study is complete")
        deadline = time.monotonic() + timeout
        found: dict[str, str] = {}
        failure: dict[str, str] | None = None
        said = ""
        while time.monotonic() < deadline and len(found) < 2 and failure is None:
            for series_id in self.orthanc.request("GET", f"/studies/{orthanc_study}")["Series"]:
                modality = self.orthanc.request("GET", f"/series/{series_id}")["MainDicomTags"].get("Modality")
                if modality in ("SEG", "SR"):
                    found[modality] = series_id
            stage, failure = self._stage(study.study_instance_uid)
            if stage != said:
                self.progress(stage)
                said = stage
            time.sleep(0.2)
        t_back = time.time()
        if failure is None and len(found) < 2:
            failure = {"code": "timeout", "message": f"no SEG and SR in the PACS after {timeout:.0f} s"}
        self.report = {
            "study_instance_uid": study.study_instance_uid,
            "instances": len(study.paths),
            "orthanc_study": orthanc_study,
            "seg_and_sr_in_pacs": sorted(found) == ["SEG", "SR"],
            "seconds": {"orthanc_send": round(t_sent - t_send, 2),
                        "last_instance_to_results_in_pacs": round(t_back - t_sent, 2)},
            "explorer": f"{self.orthanc.url}/app/explorer.html#study?uuid={orthanc_study}",
            **({"ohif": self.ohif.viewer_url(study.study_instance_uid, self._series_uid(found["SEG"]))}
               if self.ohif is not None and "SEG" in found else {}),
            # with the SR in the viewport OHIF loads its measurements into its panel (appliance.viewer)
            **({"ohif_measurements": self.ohif.viewer_url(study.study_instance_uid, self._series_uid(found["SR"]))}
               if self.ohif is not None and "SR" in found else {}),
            "log": str(self.portico.log_path),
            **({"failure": failure} if failure is not None and len(found) < 2 else {}),
            **self._portico_facts(study.study_instance_uid),
        }
        return self.report

    def _series_uid(self, orthanc_series: str) -> str:
        assert self.orthanc is not None
        return str(self.orthanc.request("GET", f"/series/{orthanc_series}")["MainDicomTags"]["SeriesInstanceUID"])

    def progress(self, line: str) -> None:
        """A progress line on a terminal; nothing without one (the report says it all)."""
        if self.show_progress:
            sys.stdout.write(f"  … {line}\n")
            sys.stdout.flush()

    def _stage(self, study_uid: str) -> tuple[str, dict[str, str] | None]:
        """Where this study is in Portico, and the failure that ends the demo, if any."""
        assert self.portico is not None
        store = Store.from_settings(load_settings(self.portico.config), fsync=False)
        try:
            jobs = store.jobs(study_uid)
            events = {str(e["event"]) for e in store.audit_events(study_uid)}
            job_ids = {job.id for job in jobs}
            pending_outbox = [o for o in store.outbox() if o["job_id"] in job_ids and not o["sent_at"]]
        finally:
            store.close()
        for job in jobs:
            if job.state == JobState.FAILED:
                code, _, message = (job.error or "unknown: no error recorded").partition(": ")
                return f"job {job.id} failed", {"code": code, "message": message or code, "job": str(job.id)}
        if not jobs:
            if "no_match" in events:
                return "no rule matched", {"code": "no_match", "message": "no routing rule matched the study "
                                           "(see `portico rules explain` and config/rules.yaml)"}
            return ("study complete, routing" if "study_complete" in events else
                    "receiving / waiting for the study to be complete"), None
        if any(job.state == JobState.PENDING and job.error for job in jobs):
            return "a job failed and will be retried: " + next(j.error or "" for j in jobs if j.error), None
        running = [job for job in jobs if job.state == JobState.RUNNING]
        if running and running[0].progress is not None:
            done, total = running[0].progress
            return f"inference: {done}/{total} slices ({running[0].model})", None
        if any(job.state in (JobState.PENDING, JobState.RUNNING) for job in jobs):
            return f"inference running ({', '.join(sorted({j.model for j in jobs}))})", None
        if pending_outbox:
            return "sending results to the PACS", None
        return "results sent; waiting for the PACS to index them", None

    def _portico_facts(self, study_uid: str) -> dict[str, Any]:
        assert self.portico is not None
        settings = load_settings(self.portico.config)
        store = Store.from_settings(settings, fsync=False)
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
        if self.ohif is not None:
            self.ohif.close()
            self.ohif = None
        if self.portico is not None:
            self.portico.stop()
        if self.orthanc is not None:
            self.orthanc.stop()


def format_report(report: dict[str, Any]) -> str:
    lines = ["", "Portico demo", "============",
             f"study            {report['study_instance_uid']} ({report['instances']} CT instances, synthetic)",
             f"SEG + SR in PACS {'yes' if report['seg_and_sr_in_pacs'] else 'NO'}"]
    failure = report.get("failure")
    if failure:
        lines.append(f"FAILED           [{failure['code']}] {failure['message']}")
        lines.append(f"log              {report['log']}")
        return "\n".join([*lines, ""]) + "\n"
    lines += [f"Orthanc send     {report['seconds']['orthanc_send']} s",
              f"last instance → results in PACS  {report['seconds']['last_instance_to_results_in_pacs']} s"]
    for job in report.get("jobs", []):
        lines.append(f"model            {job['model']} [{job['state']}] on {job['provider']}")
        lines.append("stages           " + ", ".join(f"{k} {v} s" for k, v in job["stage_seconds"].items()))
        for m in job["measurements"]:
            lines.append(f"  {m.get('name', '?'):<24} volume {m.get('volume_ml', 0):9.1f} ml   "
                         f"mean {m.get('mean') if m.get('mean') is None else round(m['mean'], 1)} HU")
    lines.append(f"see it           {report['explorer']}")
    lines.append(f"see it in OHIF   {report['ohif']}" if report.get("ohif") else
                 "see it in OHIF   (run `make ohif` once: it fetches the pinned viewer build)")
    if report.get("ohif_measurements"):
        lines.append(f"measurements     {report['ohif_measurements']}")
    lines += [f"log              {report['log']}", ""]
    return "\n".join(lines) + "\n"
