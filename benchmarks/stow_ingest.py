"""STOW-RS receive benchmark: ``portico serve``'s ``POST /dicom-web/studies`` against Orthanc's DICOMweb plugin.

One run POSTs the same cached 300-slice 512x512 CT (about 158 MB, from ``benchmarks/ingest.py``'s
cache) as ``multipart/related; type="application/dicom"`` requests of ``--per-request`` instances
to each receiver on 127.0.0.1, ``--reps`` times (receivers interleaved), a fresh receiver process per
rep that first gets an untimed 50-slice study. Both fsync every instance before answering (Portico:
the appliance's real store; Orthanc: ``SyncStorageArea: true``). The client is the same for both
(``http.client`` with TCP_NODELAY, bodies built before the clock starts). Measured: instances/s,
MB/s, the receiver's CPU seconds (its process tree) and peak RSS. Results go to the ``stow`` section
of ``BENCHMARKS.md``.

Then one ``--big-mb`` request (default 1024 MB) per receiver and shape, made in code as it is sent
(nothing of it on disk but what the receiver stores, removed with the receiver's folder): ``slices``,
512x512 16-bit CT slices (0.5 MB each), and ``multiframe``, 256 MB multi-frame parts. It shows what
streaming buys: the receiver's RSS before the request and its peak (VmHWM) over it, and the rate.

    .venv/bin/python benchmarks/stow_ingest.py [--reps 3] [--per-request 50] [--big-mb 1024] [--big-only]
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
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


# --- a big request, made as it is sent ---------------------------------------------------------------

#: SOP Instance UIDs of the synthetic parts: this prefix and a counter, all of one length
UID_PREFIX = "1.2.826.0.1.3680043.9.7777.{run}."
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
BIG_SHAPES = {"slices": (1, 512, 512), "multiframe": (512, 512, 512)}


class Synthetic:
    """One Part 10 template (frames x rows x cols, 16-bit) sent again and again, each time with its own UIDs.

    The SOP Instance UID (in the meta and the data set) is patched in a copy of the template's first
    few KB; the pixel data is the template's own bytes, never copied.
    """

    def __init__(self, shape: tuple[int, int, int], run: int) -> None:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

        frames, rows, cols = shape
        self.prefix = UID_PREFIX.format(run=run)
        placeholder = self.uid(0)
        ds = Dataset()
        ds.SOPClassUID = UID(CTImageStorage if frames == 1 else SC_MULTIFRAME_WORD)
        ds.SOPInstanceUID = placeholder
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^STOW", "BENCH0001", "CT" if frames == 1 else "OT"
        ds.Rows, ds.Columns = rows, cols
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.tile((np.arange(rows * cols) % 4093).astype(np.int16), frames).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = UID(placeholder)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        self.template = out.getbuffer()
        head = bytes(self.template[:8192])
        self.offsets = [head.find(placeholder.encode())]
        self.offsets.append(head.find(placeholder.encode(), self.offsets[0] + 1))
        assert -1 not in self.offsets, "the placeholder UID is not in the template's first 8 KB"
        self.head_end = max(self.offsets) + len(placeholder)

    def uid(self, i: int) -> str:
        return f"{self.prefix}{10**7 + i}"  # 8 digits, no leading zero (PS3.5 9.1)

    @property
    def size(self) -> int:
        return len(self.template)

    def part(self, i: int) -> Iterator[bytes | memoryview]:
        head = bytearray(self.template[:self.head_end])
        uid = self.uid(i).encode()
        for offset in self.offsets:
            head[offset:offset + len(uid)] = uid
        yield bytes(head)
        yield self.template[self.head_end:]


def big_request(shape: tuple[int, int, int], total_mb: int, run: int) -> tuple[int, int, Iterator[bytes | memoryview]]:
    """(instances, Content-Length, body chunks) of a ``total_mb`` request of ``shape`` instances."""
    synthetic = Synthetic(shape, run)
    count = max(1, round(total_mb * 2**20 / synthetic.size))
    opening = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    closing = f"--{BOUNDARY}--\r\n".encode()

    def chunks() -> Iterator[bytes | memoryview]:
        for i in range(count):
            yield opening
            yield from synthetic.part(i)
            yield b"\r\n"
        yield closing
    return count, count * (len(opening) + synthetic.size + 2) + len(closing), chunks()


def post_stream(port: int, path: str, headers: dict[str, str], length: int,
                chunks: Iterator[bytes | memoryview]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    t0 = time.perf_counter()
    conn.request("POST", path, body=chunks, headers={**headers, "Content-Type": content_type,
                                                     "Content-Length": str(length),
                                                     "Accept": "application/dicom+json"})
    response = conn.getresponse()
    answer = response.read()
    wall = time.perf_counter() - t0
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"STOW-RS answered {response.status}: {answer[:300]!r}")
    return wall


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class BigSample:
    shape: str
    sample: Sample
    rss_before_mb: float


def measure_big(name: str, shape: str, total_mb: int, run: int) -> BigSample:
    work = Path(tempfile.mkdtemp(prefix=f"stow-big-{name}-", dir=CACHE))
    proc, port, path, headers, count = STARTERS[name](work)
    try:
        wait_port(port, proc, timeout=60)
        n_warm, length, warm = big_request(BIG_SHAPES["slices"], 10, run * 10 + 1)  # a warm service
        post_stream(port, path, headers, length, warm)
        subprocess.run(["sync"], check=True)
        n, length, chunks = big_request(BIG_SHAPES[shape], total_mb, run * 10 + 2)
        rss0 = proc_rss_mb(proc.pid)
        cpu0 = descendants_cpu(proc.pid)
        wall = post_stream(port, path, headers, length, chunks)
        cpu = descendants_cpu(proc.pid) - cpu0
        rss = proc_hwm_mb(proc.pid)
        received = count() - n_warm
    finally:
        stop_receiver(proc, work)  # the stored gigabyte goes with the receiver's folder
    return BigSample(shape, Sample(name, n, received, wall, cpu, rss, length), rss0)


def report_big(samples: list[BigSample], total_mb: int) -> str:
    lines = [
        f"One ~{total_mb} MB request per receiver and shape, made in code as it is sent (`--big-mb {total_mb}`): "
        "`slices` = 512×512 16-bit CT slices (0.5 MB each), `multiframe` = 256 MB multi-frame parts; a fresh "
        "receiver that first gets an untimed 10 MB request. RSS before = VmRSS just before the request; peak = "
        "VmHWM after it (the whole process life).",
        "",
        "| request | receiver | instances | MB/s | receiver CPU s | RSS before MB | peak RSS MB | stored |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in samples:
        s = b.sample
        lines.append(f"| {b.shape} ({s.bytes_sent / 2**20:.0f} MB) | {s.receiver} | {s.instances} | "
                     f"{s.bytes_sent / 2**20 / s.wall:.1f} | {s.cpu:.2f} | {b.rss_before_mb:.0f} | {s.rss_mb:.0f} | "
                     f"{s.received}/{s.instances} |")
    lines.append("")
    for shape in BIG_SHAPES:
        by = {b.sample.receiver: b.sample for b in samples if b.shape == shape}
        if "portico" in by and "orthanc" in by:
            p, o = by["portico"], by["orthanc"]
            lines.append(f"* {shape}: Portico at **{(p.bytes_sent / p.wall) / (o.bytes_sent / o.wall):.2f}×** "
                         f"Orthanc's rate; peak RSS {p.rss_mb:.0f} MB vs {o.rss_mb:.0f} MB "
                         f"(**{p.rss_mb / o.rss_mb:.2f}×**; target for Portico < 300 MB)")
    return "\n".join(lines)


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


def report(samples: dict[str, list[Sample]], reps: int, per_request: int, big_mb: int) -> str:
    rate = {k: [s.instances / s.wall for s in v] for k, v in samples.items()}
    lines = [
        "## STOW-RS ingest: `portico serve` vs Orthanc's DICOMweb plugin",
        "",
        f"`python benchmarks/stow_ingest.py --reps {reps} --per-request {per_request} --big-mb {big_mb}` "
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
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the big request; 0: none")
    parser.add_argument("--big-only", action="store_true", help="only the big request (not written)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    receivers = args.receivers.split(",")
    load0 = os.getloadavg()[0]
    sections = []
    if not args.big_only:
        files = ensure_study()
        warm_files = ensure_study("ct50x512", (50, 512, 512), seed=8)
        payloads, warmup = bodies(files, args.per_request), bodies(warm_files, args.per_request)
        samples: dict[str, list[Sample]] = {name: [] for name in receivers}
        for rep in range(args.reps):
            for name in samples:
                s = measure(name, payloads, len(files), warmup, len(warm_files))
                samples[name].append(s)
                print(f"rep {rep + 1} {name}: {s.instances / s.wall:.1f} inst/s, cpu {s.cpu:.2f} s, "
                      f"rss {s.rss_mb:.0f} MB, stored {s.received}/{s.instances}", flush=True)
        sections.append(report(samples, args.reps, args.per_request, args.big_mb))
    if args.big_mb:
        big: list[BigSample] = []
        for shape in BIG_SHAPES:
            for name in receivers:
                b = measure_big(name, shape, args.big_mb, run=len(big) + 1)
                big.append(b)
                print(f"big {shape} {name}: {b.sample.bytes_sent / 2**20 / b.sample.wall:.1f} MB/s, "
                      f"rss {b.rss_before_mb:.0f} -> peak {b.sample.rss_mb:.0f} MB, "
                      f"stored {b.sample.received}/{b.sample.instances}", flush=True)
        sections.append(report_big(big, args.big_mb))
    sections.append(f"1-min load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after (a shared machine: "
                    "other work widens the spread).")
    text = "\n\n".join(sections)
    print(text)
    if args.big_only:
        return 0
    if not args.no_write:
        write_section("stow", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
