"""STOW-RS receive benchmark: ``portico serve``'s ``POST /dicom-web/studies`` against Orthanc's DICOMweb plugin.

One run POSTs the same cached 300-slice 512x512 CT (about 158 MB, from ``benchmarks/ingest.py``'s
cache) as ``multipart/related; type="application/dicom"`` requests of ``--per-request`` instances
to each receiver on 127.0.0.1, ``--reps`` times (receivers interleaved), a fresh receiver process per
rep that first gets an untimed 50-slice study. Both fsync every instance before answering (Portico:
the appliance's real store; Orthanc: ``SyncStorageArea: true``). The client is the same for both
(``http.client`` with TCP_NODELAY, bodies built before the clock starts). Measured: instances/s,
MB/s, the receiver's CPU seconds (its process tree) and peak RSS. Results go to the ``stow`` section
of ``BENCHMARKS.md``.

    .venv/bin/python benchmarks/stow_ingest.py [--reps 3] [--per-request 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ingest import (  # noqa: E402
    CACHE,
    Sample,
    ensure_study,
    free_port,
    proc_cpu,
    proc_hwm_mb,
    stop_receiver,
    summary,
    wait_port,
)
from benchmarks.markdown import write_section  # noqa: E402

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

BOUNDARY = "portico-bench-boundary"
TOKEN = "bench-sender-t0ken"
RECEIVERS = ("portico", "orthanc")


def bodies(files: list[Path], per_request: int) -> list[bytes]:
    out = []
    for i in range(0, len(files), per_request):
        parts = []
        for path in files[i:i + per_request]:
            parts += [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
        parts.append(f"--{BOUNDARY}--\r\n".encode())
        out.append(b"".join(parts))
    return out


def post_all(port: int, path: str, headers: dict[str, str], payloads: list[bytes]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    t0 = time.perf_counter()
    for body in payloads:
        conn.request("POST", path, body=body, headers={**headers, "Content-Type": content_type,
                                                       "Accept": "application/dicom+json"})
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"STOW-RS answered {response.status}: {answer[:300]!r}")
    wall = time.perf_counter() - t0
    conn.close()
    return wall


def descendants_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (``portico serve`` runs in one process; kept general)."""
    total = proc_cpu(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                total += proc_cpu(int(entry.name))
    return total


# --- receivers --------------------------------------------------------------------------------------

Receiver = tuple[subprocess.Popen[bytes], int, str, dict[str, str], Callable[[], int]]


def start_portico(work: Path) -> Receiver:
    api_port = free_port()
    (work / "rules.yaml").write_text("rules: []\n")
    cfg = {"mode": "dev", "storage": {"data_dir": str(work / "var"), "fsync": True, "min_free_mb": 64},
           "router": {"port": free_port(), "rules_file": str(work / "rules.yaml"), "quiet_seconds": 3600,
                      "stow_senders": [{"name": "BENCH", "token": TOKEN, "hosts": ["127.0.0.1"]}]},
           "inference": {"models_dir": str(work / "models")},
           "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": "bench-admin-t0ken"}}
    (work / "portico.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "-c", str(work / "portico.yaml")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(work / "log").open("wb"))

    def count() -> int:
        from appliance.store import Store

        store = Store(work / "var", fsync=False)
        try:
            return store.instance_count()
        finally:
            store.close()
    return proc, api_port, "/dicom-web/studies", {"Authorization": f"Bearer {TOKEN}"}, count


def start_orthanc(work: Path) -> Receiver:
    http_port = free_port()
    cfg = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": free_port(), "HttpPort": http_port,
           "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
           "StorageCompression": False, "SyncStorageArea": True, "Plugins": [str(DICOMWEB_PLUGIN)],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False}
    (work / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(["Orthanc", str(work / "cfg.json")], env=dict(os.environ, TCP_NODELAY="1"),
                            stdout=subprocess.DEVNULL, stderr=(work / "log").open("wb"))

    def count() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        conn.request("GET", "/statistics")
        return int(json.loads(conn.getresponse().read())["CountInstances"])
    return proc, http_port, "/dicom-web/studies", {}, count


STARTERS: dict[str, Callable[[Path], Receiver]] = {"portico": start_portico, "orthanc": start_orthanc}


def measure(name: str, payloads: list[bytes], n: int, warmup: list[bytes], n_warm: int) -> Sample:
    work = Path(tempfile.mkdtemp(prefix=f"stow-{name}-", dir=CACHE))
    proc, port, path, headers, count = STARTERS[name](work)
    try:
        wait_port(port, proc, timeout=60)
        post_all(port, path, headers, warmup)
        subprocess.run(["sync"], check=True)
        cpu0 = descendants_cpu(proc.pid)
        wall = post_all(port, path, headers, payloads)
        cpu = descendants_cpu(proc.pid) - cpu0
        rss = proc_hwm_mb(proc.pid)
        received = count() - n_warm
    finally:
        stop_receiver(proc, work)
    return Sample(name, n, received, wall, cpu, rss, sum(len(p) for p in payloads))


def report(samples: dict[str, list[Sample]], reps: int, per_request: int) -> str:
    rate = {k: [s.instances / s.wall for s in v] for k, v in samples.items()}
    lines = [
        "## STOW-RS ingest: `portico serve` vs Orthanc's DICOMweb plugin",
        "",
        f"`python benchmarks/stow_ingest.py --reps {reps} --per-request {per_request}` "
        f"({dt.date.today().isoformat()}, {os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}): a 300-slice 512×512 CT (~158 MB) as {per_request}-instance "
        "`multipart/related` requests over loopback, one keep-alive connection, both receivers fsync every "
        "instance before answering. Median [min–max] of the reps.",
        "",
        "| receiver | instances/s | MB/s | receiver CPU s | peak RSS MB | stored |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in samples.items():
        mbps = [s.bytes_sent / 2**20 / s.wall for s in runs]
        lines.append(f"| {name} | {summary(rate[name])} | {summary(mbps)} | {summary([s.cpu for s in runs], '{:.2f}')} "
                     f"| {summary([s.rss_mb for s in runs], '{:.0f}')} | {min(s.received for s in runs)}/"
                     f"{runs[0].instances} |")
    if "portico" in rate and "orthanc" in rate:
        ratio = statistics.median(rate["portico"]) / statistics.median(rate["orthanc"])
        lines += ["", f"Portico receives STOW-RS at **{ratio:.2f}×** Orthanc's rate "
                  "(same client, same study, same run)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--per-request", type=int, default=50)
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    files = ensure_study()
    warm_files = ensure_study("ct50x512", (50, 512, 512), seed=8)
    payloads, warmup = bodies(files, args.per_request), bodies(warm_files, args.per_request)
    samples: dict[str, list[Sample]] = {name: [] for name in args.receivers.split(",")}
    for rep in range(args.reps):
        for name in samples:
            s = measure(name, payloads, len(files), warmup, len(warm_files))
            samples[name].append(s)
            print(f"rep {rep + 1} {name}: {s.instances / s.wall:.1f} inst/s, cpu {s.cpu:.2f} s, rss {s.rss_mb:.0f} MB, "
                  f"stored {s.received}/{s.instances}", flush=True)
    text = report(samples, args.reps, args.per_request)
    print(text)
    if not args.no_write:
        write_section("stow", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
