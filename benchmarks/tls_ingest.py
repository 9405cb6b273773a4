"""C-STORE ingest over DICOM TLS against plain: what TLS costs Portico, DCMTK storescp and Orthanc.

One run sends the same cached 300-slice 512x512 CT (``benchmarks/ingest.py``'s cache) with
``storescu`` (env ``TCP_NODELAY=1``) to 127.0.0.1 into each receiver, plain and over mutual TLS
(``+tls client.key client.pem +cf ca.pem``; certificates from ``tests/support/certs.py``, EC P-256),
``--reps`` times each, receivers and modes interleaved (the mode order alternates per rep), a
fresh receiver process per sample that first gets an untimed 50-slice study the same way. It
measures instances/s, MB/s and the receiver's CPU seconds (as ``benchmarks/ingest.py`` does),
then the TLS/plain throughput ratio per receiver and the ratio of ratios (Portico's TLS/plain ÷
the other's: 1.0 or more means TLS costs Portico no more than it costs the other). Finally each
receiver holds one idle association (pynetdicom SCU) for ``--idle`` seconds while its CPU time is
read: an idle TLS association must not spin a core. Results go to the ``tls_ingest`` section of
``BENCHMARKS.md``.

    .venv/bin/python benchmarks/tls_ingest.py [--reps 3] [--receivers portico,storescp,orthanc]

Receivers (the plain ones are ``benchmarks/ingest.py``'s):

* ``portico``: :class:`dicom_router.scp.StorageSCP` as shipped with the fsync-per-instance sink; over
  TLS its only listener is the DICOM TLS one (``router.tls``, client certificate required, peer
  ``tls: required``);
* ``storescp``: ``storescp [+tls server.key server.pem +cf ca.pem] -od DIR`` (no fsync);
* ``orthanc``: Orthanc with ``SyncStorageArea``; over TLS ``DicomTlsEnabled`` with
  ``DicomTlsRemoteCertificateRequired`` (a TLS-enabled Orthanc refuses plain associations).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ingest import (  # noqa: E402
    CACHE,
    Sample,
    count_files,
    count_orthanc,
    ensure_study,
    free_port,
    measure,
    proc_cpu,
    start_orthanc,
    start_portico,
    start_storescp,
    stop_receiver,
    summary,
    wait_port,
)
from benchmarks.markdown import run_context, write_section  # noqa: E402
from tests.support.certs import Pki, make_pki  # noqa: E402

RECEIVERS = ("portico", "storescp", "orthanc")
MODES = ("plain", "tls")
LABELS = {
    "portico": "Portico StorageSCP as shipped (fsync per instance)",
    "storescp": "DCMTK storescp -od (no fsync)",
    "orthanc": "Orthanc (SyncStorageArea=true)",
}
Starter = Callable[[Path, int], tuple[subprocess.Popen[bytes], str]]
Counter = Callable[[Path, int], int]


def client_options(pki: Pki) -> tuple[str, ...]:
    """storescu/echoscu options for mutual TLS with the benchmark's client certificate."""
    client = pki.client("storescu")
    return ("+tls", str(client.key), str(client.cert), "+cf", str(pki.ca.cert))


def receivers(pki: Pki) -> dict[tuple[str, str], tuple[Starter, Counter]]:
    """(receiver, mode) -> how to start one and how to count what it stored."""
    server = ("+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca.cert))
    orthanc_tls = {
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.cert),
        "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca.cert),
        "DicomTlsRemoteCertificateRequired": True,
    }
    return {
        ("portico", "plain"): (start_portico("fsync"), count_files),
        ("portico", "tls"): (start_portico("fsync", tls=pki.folder), count_files),
        ("storescp", "plain"): (start_storescp, count_files),
        ("storescp", "tls"): (functools.partial(start_storescp, options=server), count_files),
        ("orthanc", "plain"): (start_orthanc, count_orthanc),
        ("orthanc", "tls"): (functools.partial(start_orthanc, config=orthanc_tls), count_orthanc),
    }


def negotiated(start: Starter, options: Sequence[str]) -> str:
    """Protocol and cipher suite DCMTK's TLS layer (storescu's) gets from a receiver (``echoscu -d``)."""
    work = Path(tempfile.mkdtemp(prefix="tls-echo-", dir=CACHE))
    port = free_port()
    proc, called = start(work, port)
    try:
        wait_port(port, proc)
        done = subprocess.run(["echoscu", "-d", "-aet", "STORESCU", "-aec", called, *options, "127.0.0.1",
                               str(port)], capture_output=True, text=True, check=False)
    finally:
        stop_receiver(proc, work)
    found = dict(re.findall(r"(Protocol|Ciphersuite)\s*:\s*([^\s,]+)", done.stdout + done.stderr))
    return f"{found.get('Protocol', '?')} {found.get('Ciphersuite', '?')}"


def idle_cpu(start: Starter, pki: Pki | None, seconds: float) -> float:
    """Receiver CPU seconds while one association (TLS when ``pki``) sits idle for ``seconds``."""
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_router.settings import DicomTlsSettings
    from dicom_router.tls import client_context

    work = Path(tempfile.mkdtemp(prefix="tls-idle-", dir=CACHE))
    port = free_port()
    proc, called = start(work, port)
    try:
        wait_port(port, proc)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        tls_args = None
        if pki is not None:
            client = pki.client("storescu")
            settings = DicomTlsSettings(certificate=str(client.cert), private_key=str(client.key),
                                        ca_bundle=str(pki.ca.cert))
            tls_args = (client_context(settings), "localhost")
        assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
        if not assoc.is_established:
            raise RuntimeError(f"idle association to {called} not established")
        time.sleep(1.0)  # the handshake and association set-up are not idle time
        cpu0 = proc_cpu(proc.pid)
        time.sleep(seconds)
        cpu = proc_cpu(proc.pid) - cpu0
        assoc.release()
        ae.shutdown()
    finally:
        stop_receiver(proc, work)
    return cpu


def report(samples: dict[tuple[str, str], list[Sample]], idle: dict[tuple[str, str], float],
           ciphers: dict[str, str], reps: int, idle_s: float, context: dict[str, str]) -> str:
    first = next(iter(samples.values()))[0]
    names = list(dict.fromkeys(name for name, _ in samples))
    lines = [
        "## C-STORE ingest over DICOM TLS vs plain (`benchmarks/tls_ingest.py`)",
        "",
        f"{first.instances} × CT 512×512 uncompressed ({first.bytes_sent / 1e6:.1f} MB), one association from "
        "DCMTK `storescu` (env `TCP_NODELAY=1`) on 127.0.0.1, plain or mutual TLS (`+tls client.key client.pem "
        "+cf ca.pem`, EC P-256 certificates, client certificate required by every receiver); a fresh, warm "
        f"receiver process per sample, receivers and modes interleaved; median [min–max] of {reps} reps. "
        "Receiver CPU = utime+stime from /proc over the send.",
        f"Run {context['date']} on {context['machine']}; 1-min load average {context['load']} "
        "(a shared machine: other work inflates the spread). "
        f"`.venv/bin/python benchmarks/tls_ingest.py --reps {reps} --receivers {','.join(names)}`",
        "",
        "| receiver | mode | inst/s | MB/s | wall s | receiver CPU s | all stored |",
        "|---|---|---|---|---|---|---|",
    ]
    rate: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    for (name, mode), runs in samples.items():
        rates = [s.instances / s.wall for s in runs]
        rate[name, mode] = statistics.median(rates)
        cpu[name, mode] = statistics.median(s.cpu for s in runs)
        shown = f"TLS ({ciphers[name]})" if mode == "tls" and name in ciphers else mode
        lines.append(
            f"| {LABELS.get(name, name)} | {shown} | {summary(rates)} | "
            f"{summary([s.bytes_sent / 1e6 / s.wall for s in runs])} | {summary([s.wall for s in runs], '{:.2f}')} | "
            f"{summary([s.cpu for s in runs], '{:.2f}')} | "
            f"{'yes' if all(s.received == s.instances for s in runs) else 'NO'} |")
    lines += ["", "| receiver | TLS/plain throughput | paired per rep | TLS cost, ms per instance | "
              f"TLS/plain receiver CPU | CPU s, idle association {idle_s:.0f} s: plain / TLS |",
              "|---|---|---|---|---|---|"]
    ratio: dict[str, float] = {}
    for name in names:
        if (name, "plain") not in rate or (name, "tls") not in rate:
            continue
        ratio[name] = rate[name, "tls"] / rate[name, "plain"]
        paired = [p.wall / t.wall for p, t in zip(samples[name, "plain"], samples[name, "tls"], strict=True)]
        idle_text = " / ".join(f"{idle[name, m]:.2f}" if (name, m) in idle else "–" for m in MODES)
        extra_ms = 1000 * (1 / rate[name, "tls"] - 1 / rate[name, "plain"])  # median wall added per instance
        lines.append(f"| {name} | **{ratio[name]:.2f}** | {summary(paired, '{:.2f}')} | {extra_ms:.2f} | "
                     f"{cpu[name, 'tls'] / cpu[name, 'plain']:.2f} | {idle_text} |")
    lines.append("")
    for other in ("orthanc", "storescp"):
        if "portico" in ratio and other in ratio:
            value = ratio["portico"] / ratio[other]
            verdict = "≥ 1.0: met" if value >= 1.0 else "< 1.0: not met, TLS costs Portico relatively more"
            lines.append(f"* ratio of ratios, portico vs {other} (Portico's TLS/plain ÷ {other}'s): "
                         f"**{value:.2f}** ({verdict})")
    lines.append("* TLS cost per instance = 1000 × (1 / TLS inst/s − 1 / plain inst/s), medians: the same added "
                 "cost lowers the TLS/plain ratio more for a receiver whose plain path is faster.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle-association check")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md")
    args = parser.parse_args(argv)

    CACHE.mkdir(parents=True, exist_ok=True)
    files = ensure_study()
    warmup = ensure_study("ct50x512", (50, 512, 512), seed=8)
    pki = make_pki(Path(tempfile.mkdtemp(prefix="tls-pki-", dir=CACHE)), clients=("storescu",))
    options = {"plain": (), "tls": client_options(pki)}
    starters = receivers(pki)
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    load_before = os.getloadavg()[0]
    try:
        ciphers = {name: negotiated(starters[name, "tls"][0], options["tls"]) for name in names}
        print(f"negotiated by storescu's TLS layer: {ciphers}", flush=True)
        samples, idle = run(names, starters, options, files, warmup, args.reps, args.idle, pki)
    finally:
        shutil.rmtree(pki.folder, ignore_errors=True)
    text = report(samples, idle, ciphers, args.reps, args.idle, run_context(load_before))
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('tls_ingest', text)}")
    return 0


def run(names: list[str], starters: dict[tuple[str, str], tuple[Starter, Counter]],
        options: dict[str, tuple[str, ...]], files: list[Path], warmup: list[Path], reps: int, idle_s: float,
        pki: Pki) -> tuple[dict[tuple[str, str], list[Sample]], dict[tuple[str, str], float]]:
    """The timed sends (interleaved), then the idle-association check of every receiver and mode."""
    samples: dict[tuple[str, str], list[Sample]] = {(n, m): [] for n in names for m in MODES}
    for rep in range(reps):
        for name in names:
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                start, count = starters[name, mode]
                sample = measure(f"{name}-{mode}", files, start, count, warmup, options[mode])
                samples[name, mode].append(sample)
                print(f"rep {rep + 1} {name:9s} {mode:5s} {sample.instances / sample.wall:7.1f} inst/s "
                      f"wall {sample.wall:.2f}s cpu {sample.cpu:.2f}s stored {sample.received}/{sample.instances}",
                      flush=True)
    idle = {(n, m): idle_cpu(starters[n, m][0], pki if m == "tls" else None, idle_s)
            for n in names for m in MODES}
    print(f"receiver CPU s over {idle_s:.0f} s of an idle association: {idle}", flush=True)
    return samples, idle


if __name__ == "__main__":
    sys.exit(main())
