"""FL: time per round through Portico's FL path against plain NVFlare, and an idle client's memory.

One provisioned NVFlare server on localhost and two sites with the same data (phantom studies, and
the real CT at one site when present). First the Portico path: ``portico fl run`` supervising the
NVFlare client under the site policy (approval gate, allow-list, privacy filters and the outgoing
ledger), the cohort read from the store (DICOM + SEG), ``PorticoFedAvg``. Then plain NVFlare: the
same kits started with NVFlare's own defaults, stock ``FedAvg`` and a Client API script (in the
job, BYOC) training the same network on the same slices (exported once from the cohort), with the
same steps. Per-round time is the mean gap between "Round N started" lines of the job in the server's log.
Idle memory: resident set of the enrolled, connected client (NVFlare's process, and Portico's
supervisor process) with no job.

    .venv/bin/python benchmarks/fl_round.py [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.markdown import run_context, write_section  # noqa: E402
from fl_client.architectures import find_package  # noqa: E402
from fl_client.dataset import load_slices, read_index  # noqa: E402
from fl_client.settings import FLSettings  # noqa: E402
from tests.integration.fl.harness import (  # noqa: E402
    PY,
    REAL_CT,
    Federation,
    Site,
    env_for,
    job_folder,
    make_base_package,
    phantom_studies,
    real_ct_study,
)
from tests.support.net import free_port  # noqa: E402
from tests.support.polling import wait_for  # noqa: E402

#: NVFlare runs as the benchmark's user, not as ``fl.run_as`` (no such OS user on a dev machine)
RUN_AS_SELF: dict[str, None] = {"run_as": None} if "run_as" in FLSettings.model_fields else {}

BASELINE_CLIENT = '''
import argparse, sys
from pathlib import Path
import numpy as np, torch
import nvflare.client as flare
from fl_client.architectures import build_network
from fl_client.dataset import Slices
from fl_client.trainer import dice_score, train_steps

p = argparse.ArgumentParser()
p.add_argument("--data-dir"); p.add_argument("--steps", type=int); p.add_argument("--lr", type=float)
a = p.parse_args()
torch.set_num_threads(1)
flare.init()
site = flare.get_site_name()
d = np.load(Path(a.data_dir) / f"{site}.npz")
train, val = Slices(d["train_image"], d["train_labels"]), Slices(d["val_image"], d["val_labels"])
net = build_network("ct-body-composition")
rng = np.random.default_rng(0)
while flare.is_running():
    m = flare.receive()
    net.load_state_dict({k: torch.as_tensor(v) for k, v in m.params.items()})
    dice = dice_score(net, val, torch.device("cpu"))
    if not flare.is_train():
        flare.send(flare.FLModel(metrics={"dice": dice})); continue
    train_steps(net, train, steps=a.steps, lr=a.lr, batch_size=8, device=torch.device("cpu"), rng=rng)
    flare.send(flare.FLModel(params={k: v.detach().cpu() for k, v in net.state_dict().items()},
                             metrics={"dice": dice}, meta={"NUM_STEPS_CURRENT_ROUND": a.steps}))
'''


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def round_seconds(log: Path, job_id: str) -> list[float]:
    """Gaps between "Round N started" lines of one job in the server's log.

    Stock FedAvg centres the message on lines of its own, after the line carrying the job id.
    """
    stamps: list[float] = []
    ts, owned = 0.0, False
    for line in log.read_text(errors="replace").splitlines():
        if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line):
            ts = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            owned = job_id in line
        if owned and re.search(r"Round \d+ started", line):
            stamps.append(ts)
    return [b - a for a, b in itertools.pairwise(stamps)]


def _pending(site: Site, job_id: str) -> bool:
    return any(p["job_id"] == job_id for p in site.status()["pending_approval"])


def _connected(site: Site) -> bool:
    return bool(site.status()["state"] == "connected")


def run_job(fed: Federation, job: Path, approve: bool) -> tuple[str, list[float]]:
    session = fed.admin()
    try:
        job_id = session.submit_job(str(job))
        if approve:
            for site in fed.sites.values():
                wait_for(functools.partial(_pending, site, job_id), 60, 0.5, "the approval request")
                site.portico("fl", "approve", job_id, "--job", str(job))
        wait_for(lambda: str(session.get_job_meta(job_id).get("status", "")).startswith("FINISHED"), 900, 1.0,
                 "the job")
        status = str(session.get_job_meta(job_id)["status"])
    finally:
        session.close()
    return status, round_seconds(fed.root / "server.log", job_id)


def baseline_job(dest: Path, rounds: int, steps: int, data_dir: Path, sites: list[str]) -> Path:
    job = dest / "nvflare-fedavg"
    (job / "app" / "config").mkdir(parents=True)
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "baseline_client.py").write_text(BASELINE_CLIENT)
    # the same global-model network as the Portico job (its persistor names this module)
    shutil.copy(REPO / "fl_jobs" / "ct-body-composition-fedavg" / "app_server" / "custom" / "portico_model.py",
                job / "app" / "custom" / "portico_model.py")
    portico = json.loads((REPO / "fl_jobs" / "ct-body-composition-fedavg" / "app_server" / "config" /
                          "config_fed_server.json").read_text())
    persistor = next(c for c in portico["components"] if c["id"] == "persistor")
    (job / "app" / "config" / "config_fed_server.json").write_text(json.dumps({
        "format_version": 2,
        "workflows": [{"id": "controller", "path": "nvflare.app_common.workflows.fedavg.FedAvg",
                       "args": {"num_clients": len(sites), "num_rounds": rounds}}],
        "components": [persistor]}))
    (job / "app" / "config" / "config_fed_client.json").write_text(json.dumps({
        "format_version": 2,
        "executors": [{"tasks": ["*"], "executor": {
            "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
            "args": {"execution_mode": "in_process", "task_script_path": "baseline_client.py",
                     "task_script_args": f"--data-dir {data_dir} --steps {steps} --lr 0.003",
                     "params_exchange_format": "pytorch"}}}]}))
    (job / "meta.json").write_text(json.dumps({"name": "nvflare-fedavg", "resource_spec": {},
                                               "min_clients": len(sites), "deploy_map": {"app": ["@ALL"]}}))
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="portico-fl-bench-") as tmp:
        root = Path(tmp)
        fed = Federation(root, free_port())
        names = ["site-a", "site-b"]
        try:
            fed.provision(names)
            fed.start_server()
            for name, seeds in zip(names, ([11, 12, 13, 14], [21, 22, 23]), strict=True):
                # the privacy floor on (clip 1, noise 1), sized for these small cohorts and 5 rounds; NVFlare
                # as this benchmark's own user (a root appliance would run it as fl.run_as)
                site = fed.add_site(name, {"enabled": True, **RUN_AS_SELF, "privacy": {
                    "min_series": 1, "min_patients": 1, "min_examples_per_round": 16, "epsilon": 100.0}})
                package = make_base_package(site.models_dir)
                from appliance.store import Store

                store = Store(site.data_dir, fsync=False)
                phantom_studies(store, site.root / "work", package, seeds)
                if name == "site-b" and REAL_CT.is_dir():
                    real_ct_study(store, site.root / "work", package)
                store.close()
                site.portico("fl", "enrol", str(site.kit), "--i-checked-the-server-fingerprint-otherwise")
                site.portico("fl", "cohort", "refresh")
                # the same slices for the plain-NVFlare run
                _, manifest = find_package(site.models_dir, "ct-body-composition")
                index = read_index(site.data_dir / "fl" / "portico" / "cohorts" / "default.json")
                tr = load_slices(index.split("train"), manifest, 64, 8.0)
                va = load_slices(index.split("val"), manifest, 64, 8.0)
                (root / "baseline").mkdir(exist_ok=True)
                np.savez(root / "baseline" / f"{name}.npz", train_image=tr.image, train_labels=tr.labels,
                         val_image=va.image, val_labels=va.labels)
                fed.start_site(site)
            for site in fed.sites.values():
                wait_for(functools.partial(_connected, site), 120, 1.0, "connected")
            time.sleep(10)
            idle = {}
            for site in fed.sites.values():
                pid = site.status()["process"]["pid"]
                assert site.proc is not None
                idle[site.name] = (rss_mb(pid), rss_mb(site.proc.pid))
            job = job_folder(root / "jobs", rounds=args.rounds, min_responses=2, steps=args.steps)
            portico_status, portico_rounds = run_job(fed, job, approve=True)
            for site in fed.sites.values():
                fed.stop_site(site)
            # plain NVFlare clients from the same kits, NVFlare's default local policy
            plain = []
            for name in names:
                kit = root / "plain" / name
                shutil.copytree(fed.prod / name, kit)
                log = (kit / "client.log").open("ab")
                proc = subprocess.Popen(
                    [PY, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", str(kit), "-s",
                     "fed_client.json", "--set", "secure_train=true", f"uid={name}", "org=hospital",
                     "config_folder=config"], cwd=kit, env=env_for(root), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
                fed.started.append(proc)
                plain.append(proc)
            time.sleep(8)
            fed.sites.clear()
            base = baseline_job(root / "jobs", args.rounds, args.steps, root / "baseline", names)
            base_status, base_rounds = run_job(fed, base, approve=False)
        finally:
            fed.close()
    load = run_context(load_before)["load"]
    portico_mean = float(np.mean(portico_rounds))
    base_mean = float(np.mean(base_rounds))
    ratio = portico_mean / base_mean
    # after the first round (job start, cohort loading, first-iteration warm-up)
    steady = float(np.mean(portico_rounds[1:])) / float(np.mean(base_rounds[1:]))
    portico_list = ", ".join(f"{r:.2f}" for r in portico_rounds)
    base_list = ", ".join(f"{r:.2f}" for r in base_rounds)
    body = f"""## Federated learning: time per round, Portico's FL path vs plain NVFlare

`benchmarks/fl_round.py --rounds {args.rounds} --steps {args.steps}` on {platform.machine()},
{platform.python_version()}, CPU only, {dt.date.today().isoformat()}, load average {load}. One NVFlare 2.9
server and two sites on localhost, the same data (site-a: 4 phantom studies; site-b: 3 phantoms + the real CT),
the same network (ct-body-composition: HU-threshold channels + BasicUNet 2D) and {args.steps} steps
of batch 8 at 64x64 per site and round. Portico: supervised client, site policy (approval gate, allow-list, privacy
filters, outgoing ledger), the site privacy floor on (`PrivacyFloor`: clip 1, noise multiplier 1, budget
epsilon 100 for these 5 rounds, BatchNorm statistics kept local, weight differences sent), cohort read
from the store's DICOM + SEG, `PorticoFedAvg` (k-of-n).
Plain: the same kits with NVFlare's default policy, stock `FedAvg`, a Client API script on the
same slices. Per round: mean gap between round starts in the server's job log.

| Path | Job status | Rounds | Mean s/round | Per round (s) |
|---|---|---|---|---|
| Portico FL path | {portico_status} | {args.rounds} | {portico_mean:.2f} | {portico_list} |
| Plain NVFlare | {base_status} | {args.rounds} | {base_mean:.2f} | {base_list} |

Overhead: **{ratio:.2f}x** plain NVFlare per round over all rounds, **{steady:.2f}x** after the first
(target <= 1.2x). The first gap includes the job's start at the sites and, for Portico, reading the
cohort from DICOM and SEG.

Idle enrolled client, connected, no job (resident memory):

| Site | NVFlare client process | Portico supervisor process (`portico fl run`) |
|---|---|---|
""" + "\n".join(f"| {n} | {a:.0f} MB | {b:.0f} MB |" for n, (a, b) in idle.items()) + """

In `portico serve` the supervisor is a thread of the service, so only the NVFlare client's memory
is added to the appliance.
"""
    write_section("fl", body)
    sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
