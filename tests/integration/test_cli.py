"""The ``portico`` CLI against real DCMTK peers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from appliance.demo_study import write_ct_series
from inference.phantom import make_phantom
from tests.conftest import REPO
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for


def portico(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=20, message="storescp listening")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "portico.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "var")},
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "archive", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}]},
    }))
    return path


def test_echo_and_send_to_a_real_storescp(tmp_path: Path, storescp: tuple[int, Path]) -> None:
    port, out = storescp
    cfg = config(tmp_path, port)
    echo = portico("echo", "-c", str(cfg), "archive")
    assert echo.returncode == 0 and "OK" in echo.stdout, echo.stderr
    phantom = make_phantom((3, 64, 64), (2.5, 4.0, 4.0), seed=1)
    paths = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "study").paths
    sent = portico("send", "-c", str(cfg), "archive", str(tmp_path / "study"))
    assert sent.returncode == 0, sent.stderr
    assert "sent 3/3" in sent.stdout
    assert len(list(out.iterdir())) == len(paths)


def test_echo_to_a_closed_port_fails_cleanly(tmp_path: Path) -> None:
    cfg = config(tmp_path, free_port())
    result = portico("echo", "-c", str(cfg), "archive")
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert "Traceback" not in result.stderr
    unknown = portico("echo", "-c", str(cfg), "nowhere")
    assert unknown.returncode == 2 and "no destination 'nowhere'" in unknown.stderr


def test_rules_check(tmp_path: Path) -> None:
    good = portico("rules", "check", str(REPO / "config" / "rules.yaml"))
    assert good.returncode == 0 and "OK" in good.stdout and "ct-body-composition" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    model: m\n    series:\n      NotAKeyword: {in: [CT]}\n")
    result = portico("rules", "check", str(bad))
    assert result.returncode == 1 and "NotAKeyword" in result.stderr
