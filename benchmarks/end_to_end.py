"""End to end: a phantom CT study from Orthanc through Portico and back, time per stage.

Orthanc (the PACS) sends the study to ``portico serve`` by C-STORE; Portico hands it off on the
PACS's C-FIND count, runs the demo model and sends SEG + SR back. Stages: receive (Orthanc's send,
all instances acknowledged), completeness (last instance → hand-off), load, inference, encode,
dispatch (job done → both objects stored in Orthanc), and the total from the last instance to the
results being in Orthanc as seen through Orthanc's REST API. Memory of the ``portico serve`` process
(from /proc): idle (VmRSS once it is up, before the study), peak (VmHWM: ingest and job together) and
after (VmRSS 3 s after the results are in Orthanc, the job's memory released). With ``--studies N``
one ``portico serve`` gets N studies in turn (timings from the first), and the memory after each.

    .venv/bin/python benchmarks/end_to_end.py [--slices 300] [--reps 1] [--studies 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.demo import Demo  # noqa: E402
from benchmarks.markdown import write_section  # noqa: E402

STAGES = ("receive", "completeness", "load", "inference", "encode", "dispatch")
MEMORY = ("idle_mb", "peak_mb", "after_mb")


def status_mb(pid: int | None, field: str) -> float:
    """A VmRSS/VmHWM figure of process ``pid`` in MB (0 when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def one_run(slices: int, studies: int = 1) -> dict[str, float]:
    memory: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="portico-e2e-") as tmp:
        demo = Demo(Path(tmp), slices=slices)
        try:
            demo.start()
            assert demo.portico is not None
            pid = demo.portico.pid
            time.sleep(3.0)  # settled after start-up
            memory["idle_mb"] = status_mb(pid, "VmRSS")
            report = demo.run_study()
            time.sleep(3.0)
            memory["after_mb"] = status_mb(pid, "VmRSS")
            for n in range(2, studies + 1):
                demo.run_study()
                time.sleep(3.0)
                memory[f"after_{n}_mb"] = status_mb(pid, "VmRSS")
            memory["peak_mb"] = status_mb(pid, "VmHWM")
        finally:
            demo.stop()
    if not report["seg_and_sr_in_pacs"]:
        raise RuntimeError("SEG and SR did not arrive")
    stages = dict(report["jobs"][0]["stage_seconds"])
    stages["receive"] = report["seconds"]["orthanc_send"]
    stages["total"] = report["seconds"]["last_instance_to_results_in_pacs"]
    stages["provider"] = report["jobs"][0]["provider"]
    stages.update(memory)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--studies", type=int, default=1, help="studies in turn per portico serve")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    runs = [one_run(args.slices, args.studies) for _ in range(args.reps)]
    med = {k: statistics.median(float(r[k]) for r in runs)
           for k in (*STAGES, "total", *MEMORY) if all(k in r for r in runs)}
    overhead = med["total"] - med.get("inference", 0.0)
    lines = [
        "## End to end: last instance → SEG + SR stored in Orthanc",
        "",
        f"{dt.date.today()}, {platform.node()}, {args.slices}-slice 512×512 phantom CT, {args.reps} run(s), "
        f"execution provider {runs[0]['provider']}; `benchmarks/end_to_end.py --slices {args.slices}"
        + (f" --studies {args.studies}" if args.studies > 1 else "") + "`.",
        "",
        "| stage | seconds (median) |",
        "|---|---|",
        *(f"| {k} | {med[k]:.2f} |" for k in (*STAGES, "total") if k in med),
        "",
        "`receive` is Orthanc sending the whole study (before the last instance); `total` runs from the "
        "last instance acknowledged to both objects visible in Orthanc's REST API.",
        f"Everything but the model's run takes {overhead:.2f} s of {med['total']:.2f} s "
        f"({100 * overhead / med['total']:.0f} %).",
        "",
        f"Memory of `portico serve` (median): idle {med['idle_mb']:.0f} MB, **peak {med['peak_mb']:.0f} MB** "
        f"(VmHWM, ingest and job), **after the job {med['after_mb']:.0f} MB** "
        f"({med['after_mb'] - med['idle_mb']:+.0f} MB on idle)"
        + "".join(f"; after study {n} {statistics.median(r[f'after_{n}_mb'] for r in runs):.0f} MB"
                  for n in range(2, args.studies + 1)) + ".",
    ]
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        write_section("e2e", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
