"""Set-up on a stock server (issue #10): the demo's environment needs no torch, Debian's Orthanc service stays off,
an existing policy-rc.d is never touched, and the package metadata carries no deprecated license table."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

BLOCKER = REPO / "tests" / "support" / "no_training_imports"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


#: what the train and fl extras add and the demo's environment lacks (distribution = module name for all of them)
TRAINING = sorted({_name(r) for extra in ("train", "fl") for r in PYPROJECT["project"]["optional-dependencies"][extra]}
                  - {_name(r) for r in PYPROJECT["project"]["dependencies"]} - {"portico"})


def test_the_demo_and_serve_dependencies_hold_no_training_package() -> None:
    base = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not base & {"torch", "monai", "onnx", "onnxscript"}
    assert {"torch", "monai"} <= set(TRAINING)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "torch" in {_name(r) for r in extras["train"]}
    assert "portico[train]" in extras["fl"]  # a federated-learning site trains


def test_the_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert all((REPO / f).is_file() for f in project["license-files"])
    # setuptools 77 is the first to read PEP 639's license / license-files
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_serve_and_demo_import_no_training_package(tmp_path: Path) -> None:
    log = tmp_path / "blocked.log"
    code = (
        "import importlib\n"
        "from appliance.cli.main import COMMANDS\n"
        "for name in [m for m, _ in COMMANDS.values()] + ['appliance.demo', 'appliance.service', "
        "'appliance.api.app', 'appliance.api_server', 'inference.pipeline', 'inference.runtime.onnxruntime']:\n"
        "    importlib.import_module(name)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(REPO)]), "PORTICO_BLOCKED_LOG": str(log),
           "PORTICO_BLOCKED_MODULES": ",".join(TRAINING)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not log.exists(), log.read_text()


# install-system.sh against stubs of apt-get, systemctl, dpkg-query and sudo: what it does to policy-rc.d and
# to Debian's orthanc service, without touching this machine

STUBS = {
    "apt-get": """#!/bin/sh
echo "apt-get $*" >> "$STUB_LOG"
case "$1" in install) echo "policy during install: $(cat "$PORTICO_POLICY_RC_D" 2>/dev/null | tail -1)" >> "$STUB_LOG";
  exit "${STUB_APT_RC:-0}";; esac
""",
    "systemctl": """#!/bin/sh
echo "systemctl $*" >> "$STUB_LOG"
[ "$1" = is-enabled ] && echo "${STUB_UNIT_STATE:-enabled}"
exit 0
""",
    "dpkg-query": """#!/bin/sh
printf 'install ok installed'
""",
    "sudo": """#!/bin/sh
exec "$@"
""",
}


def _install_system(tmp_path: Path, need: str = "orthanc", **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    log.write_text("")
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
                "PORTICO_POLICY_RC_D": str(tmp_path / "policy-rc.d"), "PORTICO_NEED": need, **env}
    proc = subprocess.run([str(REPO / "scripts" / "install-system.sh")], env=full_env, capture_output=True,
                          text=True, timeout=60)
    return proc, log.read_text()


def test_install_system_blocks_service_starts_with_its_own_policy_and_removes_it(tmp_path: Path) -> None:
    proc, log = _install_system(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "policy during install: exit 101" in log
    assert not (tmp_path / "policy-rc.d").exists()


def test_install_system_removes_its_policy_when_apt_fails(tmp_path: Path) -> None:
    proc, log = _install_system(tmp_path, STUB_APT_RC="100")
    assert proc.returncode == 100
    assert "policy during install: exit 101" in log
    assert not (tmp_path / "policy-rc.d").exists()


def test_install_system_never_touches_an_existing_policy(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the site's own\nexit 0\n")
    policy.chmod(0o750)
    for apt_rc in ("0", "100"):
        _install_system(tmp_path, STUB_APT_RC=apt_rc)
        assert policy.read_text() == "#!/bin/sh\n# the site's own\nexit 0\n"
        assert stat.S_IMODE(policy.stat().st_mode) == 0o750


def test_install_system_disables_and_masks_debians_orthanc_service(tmp_path: Path) -> None:
    proc, log = _install_system(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "systemctl mask --quiet orthanc.service" in log
    assert re.search(r"systemctl disable (--now )?--quiet orthanc.service", log)
    # also when nothing is missing (orthanc installed earlier, its service still enabled)
    proc, log = _install_system(tmp_path, need="")
    assert proc.returncode == 0 and "apt-get" not in log
    assert "systemctl mask --quiet orthanc.service" in log


def test_install_system_disables_and_masks_debians_prometheus_service(tmp_path: Path) -> None:
    # the tests start their own Prometheus on a free port; Debian's would hold 9090 and scrape on its own
    proc, log = _install_system(tmp_path, need="prometheus")
    assert proc.returncode == 0, proc.stderr
    assert "systemctl mask --quiet prometheus.service" in log
    assert re.search(r"systemctl disable (--now )?--quiet prometheus.service", log)
    proc, log = _install_system(tmp_path, need="")
    assert proc.returncode == 0 and "systemctl mask --quiet prometheus.service" in log


def test_install_system_leaves_a_masked_orthanc_service_alone(tmp_path: Path) -> None:
    proc, log = _install_system(tmp_path, need="", STUB_UNIT_STATE="masked")
    assert proc.returncode == 0, proc.stderr
    assert "mask --quiet" not in log and "disable" not in log


def test_install_system_lists_every_debian_package() -> None:
    out = subprocess.run([str(REPO / "scripts" / "install-system.sh"), "--list"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert {"orthanc", "orthanc-dicomweb", "dcmtk", "dicom3tools", "chromium", "python3-venv", "rsyslog",
            "rsyslog-gnutls", "postgresql", "prometheus"} == set(out)
    readme = (REPO / "README.md").read_text()
    missing = [p for p in out if f"`{p}`" not in readme]
    assert not missing, f"README does not name {missing}"


@pytest.mark.parametrize("script", ["install-system.sh", "install-torch.sh"])
def test_install_scripts_are_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
