"""Store operations per second on SQLite and PostgreSQL: recording an instance, and claiming a job.

    .venv/bin/python -m benchmarks.store_ops [--instances 2000] [--jobs 300] [--threads 4] [--markdown]

Each backend gets a fresh database: SQLite (WAL, ``synchronous=NORMAL``, the appliance's default) in a temporary
data folder; PostgreSQL 15 started here in a temporary folder with its default durability (``fsync=on``,
``synchronous_commit=on``). Instances are recorded from ``--threads`` threads at once (as several associations
would); the files are written without fsync so the figure is the index's. Each record is one write transaction:
the instance row, the study's count and its audit row (the audit hash chain serialises every write). Jobs are
claimed one transaction each, with their lease. The target is the ingest rate the index must sustain across
receivers: 1,000 instances/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.store import Run, Store
from benchmarks.markdown import run_context, write_section
from dicom_router.ports import ReceivedInstance
from tests.support.postgres import PostgresServer, postgres_missing

TARGET = 1000.0


def _instance(n: int, study: int) -> ReceivedInstance:
    return ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{study}.1.{n}", f"1.2.3.{study}", f"1.2.3.{study}.1",
                            "1.2.840.10008.1.2.1", "BENCH", "127.0.0.1", b"DICM" + b"\0" * 512)


def measure(store: Store, instances: int, jobs: int, threads: int) -> dict[str, float]:
    per = instances // threads

    def record(t: int) -> None:
        for n in range(per):
            store.store(_instance(n, t))

    workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    record_rate = per * threads / (time.perf_counter() - t0)
    run = Run("1.2.3.999", 1, "bench", 1, 0.0, 0.0)
    store.record_routes(run, [(f"r{n}", "m", None, f"1.2.3.999.{n}", "k") for n in range(jobs)])
    t0 = time.perf_counter()
    claimed = 0
    while store.claim_job() is not None:
        claimed += 1
    claim_rate = claimed / (time.perf_counter() - t0)
    return {"record_instance_per_s": round(record_rate, 1), "claim_job_per_s": round(claim_rate, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--markdown", action="store_true", help="write BENCHMARKS.md's store-ops section")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    server = None if postgres_missing() else PostgresServer(fast=False).start()
    try:
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                store = Store(Path(tmp) / "sqlite", fsync=False)
                results["sqlite"].append(measure(store, args.instances, args.jobs, args.threads))
                store.close()
                if server is not None:
                    store = Store(Path(tmp) / "pg", fsync=False, database=server.new_database())
                    results["postgresql"].append(measure(store, args.instances, args.jobs, args.threads))
                    store.close()
    finally:
        if server is not None:
            server.stop()
    medians = {backend: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for backend, runs in results.items() if runs}
    print(json.dumps(medians, indent=2))
    if args.markdown:
        ctx = run_context(load)
        rows = "\n".join(f"| {b} | {m['record_instance_per_s']:.0f} | {m['record_instance_per_s'] / TARGET:.2f}× | "
                         f"{m['claim_job_per_s']:.0f} |" for b, m in medians.items())
        write_section("store-ops", f"""## Store operations per second (SQLite vs PostgreSQL)

{ctx['date']}, {ctx['machine']}, load {ctx['load']}. `python -m benchmarks.store_ops --reps {args.reps}`
({args.instances} instances from {args.threads} threads, {args.jobs} job claims; median of {args.reps}). PostgreSQL 15
with its default durability, on this machine's loopback. Target: 1,000 instances/s across receivers.

| backend | record an instance /s | vs target | claim a job /s |
|---|---|---|---|
{rows}

Every write transaction is serialised (SQLite: one writer; PostgreSQL: one advisory lock), because each one appends
to the audit hash chain, whose head is one row: the rate is one commit at a time on either engine.""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
