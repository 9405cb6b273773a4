"""Several senders at once into Portico's receive role (one process, or several on one port) and into Orthanc.

    .venv/bin/python -m benchmarks.many_senders [--senders 4] [--slices 300] [--receivers 1,2] [--reps 3]
                                                [--markdown]

Each sender is a DCMTK ``storescu`` (``TCP_NODELAY=1``) with its own synthetic CT study (``--slices`` of
512x512, cached), all started together; the figure is instances/s over the wall time from the first start to
the last exit, the receivers' summed CPU seconds per instance, and their peak RSS. Portico runs as
``portico receive`` with the appliance's real store (fsync per instance, SQLite index), N processes sharing one
port with ``router.reuse_port`` (the kernel spreads the associations), completeness timers long enough not to
run during the measurement; Orthanc 1.10 with ``SyncStorageArea`` (fsync). Fresh receivers each rep, Portico and
Orthanc interleaved, each receiver warmed by one small study first. ``--postgres`` adds the same receivers over a
PostgreSQL 15 started here (default durability).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.db.engine import open_database
from appliance.demo import REPO, portico_config
from benchmarks.ingest import (
    CACHE,
    count_orthanc,
    ensure_study,
    proc_cpu,
    proc_hwm_mb,
    start_orthanc,
    wait_port,
)
from benchmarks.markdown import run_context, write_section
from tests.support.net import free_port
from tests.support.postgres import PostgresServer


@dataclass(frozen=True)
class Sample:
    receiver: str
    instances: int
    wall: float
    cpu: float
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.instances / self.wall


def _send_all(port: int, called: str, studies: list[list[Path]]) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
                                 *map(str, files)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for files in studies]
    for sender in senders:
        _, err = sender.communicate(timeout=1800)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-400:]}")
    return time.perf_counter() - t0


def _portico(work: Path, port: int, processes: int, database: str) -> list[subprocess.Popen[bytes]]:
    config = portico_config(work, port=port, orthanc_dicom_port=free_port(), models_dir=REPO / "models",
                            rules_file=REPO / "config" / "rules.yaml", quiet_seconds=3600.0, extra={
                                "storage": {"min_free_mb": 0, "fsync": True, "database": database},
                                "router": {"reuse_port": True, "peers": [{"ae_title": "STORESCU",
                                                                          "hosts": ["127.0.0.1"]}]},
                                "api": {"enabled": False}})
    env = dict(os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1")
    procs = []
    for n in range(processes):
        log = (work / f"receive-{n}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "receive", "-c", str(config)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        wait_port(port, procs[-1], timeout=60)
    return procs


def _count_portico(work: Path, database: str) -> int:
    db = open_database(database, work / "var")
    try:
        return int(db.query("SELECT COUNT(*) FROM instances")[0][0])
    finally:
        db.close()


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait for each (SIGKILL after 30 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_once(receiver: str, studies: list[list[Path]], warmup: list[Path],
             postgres: PostgresServer | None) -> Sample:
    work = Path(tempfile.mkdtemp(prefix=f"senders-{receiver}-", dir=CACHE))
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    database = "sqlite"
    try:
        if receiver == "orthanc":
            proc, called = start_orthanc(work, port)
            procs.append(proc)
            wait_port(port, proc)
        else:
            called = "PORTICO"
            database = postgres.new_database() if postgres is not None and receiver.endswith("-pg") else "sqlite"
            procs.extend(_portico(work, port, int(receiver.split("x")[1].removesuffix("-pg")), database))
        _send_all(port, called, [warmup])
        before = _count_portico(work, database) if receiver != "orthanc" else count_orthanc(work, port)
        subprocess.run(["sync"], check=True)
        cpu0 = sum(proc_cpu(p.pid) for p in procs)
        wall = _send_all(port, called, studies)
        cpu = sum(proc_cpu(p.pid) for p in procs) - cpu0
        rss = max(proc_hwm_mb(p.pid) for p in procs)
        after = _count_portico(work, database) if receiver != "orthanc" else count_orthanc(work, port)
        return Sample(receiver, after - before, wall, cpu, rss)
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--receivers", default="1,2", help="Portico receive processes to try, e.g. 1,2,4")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--postgres", action="store_true", help="also each receiver count over PostgreSQL (started here)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    studies = [ensure_study(f"ct{args.slices}x512-s{n}", (args.slices, 512, 512), seed=40 + n)
               for n in range(args.senders)]
    warmup = ensure_study("ct20x512-warm", (20, 512, 512), seed=39)
    counts = args.receivers.split(",")
    names = ["orthanc", *(f"portico-x{n}" for n in counts),
             *(f"portico-x{n}-pg" for n in counts if args.postgres)]
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    postgres = PostgresServer(fast=False).start() if args.postgres else None
    try:
        for _ in range(args.reps):
            for name in names:
                samples[name].append(run_once(name, studies, warmup, postgres))
                print(name, samples[name][-1], flush=True)
    finally:
        if postgres is not None:
            postgres.stop()
    total = args.senders * args.slices
    medians = {n: {"inst_per_s": statistics.median(s.rate for s in runs),
                   "cpu_ms_per_instance": statistics.median(1000 * s.cpu / max(s.instances, 1) for s in runs),
                   "rss_mb": max(s.rss_mb for s in runs),
                   "complete": all(s.instances == total for s in runs)} for n, runs in samples.items()}
    print(json.dumps(medians, indent=2))
    if args.markdown:
        ctx = run_context(load)
        orthanc = medians["orthanc"]["inst_per_s"]
        rows = "\n".join(
            f"| {n} | {m['inst_per_s']:.0f} | {m['inst_per_s'] / orthanc:.2f}× | "
            f"{m['cpu_ms_per_instance']:.1f} | {m['rss_mb']:.0f} | {'yes' if m['complete'] else 'NO'} |"
            for n, m in medians.items())
        write_section("many-senders", f"""## Many senders at once: Portico's receive role (1..N processes) vs Orthanc

{ctx['date']}, {ctx['machine']}, load {ctx['load']}.
`python -m benchmarks.many_senders --senders {args.senders} --slices {args.slices} --receivers {args.receivers}
--reps {args.reps}`: {args.senders} storescu senders at once, one {args.slices}-slice 512x512 CT study each; fsync per
instance on both; median of {args.reps}; CPU summed over the receiver processes.

| receiver | inst/s | vs Orthanc | CPU ms/instance | peak RSS MB (largest process) | all stored |
|---|---|---|---|---|---|
{rows}""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
