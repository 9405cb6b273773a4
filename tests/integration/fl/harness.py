"""A real NVFlare federation on localhost for the FL tests: provisioning, server, Portico sites.

Everything lives under one temporary folder; HOME and TMPDIR of every NVFlare process point inside
it. Each process started here is recorded and stopped by :meth:`Federation.close`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from appliance.demo_study import write_ct_series
from appliance.store import Store
from dicom_router.ports import ReceivedInstance
from fl_client.architectures import Slab, build_network
from fl_client.supervisor import descendants, kill_tree
from inference.packages import MANIFEST_NAME, load_package, read_manifest, write_digests
from inference.phantom import hu_reference_labels, make_phantom
from inference.results.seg import build_seg
from inference.settings import DeviceIdentity
from inference.volume import load_series
from tests.conftest import real_data_root
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for

REPO = Path(__file__).resolve().parents[3]
PY = sys.executable
JOB_TEMPLATE = REPO / "fl_jobs" / "ct-body-composition-fedavg"
PATIENT_PREFIX = "FLTEST^PATIENT"
REAL_CT = real_data_root() / "totalsegmentator" / "example_ct_dicom"
RECORDER = Path(__file__).with_name("server_recorder.py")
API_TOKEN = "fl-test-api-token"


def env_for(root: Path) -> dict[str, str]:
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# ---- model package stand-in ----------------------------------------------------------------------

def _build_script() -> Any:
    spec = importlib.util.spec_from_file_location("build_ct_body_composition",
                                                  REPO / "models" / "build_ct_body_composition.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_base_package(models_dir: Path) -> Path:
    """``ct-body-composition`` 1.0.0 as the build script describes it, with untrained weights (fast)."""
    build = _build_script()
    out = models_dir / "ct-body-composition-1.0.0"
    out.mkdir(parents=True)
    torch.manual_seed(0)
    net = build_network("ct-body-composition").eval()
    import warnings

    warnings.filterwarnings("ignore")
    torch.onnx.export(Slab(net), (torch.zeros(1, 1, 1, 64, 64),), str(out / "model.onnx"), input_names=["image"],
                      output_names=["logits"], dynamo=False, opset_version=17,
                      dynamic_axes={"image": {0: "batch", 2: "z", 3: "y", 4: "x"},
                                    "logits": {0: "batch", 2: "z", 3: "y", 4: "x"}})
    (out / "MODEL_CARD.md").write_text("test stand-in\n")
    (out / "LICENSE").write_text(build.APACHE_NOTICE)
    files = write_digests(out, ["model.onnx", "MODEL_CARD.md", "LICENSE"])
    data = json.loads(json.dumps(build.manifest_data(files, build.Config(), {}), default=str))
    (out / MANIFEST_NAME).write_text(yaml.safe_dump(data, sort_keys=False))
    load_package(out)
    return out


# ---- site data -------------------------------------------------------------------------------------

def _store_file(store: Store, path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    store.store(ReceivedInstance(
        sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae_title="TESTPACS",
        peer_address="127.0.0.1", data=path.read_bytes()))


def add_labelled_study(store: Store, work: Path, manifest_dir: Path, *, hu: np.ndarray[Any, Any],
                       spacing: tuple[float, float, float], labels: np.ndarray[Any, Any] | None,
                       patient: str, seed: int, paths: list[Path] | None = None) -> str:
    """Write (or take) a CT series and a SEG of ``labels`` on it; store both like received instances."""
    manifest, _ = read_manifest(manifest_dir)
    if paths is None:
        written = write_ct_series(hu, spacing, work / f"ct-{seed}", patient_name=f"{PATIENT_PREFIX}{seed}",
                                  patient_id=patient, seed=seed, series_description="FL test CT")
        paths = written.paths
    volume = load_series(paths)
    if labels is None:
        labels = hu_reference_labels(volume.hu, volume.spacing)
    seg = build_seg(volume, labels.astype(np.uint8), manifest, DeviceIdentity(), "1.2.826.0.1.3680043.10.999",
                    f"fl-test-{seed}")
    seg_path = work / f"seg-{seed}.dcm"
    seg.save_as(seg_path)
    for path in paths:
        _store_file(store, path)
    _store_file(store, seg_path)
    return str(volume.study_instance_uid)


def phantom_studies(store: Store, work: Path, package: Path, seeds: list[int], size: int = 64) -> list[str]:
    uids = []
    for seed in seeds:
        p = make_phantom((6, size, size), (2.5, 400.0 / size, 400.0 / size), seed=seed)
        uids.append(add_labelled_study(store, work, package, hu=p.hu, spacing=p.spacing, labels=p.labels,
                                       patient=f"FLPAT{seed:04d}", seed=seed))
    return uids


def real_ct_study(store: Store, work: Path, package: Path) -> str:
    """The real CT's pixels, re-written with fresh UIDs (the example data's UIDs are empty)."""
    volume = load_series(sorted(p for p in REAL_CT.iterdir() if p.is_file()))
    return add_labelled_study(store, work, package, hu=volume.hu, spacing=volume.spacing, labels=None,
                              patient="FLREAL0001", seed=999)


# ---- the federation --------------------------------------------------------------------------------

@dataclass
class Site:
    name: str
    root: Path
    config: Path
    kit: Path
    serve: bool = False
    api_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def portico(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([PY, "-m", "appliance", *args[:1], "-c", str(self.config), *args[1:]],
                              cwd=REPO, env=env_for(self.root), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"portico {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def status(self) -> dict[str, Any]:
        out = self.portico("fl", "status", "--json")
        return dict(json.loads(out.stdout))

    def api_get(self, path: str) -> Any:
        """``GET path`` from the site's HTTP API (``portico serve`` sites only)."""
        assert self.api_port is not None, f"{self.name} runs without the API"
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}",
                                         headers={"Authorization": f"Bearer {API_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@dataclass
class Federation:
    root: Path
    port: int
    project: str = "portico_test"
    sites: dict[str, Site] = field(default_factory=dict)
    server_proc: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    known: dict[int, int] = field(default_factory=dict)

    @property
    def prod(self) -> Path:
        return self.root / "ws" / self.project / "prod_00"

    @property
    def admin_kit(self) -> Path:
        return self.prod / "admin@portico.test"

    def provision(self, site_names: list[str]) -> None:
        participants = [
            {"name": "server", "type": "server", "org": "portico", "fed_learn_port": self.port,
             "admin_port": self.port, "default_host": "localhost"},
            {"name": "admin@portico.test", "type": "admin", "org": "portico", "role": "project_admin"},
            *({"name": s, "type": "client", "org": "hospital"} for s in site_names)]
        project = {"api_version": 3, "name": self.project, "description": "Portico FL test",
                   "participants": participants,
                   "builders": [
                       {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
                       {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
                        "args": {"config_folder": "config", "scheme": "grpc"}},
                       {"path": "nvflare.lighter.impl.cert.CertBuilder"},
                       {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}]}
        (self.root / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
        proc = subprocess.run([PY, "-m", "nvflare.cli", "provision", "-p", str(self.root / "project.yml"), "-w",
                               str(self.root / "ws")], cwd=self.root, env=env_for(self.root),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        server = self.prod / "server"
        res = json.loads((server / "local" / "resources.json.default").read_text())
        text = json.dumps(res).replace("/tmp/nvflare", str(self.root / "server-store"))
        (server / "local" / "resources.json").write_text(text)
        # the test's eye on the server side: records every result that arrives from a site
        (server / "local" / "custom").mkdir(exist_ok=True)
        shutil.copy(RECORDER, server / "local" / "custom" / "server_recorder.py")
        (server / "local" / "privacy.json").write_text(json.dumps({
            "scopes": [{"name": "portico", "task_result_filters": [
                {"path": "server_recorder.ResultRecorder",
                 "args": {"out_dir": str(self.root / "received")}}]}],
            "default_scope": "portico"}))

    def start_server(self) -> None:
        server = self.prod / "server"
        env = env_for(self.root)
        env["PYTHONPATH"] = str(server / "local" / "custom")
        log = (self.root / "server.log").open("ab")
        self.server_proc = subprocess.Popen(
            [PY, "-u", "-m", "nvflare.private.fed.app.server.server_train", "-m", str(server), "-s",
             "fed_server.json", "--set", "secure_train=true", "org=portico", "config_folder=config"],
            cwd=server, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(self.server_proc)
        wait_for(lambda: port_open(self.port), 60, 0.2, "the NVFlare server")

    def add_site(self, name: str, settings: dict[str, Any], *, serve: bool = False) -> Site:
        """A Portico site; with ``serve`` it runs as the whole appliance (``portico serve``: SCP, API and
        the FL supervisor), otherwise as ``portico fl run`` (the supervisor alone)."""
        root = self.root / name
        root.mkdir()
        config = root / "portico.yaml"
        data: dict[str, Any] = {"mode": "dev", "storage": {"data_dir": str(root / "data"), "fsync": False},
                                "inference": {"models_dir": str(root / "models")}, "fl": settings}
        api_port = None
        if serve:
            api_port = free_port()
            (root / "rules.yaml").write_text("rules: []\n")
            data["router"] = {"ae_title": "PORTICO", "bind_host": "127.0.0.1", "port": free_port(),
                              "rules_file": str(root / "rules.yaml")}
            data["api"] = {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": API_TOKEN}
        config.write_text(yaml.safe_dump(data))
        site = Site(name, root, config, self.prod / name, serve=serve, api_port=api_port)
        self.sites[name] = site
        return site

    def start_site(self, site: Site) -> None:
        log = (site.root / "portico-fl.log").open("ab")
        command = ["serve", "-c", str(site.config)] if site.serve else ["fl", "-c", str(site.config), "run"]
        site.proc = subprocess.Popen([PY, "-m", "appliance", *command], cwd=REPO,
                                     env=env_for(site.root), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started.append(site.proc)

    def stop_site(self, site: Site) -> None:
        if site.proc is not None and site.proc.poll() is None:
            self.track()
            site.proc.send_signal(signal.SIGTERM)
            site.proc.wait(timeout=60)
        site.proc = None

    def admin(self) -> Any:
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        os.environ.setdefault("HOME", str(self.root / "home"))
        return new_secure_session("admin@portico.test", str(self.admin_kit), timeout=30)

    def track(self) -> None:
        """Remember every process below ours, so teardown finds job processes in their own sessions."""
        for proc in self.started:
            if proc.poll() is None:
                st = Path(f"/proc/{proc.pid}/stat").read_text()
                self.known.setdefault(proc.pid, int(st[st.rfind(")") + 2:].split()[19]))
                self.known.update(descendants(proc.pid))

    def close(self) -> None:
        self.track()
        for site in self.sites.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop_site(site)
        if self.server_proc is not None and self.server_proc.poll() is None:
            self.server_proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server_proc.wait(timeout=20)
        kill_tree(self.known, 10)
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def job_folder(dest: Path, *, rounds: int = 2, min_responses: int = 2, steps: int = 15, timeout: int = 300,
               wait_after_min: int = 5, custom_client_code: bool = False, name: str | None = None,
               sites: list[str] | None = None) -> Path:
    """A copy of the shipped job definition with test-sized settings."""
    job = dest / (name or JOB_TEMPLATE.name)
    shutil.copytree(JOB_TEMPLATE, job)
    server_cfg = job / "app_server" / "config" / "config_fed_server.json"
    cfg = json.loads(server_cfg.read_text())
    cfg["workflows"][0]["args"].update(num_rounds=rounds, min_responses=min_responses, round_timeout=timeout,
                                       wait_time_after_min_received=wait_after_min)
    server_cfg.write_text(json.dumps(cfg, indent=2))
    client_cfg = job / "app_client" / "config" / "config_fed_client.json"
    cfg = json.loads(client_cfg.read_text())
    cfg["executors"][0]["executor"]["args"].update(steps=steps)
    client_cfg.write_text(json.dumps(cfg, indent=2))
    meta = json.loads((job / "meta.json").read_text())
    meta["name"] = name or meta["name"]
    meta["deploy_map"]["app_client"] = sites or ["site-a", "site-b"]
    meta["min_clients"] = len(meta["deploy_map"]["app_client"])
    (job / "meta.json").write_text(json.dumps(meta))
    if custom_client_code:
        (job / "app_client" / "custom").mkdir()
        (job / "app_client" / "custom" / "evil.py").write_text("import os\nos.system('touch /tmp/pwned')\n")
    return job
