"""Return path: our C-STORE SCU against DCMTK ``storescu`` sending the same objects, side by side.

Objects: (a) the SEG + TID 1500 SR Portico makes for the 300-slice 512x512 phantom CT, (b) the whole
300-instance study. Receivers: DCMTK ``storescp`` and Orthanc (fsync on), both with ``TCP_NODELAY=1``,
a fresh receiver per rep, always on 127.0.0.1. Our sender is :func:`dicom_router.dispatch.send_files`
(TCP_NODELAY on its socket, large PDU, file bytes sent as they are), timed inside the process;
``storescu -R`` (it must propose only the files' SOP classes, or SEG has no context) is timed as a
process. Results go to the ``return`` section of ``BENCHMARKS.md``.

    .venv/bin/python benchmarks/return_path.py [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.ingest import (  # noqa: E402
    CACHE,
    count_orthanc,
    ensure_study,
    free_port,
    start_orthanc,
    start_storescp,
    stop_receiver,
    wait_port,
)
from benchmarks.markdown import write_section  # noqa: E402
from dicom_router.dispatch import send_files  # noqa: E402
from dicom_router.settings import DimseDestination  # noqa: E402

Starter = Callable[[Path, int], tuple[subprocess.Popen[bytes], str]]
Counter = Callable[[Path, int], int]


def count_received(work: Path, port: int) -> int:
    """Files storescp wrote (it names them by modality: CT., SEG., SRd. …)."""
    return sum(1 for p in (work / "in").rglob("*") if p.is_file())


RECEIVERS: dict[str, tuple[Starter, Counter]] = {
    "storescp": (start_storescp, count_received),
    "orthanc": (start_orthanc, count_orthanc),
}


def ensure_results(study: list[Path]) -> list[Path]:
    """SEG + SR for the cached study, made once by the real pipeline's writers from HU-rule labels."""
    folder = CACHE / "ct300x512-results"
    if (folder / "done").is_file():
        return sorted(folder.glob("*.dcm"))
    from inference.measurements import measure
    from inference.packages import load_package
    from inference.phantom import hu_reference_labels
    from inference.results.seg import build_seg
    from inference.results.sr import build_sr
    from inference.settings import InferenceSettings
    from inference.volume import load_series

    settings = InferenceSettings()
    manifest = load_package(REPO / "models" / "ct-body-composition").manifest
    volume = load_series(study)
    labels = hu_reference_labels(volume.hu, volume.spacing)
    seg = build_seg(volume, labels, manifest, settings.device, settings.uid_root, "bench")
    sr = build_sr(seg, volume, measure(labels, volume, manifest.output.segments), manifest, settings.device,
                  settings.uid_root, "bench")
    folder.mkdir(parents=True, exist_ok=True)
    seg.save_as(folder / "seg.dcm", enforce_file_format=True)
    sr.save_as(folder / "sr.dcm", enforce_file_format=True)
    (folder / "done").touch()
    return sorted(folder.glob("*.dcm"))


def send_portico(port: int, called: str, files: list[Path]) -> float:
    dest = DimseDestination(name="bench", ae_title=called, host="127.0.0.1", port=port)
    t0 = time.perf_counter()
    results = send_files(dest, files, "PORTICO")
    wall = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} file(s) failed: {failed[0].error}")
    return wall


def send_storescu(port: int, called: str, files: list[Path]) -> float:
    cmd = ["storescu", "-R", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr.decode()[-300:]}")
    return wall


SENDERS: dict[str, Callable[[int, str, list[Path]], float]] = {"portico": send_portico, "storescu": send_storescu}


def one(sender: str, receiver: str, files: list[Path]) -> float:
    start, count = RECEIVERS[receiver]
    work = Path(tempfile.mkdtemp(prefix=f"return-{sender}-{receiver}-", dir=CACHE))
    port = free_port()
    proc, called = start(work, port)
    try:
        wait_port(port, proc)
        wall = SENDERS[sender](port, called, files)
        if count(work, port) != len(files):
            raise RuntimeError(f"{receiver} holds {count(work, port)} of {len(files)}")
        return wall
    finally:
        stop_receiver(proc, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    study = ensure_study()
    objects = {"SEG + SR": ensure_results(study), "CT study (300 instances)": study}
    rows = ["| objects | receiver | sender | inst/s | MB/s | wall s | ours / storescu |",
            "|---|---|---|---|---|---|---|"]
    for label, files in objects.items():
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        for receiver in RECEIVERS:
            walls = {s: [one(s, receiver, files) for _ in range(args.reps)] for s in SENDERS}
            med = {s: statistics.median(w) for s, w in walls.items()}
            for s in SENDERS:
                ratio = f"**{med['storescu'] / med['portico']:.2f}×**" if s == "portico" else ""
                rows.append(f"| {label} ({size_mb:.1f} MB) | {receiver} | {s} | {len(files) / med[s]:.1f} | "
                            f"{size_mb / med[s]:.1f} | {med[s]:.3f} [{min(walls[s]):.3f}–{max(walls[s]):.3f}] | "
                            f"{ratio} |")
    body = "\n".join([
        "## Return path: our C-STORE SCU vs DCMTK storescu (`benchmarks/return_path.py`)",
        "",
        f"{dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"{args.reps} reps, median [min–max]; receivers with `TCP_NODELAY=1` (Orthanc with fsync), a fresh "
        "receiver per rep, 127.0.0.1. Ours: `dicom_router.dispatch.send_files` timed in-process; storescu "
        "(`-R`, `TCP_NODELAY=1`) timed as a process, start-up included. Ratio: storescu's time / ours "
        "(above 1 means we are faster).",
        "",
        *rows,
    ])
    sys.stdout.write(body + "\n")
    if not args.no_write:
        write_section("return", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
