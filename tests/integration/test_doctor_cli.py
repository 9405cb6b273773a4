"""``portico doctor`` as a site runs it: a real C-ECHO peer, a port in use, a destination that is down; exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import REPO
from tests.support.net import free_port
from tests.support.packages import make_package


@pytest.fixture
def echo_scp() -> Iterator[int]:
    """A real Verification SCP (pynetdicom) on a free loopback port."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def doctor(tmp: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp / "portico.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return subprocess.run([sys.executable, "-m", "appliance", "doctor", "-c", str(path), "--timeout", "3", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_doctor_passes_a_good_site_and_names_what_to_fix_on_a_bad_one(tmp_path: Path, echo_scp: int) -> None:
    make_package(tmp_path / "models" / "tiny-1.0.0")
    config: dict[str, Any] = {
        "mode": "dev",
        "storage": {"data_dir": str(tmp_path / "var"), "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "router": {"port": free_port()},
        "dispatch": {"destinations": [{"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                       "port": echo_scp}]},
    }
    good = doctor(tmp_path, config)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "destination pacs (PACS@127.0.0.1" in good.stdout and "answers C-ECHO" in good.stdout
    assert "tiny@1.0.0 verifies" in good.stdout
    assert "nothing to fix" in good.stdout

    with socket.create_server(("127.0.0.1", 0)) as held:
        config["router"]["port"] = held.getsockname()[1]
        config["dispatch"]["destinations"].append({"kind": "dimse", "name": "archive", "ae_title": "ARCHIVE",
                                                   "host": "127.0.0.1", "port": free_port()})
        bad = doctor(tmp_path, config)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    assert any(line.startswith("FAIL") and "is in use" in line for line in lines), bad.stdout
    assert any(line.startswith("FAIL") and "destination archive" in line for line in lines), bad.stdout
    assert "2 to fix" in bad.stdout
    assert sum("fix:" in line for line in lines) >= 2

    offline = doctor(tmp_path, config, "--no-network")  # the port is free again; no peer is asked
    assert offline.returncode == 0, offline.stdout
    assert "C-ECHO" not in offline.stdout
