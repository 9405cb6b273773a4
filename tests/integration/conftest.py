"""Real Orthanc and a real ``portico serve`` on free loopback ports; always stopped."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser
from pyorthanc import Orthanc

from appliance.demo import PorticoProcess, portico_config
from appliance.pacs_standin import OrthancStandIn
from appliance.settings import load_settings
from appliance.store import Store
from tests.conftest import REPO
from tests.support.net import free_port
from tests.support.web import chromium


@dataclass
class Pacs:
    standin: OrthancStandIn
    client: Orthanc

    @property
    def dicom_port(self) -> int:
        return self.standin.dicom_port

    def upload(self, paths: list[Path]) -> str:
        """Store files in Orthanc; returns Orthanc's study id."""
        ids = {self.client.post_instances(p.read_bytes())["ParentStudy"] for p in paths}
        assert len(ids) == 1
        return ids.pop()

    def send_to(self, modality: str, study_id: str) -> None:
        self.client.post_modalities_id_store(modality, json={"Resources": [study_id], "Synchronous": True})

    def derived(self, study_id: str) -> dict[str, list[str]]:
        """Modality → instance ids of the study's SEG and SR series."""
        out: dict[str, list[str]] = {}
        for series_id in self.client.get_studies_id(study_id)["Series"]:
            series = self.client.get_series_id(series_id)
            modality = series["MainDicomTags"].get("Modality")
            if modality in ("SEG", "SR"):
                out.setdefault(modality, []).extend(series["Instances"])
        return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium for a module's browser tests (tests.support.web)."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Pacs]]:
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc is not installed: run `make setup` (Debian package orthanc)")
    started: list[OrthancStandIn] = []

    def make(portico_port: int, name: str = "orthanc", http_port: int | None = None,
             dicom_port: int | None = None) -> Pacs:
        standin = OrthancStandIn(tmp_path / name, http_port or free_port(), dicom_port or free_port(),
                                 modalities={"portico": ("PORTICO", "127.0.0.1", portico_port)})
        standin.start()
        started.append(standin)
        return Pacs(standin, Orthanc(standin.url))

    yield make
    for s in started:
        s.stop()


@dataclass
class Appliance:
    process: PorticoProcess
    config: Path
    port: int

    def store(self) -> Store:
        return Store(load_settings(self.config).data_dir, fsync=False)

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@pytest.fixture
def portico_factory(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    started: list[PorticoProcess] = []

    def make(pacs_dicom_port: int, *, port: int | None = None, quiet_seconds: float = 600.0,
             name: str = "portico", extra: dict[str, Any] | None = None, start: bool = True) -> Appliance:
        port = port or free_port()
        workdir = tmp_path / name
        config = portico_config(workdir, port=port, orthanc_dicom_port=pacs_dicom_port,
                                models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml",
                                quiet_seconds=quiet_seconds, extra=extra)
        process = PorticoProcess(config, port, workdir / "serve.log")
        started.append(process)
        if start:
            process.start()
        return Appliance(process, config, port)

    yield make
    for p in started:
        p.stop()
