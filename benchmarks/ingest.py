"""C-STORE receive benchmark: our StorageSCP against DCMTK storescp and Orthanc, side by side.

One run sends the same cached 300-slice 512x512 CT (about 158 MB) with ``storescu`` (env
``TCP_NODELAY=1``) to 127.0.0.1 into each receiver, ``--reps`` times each (receivers interleaved),
a fresh receiver process per rep that first gets an untimed 50-slice study (a long-running service
is warm; ``--cold`` skips it), and measures instances/s, MB/s, the receiver's CPU seconds
(utime+stime from /proc) and its peak RSS (VmHWM). Results go to the ``ingest`` section of
``BENCHMARKS.md``.

    .venv/bin/python benchmarks/ingest.py [--reps 3] [--receivers portico,portico-stock,...] [--cold]

Receivers (each one fsyncs every instance before answering, except storescp and ``*-nosync``):

* ``portico``: :class:`dicom_router.scp.StorageSCP` as configured by default (event-driven
  reactor, allocator tuned) in a subprocess, with a sink that writes each instance to a temp
  file, fsyncs it and renames it into place: one fsync per instance, as Orthanc's
  ``SyncStorageArea``;
* ``portico-untuned``: the same without :func:`dicom_router.scp.tune_allocator`;
* ``portico-stock``: pynetdicom's own polling reactor and allocator defaults (``event_driven=False``,
  ``tune_allocator=False``): what the same handler gets from plain pynetdicom;
* ``portico-store``: the same SCP with the appliance's real sink, ``appliance.store.Store`` (file
  fsync, directory fsync, SQLite WAL commit with ``synchronous=FULL``);
* ``portico-nosync`` / ``portico-stock-nosync``: ``portico`` and ``portico-stock`` with a sink that
  stops at the page cache, as storescp does: the protocol path alone;
* ``storescp``: DCMTK ``storescp -od DIR`` with env ``TCP_NODELAY=1`` (no fsync: DCMTK has none);
* ``orthanc``: ``Orthanc cfg.json`` with ``SyncStorageArea: true`` (fsync), env ``TCP_NODELAY=1``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.markdown import write_section  # noqa: E402
from dicom_router.ports import ReceivedInstance, StoreOutcome  # noqa: E402

SHAPE = (300, 512, 512)
RECEIVERS = ("portico", "portico-untuned", "portico-stock", "portico-store", "portico-nosync",
             "portico-stock-nosync", "storescp", "orthanc")
CACHE = Path(os.environ.get("PORTICO_BENCH_CACHE", Path(tempfile.gettempdir()) / "portico-bench"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- data ---------------------------------------------------------------------------------------

def ensure_study(name: str = "ct300x512", shape: tuple[int, int, int] = SHAPE, seed: int = 7) -> list[Path]:
    """A cached synthetic CT series; made once (about 20 s for 300 slices) and reused by later runs."""
    folder = CACHE / name
    done = CACHE / f"{name}.complete"
    if done.is_file():
        return sorted(folder.glob("CT*.dcm"))
    from appliance.demo_study import write_ct_series
    from inference.phantom import make_phantom

    shutil.rmtree(folder, ignore_errors=True)
    phantom = make_phantom(shape, spacing=(1.0, 0.7, 0.7), seed=seed)
    written = write_ct_series(phantom.hu, phantom.spacing, folder, seed=seed,
                              series_description=f"Benchmark phantom {name}")
    done.write_text(f"{len(written.paths)}\n")
    return written.paths


# --- our SCP as a subprocess ----------------------------------------------------------------------

class FsyncSink:
    """Durable like the appliance store: temp file, fsync, rename; duplicates by SOP Instance UID.

    With ``fsync=False`` it only reaches the page cache, like storescp: the protocol path's speed.
    """

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.seen: set[str] = set()

    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        if instance.sop_instance_uid in self.seen:
            return StoreOutcome.DUPLICATE
        path = self.root / f"{instance.sop_instance_uid}.dcm"
        tmp = self.root / f".{instance.sop_instance_uid}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, instance.data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.seen.add(instance.sop_instance_uid)
        return StoreOutcome.STORED

    def quarantine(self, data: bytes, reason: str, calling_ae_title: str, peer_address: str) -> str:
        (self.root / "quarantine.bin").write_bytes(data)
        return "q"


def serve(port: int, out: Path, sink_kind: str, stock: bool, untuned: bool, tls: Path | None = None) -> int:
    """Run our StorageSCP until SIGTERM (the benchmark's receiver subprocess).

    With ``tls`` (a folder from ``tests/support/certs.py``'s ``make_pki``) ``port`` is a DICOM TLS
    listener (mutual TLS, no plain listener) and the peer must come over TLS.
    """
    from dicom_router.ports import InstanceSink
    from dicom_router.scp import StorageSCP
    from dicom_router.settings import DicomTlsSettings, Peer, RouterSettings, TlsMode

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sink: InstanceSink
    if sink_kind == "store":
        from appliance.store import Store

        sink = Store(out / "data", fsync=True)
    else:
        sink = FsyncSink(out, fsync=sink_kind == "fsync")
    tls_settings = None if tls is None else DicomTlsSettings(
        certificate=str(tls / "server.pem"), private_key=str(tls / "server.key"), ca_bundle=str(tls / "ca.pem"),
        port=port, plain=False)
    peer = Peer(ae_title="STORESCU", tls=TlsMode.OFF if tls is None else TlsMode.REQUIRED)
    settings = RouterSettings(ae_title="PORTICO", port=port, peers=(peer,), tls=tls_settings,
                              tune_allocator=not (stock or untuned))
    scp = StorageSCP(settings, sink, event_driven=False if stock else None)
    scp.start()
    if tls is not None and scp.tls_address != ("127.0.0.1", port):
        raise RuntimeError(f"TLS listener at {scp.tls_address}, expected port {port}")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    scp.stop()
    return 0


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Sample:
    receiver: str
    instances: int
    received: int
    wall: float
    cpu: float
    rss_mb: float
    bytes_sent: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime are fields 14-17 (1-based) of the whole line
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(port: int, called: str, files: list[Path], options: Sequence[str] = ()) -> float:
    """Wall seconds for ``storescu`` (``options``: e.g. its TLS options) to send ``files`` in one association."""
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = ["storescu", "-aet", "STORESCU", "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return wall


def measure(name: str, files: list[Path], start: Callable[[Path, int], tuple[subprocess.Popen[bytes], str]],
            count: Callable[[Path, int], int], warmup: list[Path], options: Sequence[str] = ()) -> Sample:
    """One rep: a fresh receiver from ``start``, the untimed ``warmup``, the timed ``files`` (storescu ``options``)."""
    work = Path(tempfile.mkdtemp(prefix=f"ingest-{name}-", dir=CACHE))
    port = free_port()
    proc, called = start(work, port)
    try:
        wait_port(port, proc)
        if warmup:
            # a long-running receiver has its memory and caches warm: send another study first
            send(port, called, warmup, options)
        subprocess.run(["sync"], check=True)
        cpu0 = proc_cpu(proc.pid)
        wall = send(port, called, files, options)
        cpu = proc_cpu(proc.pid) - cpu0
        rss = proc_hwm_mb(proc.pid)
        received = count(work, port) - len(warmup)
    finally:
        stop_receiver(proc, work)
    return Sample(name, len(files), received, wall, cpu, rss, sum(p.stat().st_size for p in files))


def stop_receiver(proc: subprocess.Popen[bytes], work: Path) -> None:
    """SIGTERM the receiver (SIGKILL after 20 s) and remove its folder."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(work, ignore_errors=True)


def start_portico(sink_kind: str, stock: bool = False, untuned: bool = False, tls: Path | None = None
                  ) -> Callable[[Path, int], tuple[subprocess.Popen[bytes], str]]:
    def start(work: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
        out = work / "in"
        out.mkdir()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), str(out),
               "--sink", sink_kind, *(["--stock"] if stock else []), *(["--untuned"] if untuned else []),
               *(["--tls", str(tls)] if tls is not None else [])]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(work / "log").open("wb")), "PORTICO"
    return start


def start_storescp(work: Path, port: int, options: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """DCMTK storescp into ``work/in``; ``options``: more of its options (e.g. ``+tls``)."""
    out = work / "in"
    out.mkdir()
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = ["storescp", "-aet", "STORESCP", *options, "-od", str(out), str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), "STORESCP"


def orthanc_http_port(work: Path) -> int:
    return int(json.loads((work / "cfg.json").read_text())["HttpPort"])


def start_orthanc(work: Path, port: int, config: Mapping[str, object] | None = None
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """Orthanc with ``SyncStorageArea``; ``config``: more configuration options (e.g. DICOM TLS)."""
    cfg: dict[str, object] = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": free_port(),
        "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "StorageCompression": False, "SyncStorageArea": True, "Plugins": [], "SaveJobs": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomServerEnabled": True, **(config or {}),
    }
    (work / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(["Orthanc", str(work / "cfg.json")], env=env, stdout=subprocess.DEVNULL,
                            stderr=(work / "log").open("wb"))
    return proc, "ORTHANC"


def count_files(work: Path, port: int) -> int:
    """Instances stored: storescp names files ``CT.<uid>``, our sinks ``<uid>.dcm`` (in sub-folders)."""
    return sum(1 for p in (work / "in").rglob("*") if p.is_file() and not p.name.startswith(".")
               and (p.name.endswith(".dcm") or p.name.startswith("CT.")) and "quarantine" not in p.parts)


def count_orthanc(work: Path, port: int) -> int:
    url = f"http://127.0.0.1:{orthanc_http_port(work)}/statistics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(json.load(response)["CountInstances"])


# --- report ------------------------------------------------------------------------------------

def summary(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def fsync_probe(folder: Path, size: int = 525_926, count: int = 40) -> float:
    """Median milliseconds to write and fsync one new file of ``size`` bytes: the disk's floor."""
    data = os.urandom(size)
    probe = Path(tempfile.mkdtemp(prefix="fsync-", dir=folder))
    times = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            fd = os.open(probe / f"{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return statistics.median(times) * 1000


def report(samples: dict[str, list[Sample]], reps: int, context: str = "") -> str:
    labels = {
        "portico": "Portico StorageSCP, as shipped (sink: fsync per instance)",
        "portico-untuned": "Portico StorageSCP, event-driven, glibc allocator defaults (fsync per instance)",
        "portico-stock": "Portico StorageSCP, pynetdicom's polling reactor and allocator defaults (fsync)",
        "portico-store": "Portico StorageSCP as shipped + appliance Store (file + dir fsync, SQLite WAL index)",
        "portico-nosync": "Portico StorageSCP as shipped, sink without fsync (page cache, like storescp)",
        "portico-stock-nosync": "Portico StorageSCP, pynetdicom's reactor and allocator, sink without fsync",
        "storescp": "DCMTK storescp -od (TCP_NODELAY=1, no fsync)",
        "orthanc": "Orthanc (TCP_NODELAY=1, SyncStorageArea=true)",
    }
    first = next(iter(samples.values()))[0]
    lines = [
        "## C-STORE ingest (`benchmarks/ingest.py`)",
        "",
        f"{first.instances} × CT 512×512 uncompressed ({first.bytes_sent / 1e6:.1f} MB), one association "
        "from DCMTK `storescu` (env `TCP_NODELAY=1`) on 127.0.0.1; a fresh receiver process per rep; "
        f"median [min–max] of {reps} reps. Receiver CPU = utime+stime from /proc over the send; "
        "peak RSS = VmHWM.",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
        f"run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. {context}",
        "",
        "| receiver | inst/s | MB/s | wall s | receiver CPU s | peak RSS MB | all stored |",
        "|---|---|---|---|---|---|---|",
    ]
    medians: dict[str, float] = {}
    for name, runs in samples.items():
        rates = [s.instances / s.wall for s in runs]
        medians[name] = statistics.median(rates)
        lines.append(
            f"| {labels.get(name, name)} | {summary(rates)} | "
            f"{summary([s.bytes_sent / 1e6 / s.wall for s in runs])} | "
            f"{summary([s.wall for s in runs], '{:.2f}')} | {summary([s.cpu for s in runs], '{:.2f}')} | "
            f"{summary([s.rss_mb for s in runs], '{:.0f}')} | "
            f"{'yes' if all(s.received == s.instances for s in runs) else 'NO'} |"
        )
    lines.append("")
    for ours in ("portico", "portico-untuned", "portico-stock", "portico-store", "portico-nosync"):
        for other in ("orthanc", "storescp"):
            if ours in medians and other in medians:
                lines.append(f"* {ours} / {other}: **{medians[ours] / medians[other]:.2f}×** (median inst/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--sink", choices=("fsync", "nosync", "store"), default="fsync", help=argparse.SUPPRESS)
    parser.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--untuned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md")
    parser.add_argument("--cold", action="store_true", help="no warm-up study before the timed one")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tls", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(int(args.serve[0]), Path(args.serve[1]), args.sink, args.stock, args.untuned, args.tls)

    CACHE.mkdir(parents=True, exist_ok=True)
    files = ensure_study()
    warmup = [] if args.cold else ensure_study("ct50x512", (50, 512, 512), seed=8)
    load_before = os.getloadavg()[0]
    fsync_ms = fsync_probe(CACHE)
    print(f"fsync of one 0.5 MB file: {fsync_ms:.2f} ms (median); load average {load_before:.2f}", flush=True)
    starters = {
        "portico": (start_portico("fsync"), count_files),
        "portico-stock": (start_portico("fsync", stock=True), count_files),
        "portico-store": (start_portico("store"), count_files),
        "portico-untuned": (start_portico("fsync", untuned=True), count_files),
        "portico-nosync": (start_portico("nosync"), count_files),
        "portico-stock-nosync": (start_portico("nosync", stock=True), count_files),
        "storescp": (start_storescp, count_files),
        "orthanc": (start_orthanc, count_orthanc),
    }
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            start, count = starters[name]
            sample = measure(name, files, start, count, warmup)
            samples[name].append(sample)
            print(f"rep {rep + 1} {name:9s} {sample.instances / sample.wall:7.1f} inst/s "
                  f"wall {sample.wall:.2f}s cpu {sample.cpu:.2f}s rss {sample.rss_mb:.0f}MB "
                  f"stored {sample.received}/{sample.instances}", flush=True)
    context = (f"Write+fsync of one new 0.5 MB file on this disk: {fsync_ms:.2f} ms median (a floor for every "
               f"fsyncing receiver); 1-min load average {load_before:.2f} before, "
               f"{os.getloadavg()[0]:.2f} after (other work on the machine inflates the spread); "
               f"niceness {os.nice(0)}.")
    context += (" Cold receivers: the timed study is the first they get." if args.cold else
                f" Warm receivers: each first gets an untimed {len(warmup)}-slice study (other UIDs).")
    text = report(samples, args.reps, context)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('ingest', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
