"""What `make` would install, resolved by pip itself (issue #10): the CPU build of torch and never a `nvidia-*`
package; and the demo, run end to end with the training packages unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.test_setup_scripts import BLOCKER, TRAINING

pytestmark = pytest.mark.slow

TORCH = "2.13.0"  # the Makefile's TORCH


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _pip_with_report() -> None:
    out = _pip("--version").stdout.split()
    major = int(out[1].split(".")[0]) if len(out) > 1 else 0
    if major < 23:
        pytest.skip(f"pip {out[1] if len(out) > 1 else '?'} has no `install --dry-run --report` (pip >= 23)")


def _plan(report: Path) -> list[tuple[str, str]]:
    install = json.loads(report.read_text())["install"]
    return [(i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in install]


def test_the_torch_install_plan_is_the_cpu_build(tmp_path: Path) -> None:
    _pip_with_report()
    report = tmp_path / "torch.json"
    proc = subprocess.run([str(REPO / "scripts" / "install-torch.sh"), sys.executable, "--dry-run",
                           "--ignore-installed", "-q", "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TORCH_VERSION": TORCH})
    if proc.returncode != 0:
        reachable = _pip("index", "versions", "torch", "--retries", "0", "--timeout", "10", timeout=120)
        if reachable.returncode != 0:
            pytest.skip("no package index answers (neither PyTorch's CPU index nor pip's own): "
                        + (reachable.stderr.strip().splitlines() or ["?"])[-1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    plan = _plan(report)
    cuda = [name for name, _ in plan if name.startswith("nvidia-")]
    assert not cuda, f"the plan pulls the CUDA build of torch ({proc.stdout.strip()}): {cuda}"
    torch = [version for name, version in plan if name == "torch"]
    assert torch and torch[0].split("+")[0] == TORCH, plan


def test_the_extras_keep_the_installed_cpu_torch(tmp_path: Path) -> None:
    """After the CPU torch, `pip install -e .[train,dev,fl]` (the Makefile's next step) adds no torch and no CUDA."""
    _pip_with_report()
    installed = _pip("show", "torch")
    if installed.returncode != 0:
        pytest.skip("torch is not installed in this environment (make venv-full installs it)")
    report = tmp_path / "extras.json"
    proc = _pip("install", "--dry-run", "-q", "--report", str(report), "-e", ".[train,dev,fl]", timeout=900)
    if proc.returncode != 0 and _pip("index", "versions", "setuptools", "--retries", "0", "--timeout", "10",
                                     timeout=120).returncode != 0:
        pytest.skip("no package index answers: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [name for name, _ in _plan(report)]
    assert not [n for n in names if n.startswith("nvidia-") or n == "torch"], names


def test_the_demo_runs_without_any_training_package(tmp_path: Path) -> None:
    """`make demo` installs no torch (nor MONAI, onnx, NVFlare): the demo, `portico serve` included, never imports
    them. The blocker refuses and records every attempt, in the demo and in the serve process it starts."""
    log = tmp_path / "blocked.log"
    workdir = tmp_path / "demo"
    env = {**os.environ, "PORTICO_BLOCKED_LOG": str(log), "PORTICO_BLOCKED_MODULES": ",".join(TRAINING),
           "PYTHONPATH": os.pathsep.join(p for p in (str(BLOCKER), str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "appliance", "demo", "--workdir", str(workdir), "--slices", "20"],
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert not log.exists(), "imported at run time: " + log.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SEG + SR in PACS yes" in proc.stdout
