"""A real Prometheus scrapes a real ``portico serve``: counts of a study sent with DCMTK reach its query API.

Prometheus (Debian ``prometheus``) runs on a free loopback port with a temporary configuration that scrapes
``/metrics`` every second with the metrics token; every query of the Grafana dashboard must be accepted by it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from appliance.demo_study import write_ct_series
from appliance.settings import load_settings
from inference.phantom import make_phantom
from tests.integration.conftest import Appliance
from tests.support.net import free_port
from tests.support.polling import wait_for, wait_for_api
from tests.support.prometheus import Prometheus, concrete, dashboard_queries, start_prometheus

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")]

TOKEN = "prometheus-scrape-t0ken-for-tests"
SLICES = 6


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[str, str | None], Prometheus]]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make setup` (Debian package prometheus)")
    started: list[Prometheus] = []

    def make(target: str, token: str | None = None) -> Prometheus:
        server = start_prometheus(tmp_path / f"prometheus-{len(started)}", target, token=token)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def storescu(port: int, calling: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aet", calling, "-aec", "PORTICO", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_prometheus_scrapes_instances_received_and_refusals(
        tmp_path: Path, portico_factory: Callable[..., Appliance],
        prometheus_factory: Callable[[str, str | None], Prometheus]) -> None:
    api_port = free_port()
    app = portico_factory(free_port(), extra={"api": {"enabled": True, "port": api_port,
                                                      "metrics": {"token": TOKEN}}})
    base = f"http://127.0.0.1:{api_port}"
    wait_for_api(base)
    ready = httpx.get(f"{base}/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["scp"] == {"ok": True, "detail": "listening"}
    assert httpx.get(f"{base}/metrics").status_code == 401  # the token is required, even from here

    prometheus = prometheus_factory(f"127.0.0.1:{api_port}", TOKEN)
    wait_for(lambda: prometheus.value('up{job="portico"}') == 1.0, timeout=60, interval=0.25,
             message="Prometheus scraping portico serve")

    phantom = make_phantom((SLICES, 64, 64), (2.5, 1.5, 1.5), seed=5)
    paths = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "study", seed=5).paths
    sent = storescu(app.port, "ORTHANC", paths)
    assert sent.returncode == 0, sent.stderr
    assert storescu(app.port, "STRANGER", paths[:1]).returncode != 0  # refused by the edge

    wait_for(lambda: prometheus.value('portico_instances_received_total{protocol="dimse"}') == SLICES,
             timeout=60, interval=0.25, message=f"{SLICES} instances received, in Prometheus")
    wait_for(lambda: (prometheus.value('portico_associations_refused_total{reason="unknown_calling_ae"}') or 0) >= 1,
             timeout=60, interval=0.25, message="the refused association, in Prometheus")
    # the bytes stored: what came off the wire with the file meta built for it, as the files on disk
    stored = sum(p.stat().st_size for p in (load_settings(app.config).data_dir / "instances").rglob("*.dcm"))
    assert prometheus.value('portico_received_bytes_total{protocol="dimse"}') == stored
    assert prometheus.value('portico_associations_total{outcome="accepted"}') == 1.0
    assert prometheus.value("portico_state_up") == 1.0
    assert prometheus.value("portico_instances_stored") == SLICES

    # every query the Grafana dashboard makes is one Prometheus accepts
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        answer = prometheus.query(concrete(expr))
        assert answer["status"] == "success", (expr, answer.get("error"))
    assert "Traceback" not in app.log_text()
