"""Issue #9 (at rest): a real ``portico serve`` in production keeps its data owner-only, and refuses a
configuration file that group/others can read, saying how to fix it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE

from appliance.demo import PorticoProcess, portico_config
from appliance.demo_study import write_ct_series
from appliance.settings import load_settings
from appliance.store import JobState, Store
from inference.phantom import make_phantom
from tests.conftest import REPO
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _production_config(workdir: Path, port: int) -> Path:
    config = portico_config(workdir, port=port, orthanc_dicom_port=free_port(), models_dir=REPO / "models",
                            rules_file=REPO / "config" / "rules.yaml", quiet_seconds=1.0)
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "mode": "production"}, sort_keys=False))
    return config


def _send(port: int, paths: list[Path]) -> None:
    ae = AE("ORTHANC")
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="PORTICO")
    assert assoc.is_established
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status.Status == 0x0000
    finally:
        assoc.release()


def test_serve_keeps_every_file_and_folder_it_makes_owner_only(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # what the test process hands down is permissive; serve tightens its own
    try:
        port = free_port()
        config = _production_config(tmp_path / "portico", port)
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        data = load_settings(config).data_dir
        # an earlier installation left the data folder and a file in it readable by everybody
        data.mkdir(parents=True)
        os.chmod(data, 0o755)
        (data / "left-over.txt").write_text("x")
        os.chmod(data / "left-over.txt", 0o644)
        process = PorticoProcess(config, port, tmp_path / "serve.log")
        process.start()
        try:
            phantom = make_phantom((12, 64, 64), (2.5, 4.0, 4.0), seed=3)
            series = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "study", seed=3)
            _send(port, series.paths)

            def job_done() -> bool:
                store = Store(data, fsync=False)
                try:
                    return any(j.state is JobState.DONE for j in store.jobs())
                finally:
                    store.close()

            wait_for(job_done, timeout=240, interval=0.5, message="the job's results")
        finally:
            process.stop()
    finally:
        os.umask(previous)

    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "tightened 1 file(s) and 1 folder(s) under the data folder" in log
    entries = [data, *data.rglob("*")]
    kinds = {p.relative_to(data).parts[0] for p in entries if p != data}
    assert {"instances", "results", "quarantine", "spool", "portico.sqlite3"} <= kinds
    assert any(p.suffix == ".dcm" for p in (data / "results").rglob("*"))
    loose = [(str(p.relative_to(data)), oct(stat.S_IMODE(p.lstat().st_mode))) for p in entries
             if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]
    assert loose == []
    folders = {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_dir()}
    files = {stat.S_IMODE(p.stat().st_mode) for p in entries if p.is_file()}
    assert folders == {0o700} and files == {0o600}


def test_production_refuses_a_config_file_others_can_read_and_names_the_fix(tmp_path: Path) -> None:
    port = free_port()
    config = _production_config(tmp_path / "portico", port)
    os.chmod(config, 0o644)
    result = subprocess.run([sys.executable, "-m", "appliance", "serve", "-c", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert f"not starting: configuration file {config} can be read by group/others (mode 0644)" in out
    assert f"chmod 600 {config}" in out
    assert not load_settings(config).data_dir.exists()  # refused before anything was written

    # mode: dev only warns, and serves
    data: dict[str, Any] = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "mode": "dev"}, sort_keys=False))
    process = PorticoProcess(config, port, tmp_path / "dev.log")
    process.start()
    process.stop()
    log = (tmp_path / "dev.log").read_text(errors="replace")
    assert f"chmod 600 {config}" in log and "allowed in mode: dev only" in log
