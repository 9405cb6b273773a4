"""`portico demo` as a user (or CI) runs it without a terminal: it must stop by itself and exit 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_stops_by_itself(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "appliance", "demo", "--workdir", str(workdir), "--slices", "40"],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["seg_and_sr_in_pacs"] is True
    job = report["jobs"][0]
    assert job["model"] == "ct-body-composition" and job["state"] == "DONE"
    assert {"load", "inference", "encode"} <= set(job["stage_seconds"])
    names = {m["name"] for m in job["measurements"]}
    assert len(names) == 3
    assert "Traceback" not in proc.stderr
    assert "SEG + SR in PACS yes" in proc.stdout
    # everything it started is gone: nothing listens on its ports any more
    assert subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True).returncode == 1
