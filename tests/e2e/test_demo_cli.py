"""`portico demo` as a user (or CI) runs it without a terminal: it stops by itself and reports only this run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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

    # a second run in the same folder is a new study, and its report is its own
    again = subprocess.run([sys.executable, "-m", "appliance", "demo", "--workdir", str(workdir), "--slices", "40"],
                           cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    second = json.loads((workdir / "report.json").read_text())
    assert second["study_instance_uid"] != report["study_instance_uid"]
    assert second["seg_and_sr_in_pacs"] is True and second["jobs"][0]["state"] == "DONE"


def test_a_demo_whose_job_fails_says_why_at_once_and_exits_non_zero(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    no_models = tmp_path / "no-models"
    no_models.mkdir()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "appliance", "demo", "--workdir", str(workdir), "--slices", "20",
                           "--models-dir", str(no_models)],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 300  # not the 600 s timeout: the failure ends the wait
    report = json.loads((workdir / "report.json").read_text())
    assert report["seg_and_sr_in_pacs"] is False
    assert report["failure"]["code"] not in ("", "timeout")
    assert "FAILED" in proc.stdout and report["log"] in proc.stdout
    assert "SEG + SR in PACS NO" in proc.stdout
