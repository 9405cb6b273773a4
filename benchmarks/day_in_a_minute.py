"""A day in a minute: many studies from several senders at once, through the whole appliance into Orthanc.

    .venv/bin/python -m benchmarks.day_in_a_minute [--studies 40] [--min-slices 50] [--max-slices 300]
                                                   [--senders 4] [--size 256] [--setups sqlite,postgresql]
                                                   [--markdown]

``--studies`` synthetic CT studies (slice counts drawn between the bounds, ``--size``² pixels, cached) are split
over ``--senders`` senders; each sender sends its studies over two associations at once (two ``storescu``). The
demo model runs on every study; results go to a real Orthanc (the PACS). Per study: from its last instance sent
to its SEG and SR in Orthanc (median, p95); studies per minute over the whole run; peak RSS summed over Portico's
processes. Setups: ``sqlite`` = one ``portico serve``; ``postgresql`` = PostgreSQL 15 (started here) with one
``portico receive``, two ``portico work`` and one ``portico dispatch``. Completeness is the quiet timer (3 s):
the senders are not a PACS that can be asked for its count.

The scaling model (written with the figures): ingest costs CPU per instance received (``cpu_ms_per_instance``
of ``benchmarks.many_senders``), inference costs model time per study per worker; with W workers the steady
state is about W / (model seconds per study) studies per second until the receive side's CPU per instance
saturates the cores left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.demo import REPO, portico_config
from appliance.pacs_standin import OrthancStandIn
from benchmarks.ingest import CACHE, ensure_study, proc_hwm_mb, wait_port
from benchmarks.many_senders import stop_processes
from benchmarks.markdown import run_context, write_section
from tests.support.net import free_port
from tests.support.postgres import PostgresServer

QUIET_SECONDS = 3.0


@dataclass
class Study:
    paths: list[Path]
    uid: str
    sent_at: float = 0.0
    done_at: float | None = None


def _studies(count: int, low: int, high: int, size: int) -> list[Study]:
    import pydicom

    rng = random.Random(2026)
    out = []
    for n in range(count):
        slices = rng.randint(low, high)
        paths = ensure_study(f"day-{n}-{slices}x{size}", (slices, size, size), seed=1000 + n)
        out.append(Study(paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)))
    return out


def _orthanc_has_results(url: str, study_uid: str) -> bool:
    body = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode()
    request = urllib.request.Request(f"{url}/tools/find", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        modalities = {s["MainDicomTags"].get("Modality") for s in json.load(response)}
    return {"SEG", "SR"} <= modalities


def _start(role: str, config: Path, work: Path, n: int) -> subprocess.Popen[bytes]:
    log = (work / f"{role}-{n}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "appliance", role, "-c", str(config)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1"))


def run_setup(setup: str, studies: list[Study], senders: int, postgres: PostgresServer | None) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix=f"day-{setup}-", dir=CACHE))
    port = free_port()
    orthanc = OrthancStandIn(work / "orthanc", free_port(), free_port(),
                             modalities={"portico": ("PORTICO", "127.0.0.1", port)})
    orthanc.start()
    database = postgres.new_database() if setup == "postgresql" and postgres is not None else "sqlite"
    config = portico_config(work / "portico", port=port, orthanc_dicom_port=orthanc.dicom_port,
                            models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml",
                            quiet_seconds=QUIET_SECONDS, extra={
                                "storage": {"min_free_mb": 0, "database": database},
                                "router": {"peers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}]},
                                "api": {"enabled": False}})
    roles = [("serve", 1)] if setup == "sqlite" else [("receive", 1), ("work", 2), ("dispatch", 1)]
    procs = [_start(role, config, work, n) for role, count in roles for n in range(count)]
    try:
        wait_port(port, procs[0], timeout=60)
        fresh = [Study(s.paths, s.uid) for s in studies]
        t0 = time.perf_counter()
        groups = [fresh[i::senders] for i in range(senders)]
        running: list[tuple[subprocess.Popen[bytes], Study | None]] = []
        env = dict(os.environ, TCP_NODELAY="1")
        queue = [(study, half) for group in zip(*groups, strict=False) for study in group for half in (0, 1)]
        left = {id(s): 2 for s in fresh}
        pending = list(queue)
        while pending or running:
            while pending and len(running) < 2 * senders:  # each sender: two associations at once
                study, half = pending.pop(0)
                proc = subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "PORTICO", "127.0.0.1", str(port),
                                         *map(str, study.paths[half::2])], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                running.append((proc, study))
            for proc, study in list(running):
                if proc.poll() is not None:
                    running.remove((proc, study))
                    assert study is not None
                    left[id(study)] -= 1
                    if left[id(study)] == 0:
                        study.sent_at = time.perf_counter()
            time.sleep(0.05)  # a sender pool, not a synchronisation
        deadline = time.perf_counter() + 3600
        while any(s.done_at is None for s in fresh) and time.perf_counter() < deadline:
            for s in fresh:
                if s.done_at is None and _orthanc_has_results(orthanc.url, s.uid):
                    s.done_at = time.perf_counter()
            time.sleep(0.25)  # polling the PACS for results
        done = [s for s in fresh if s.done_at is not None]
        latencies = sorted((s.done_at or 0) - s.sent_at for s in done)
        rss = sum(proc_hwm_mb(p.pid) for p in procs if p.poll() is None)
        span = max(s.done_at or 0 for s in done) - t0 if done else float("nan")
        return {"studies": len(fresh), "completed": len(done), "median_s": statistics.median(latencies),
                "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)], "studies_per_min": 60 * len(done) / span,
                "peak_rss_mb": rss, "instances": sum(len(s.paths) for s in fresh)}
    finally:
        stop_processes(procs)
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--min-slices", type=int, default=50)
    p.add_argument("--max-slices", type=int, default=300)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--setups", default="sqlite,postgresql")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    studies = _studies(args.studies, args.min_slices, args.max_slices, args.size)
    setups = args.setups.split(",")
    postgres = PostgresServer(fast=False).start() if "postgresql" in setups else None
    try:
        results = {setup: run_setup(setup, studies, args.senders, postgres) for setup in setups}
    finally:
        if postgres is not None:
            postgres.stop()
    print(json.dumps(results, indent=2))
    if args.markdown:
        ctx = run_context(load)
        names = {"sqlite": "SQLite, one `portico serve`",
                 "postgresql": "PostgreSQL, 1 receive + 2 work + 1 dispatch"}
        rows = "\n".join(f"| {names[s]} | {r['completed']}/{r['studies']} | {r['median_s']:.1f} | {r['p95_s']:.1f} | "
                         f"{r['studies_per_min']:.1f} | {r['peak_rss_mb']:.0f} |" for s, r in results.items())
        title = f"A day in a minute: {args.studies} studies from {args.senders} senders at once"
        write_section("day-in-a-minute", f"""## {title}

{ctx['date']}, {ctx['machine']}, load {ctx['load']}. `python -m benchmarks.day_in_a_minute --studies {args.studies}
--min-slices {args.min_slices} --max-slices {args.max_slices} --senders {args.senders} --size {args.size}`
({sum(len(s.paths) for s in studies)} instances of {args.size}x{args.size}; each sender two associations at once;
demo model on CPU; results into a real Orthanc; completeness by a {QUIET_SECONDS:.0f} s quiet timer).

| setup | completed | last instance → SEG+SR in PACS, median s | p95 s | studies/min | peak RSS MB (all processes) |
|---|---|---|---|---|---|
{rows}""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
