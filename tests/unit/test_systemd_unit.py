"""The shipped systemd unit of the FL client: it parses (``systemd-analyze verify`` where installed) and
keeps its sandbox and resource caps."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "portico-fl.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser["Service"]


def test_the_unit_sandboxes_and_caps_the_fl_client() -> None:
    service = _service()
    assert service["ExecStart"].split()[1:] == ["fl", "-c", "/etc/portico/portico.yaml", "run"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["KillMode"] == "control-group"
    assert service["MemoryMax"].endswith("G") and service["CPUQuota"].endswith("%")
    assert "/etc/portico" in service["ReadOnlyPaths"].split()
    assert service["ReadWritePaths"].split() == ["/var/lib/portico"]
    caps = set(service["CapabilityBoundingSet"].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"} <= caps and "CAP_SYS_ADMIN" not in caps


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the parse test above still ran)")
    # verify checks that ExecStart's program exists: point it at this checkout's entry point
    portico = Path(sys.executable).parent / "portico"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/portico/venv/bin/portico", str(portico)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert UNIT.name not in out.stderr, out.stderr  # no warning about our unit
