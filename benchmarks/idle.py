"""A server at rest: CPU and memory of an idle ``portico serve`` (API on) beside an idle Orthanc, and stop time.

    .venv/bin/python -m benchmarks.idle [--seconds 30] [--markdown]

Both are started on free loopback ports (Orthanc 1.10 as Debian ships it; Portico with the demo's settings and
its API), sent one small study each way so neither is idle from birth only, then left alone for ``--seconds``:
CPU is the process's own user + system time over that window (``/proc/PID/stat``), as % of one core; RSS at the
end. Then ``portico serve`` gets SIGTERM and the time to exit is taken. Goals (issue #14): idle CPU ≤ Orthanc's,
stop under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.demo import REPO, PorticoProcess, portico_config
from appliance.demo_study import write_ct_series
from appliance.pacs_standin import OrthancStandIn
from benchmarks.markdown import run_context, write_section
from inference.phantom import make_phantom
from tests.support.net import free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--markdown", action="store_true", help="write BENCHMARKS.md's idle section")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        portico_port, api_port = free_port(), free_port()
        orthanc = OrthancStandIn(work / "orthanc", free_port(), free_port(),
                                 modalities={"portico": ("PORTICO", "127.0.0.1", portico_port)})
        orthanc.start()
        config = portico_config(work / "portico", port=portico_port, orthanc_dicom_port=orthanc.dicom_port,
                                models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml",
                                quiet_seconds=2.0, extra={"api": {"enabled": True, "port": api_port}})
        portico = PorticoProcess(config, portico_port, work / "serve.log")
        portico.start()
        try:
            phantom = make_phantom((8, 128, 128), (2.5, 2.0, 2.0), seed=5)
            study = write_ct_series(phantom.hu, phantom.spacing, work / "study")
            subprocess.run(["storescu", "-aet", "ORTHANC", "-aec", "PORTICO", "127.0.0.1", str(portico_port),
                            *map(str, study.paths)], check=True, env={**os.environ, "TCP_NODELAY": "1"},
                           capture_output=True, timeout=120)
            time.sleep(15.0)  # let the study go through and everything settle: then idle is idle
            pids = {"portico": portico.pid, "orthanc": orthanc.pid}
            before = {name: cpu_seconds(pid) for name, pid in pids.items() if pid}
            t0 = time.monotonic()
            time.sleep(args.seconds)  # the measurement window itself
            window = time.monotonic() - t0
            result = {name: {"cpu_percent": round(100 * (cpu_seconds(pid) - before[name]) / window, 2),
                             "rss_mb": round(rss_mb(pid), 1)} for name, pid in pids.items() if pid}
            assert portico.pid is not None
            t0 = time.monotonic()
            os.killpg(portico.pid, signal.SIGTERM)
            portico.wait(timeout=60)
            result["portico"]["stop_seconds"] = round(time.monotonic() - t0, 2)
        finally:
            portico.stop()
            orthanc.stop()
    print(json.dumps(result, indent=2))
    if args.markdown:
        ctx = run_context(load)
        pc, oc = result["portico"], result["orthanc"]
        cpu_ratio = pc["cpu_percent"] / max(oc["cpu_percent"], 0.01)
        rss_ratio = pc["rss_mb"] / max(oc["rss_mb"], 0.01)
        write_section("idle", f"""## Idle server: CPU, memory and stop time

{ctx['date']}, {ctx['machine']}, load {ctx['load']}. `python -m benchmarks.idle --seconds {args.seconds:.0f}`
(after one 8-slice study each way; CPU over the window as % of one core; the same run for both).

| | Portico (`serve`, API on) | Orthanc 1.10 | ratio |
|---|---|---|---|
| idle CPU, % of a core | {pc['cpu_percent']} | {oc['cpu_percent']} | {cpu_ratio:.2f}× |
| RSS, MB | {pc['rss_mb']} | {oc['rss_mb']} | {rss_ratio:.2f}× |
| stop after serving a study (SIGTERM → exit), s | {pc['stop_seconds']} | | |""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
