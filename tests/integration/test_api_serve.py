"""``portico serve`` with the API enabled: real uvicorn on a free loopback port, real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import yaml

from tests.integration.conftest import Appliance
from tests.support.net import free_port
from tests.support.polling import wait_for

TOKEN = "t0ken-for-tests-only"


def test_serve_answers_health_and_status_over_http(portico_factory: Callable[..., Appliance]) -> None:
    api_port = free_port()
    app = portico_factory(free_port(), extra={"api": {"enabled": True, "port": api_port, "token": TOKEN}},
                          start=False)
    # production mode: a real token is accepted where a placeholder would be refused
    config: dict[str, Any] = yaml.safe_load(app.config.read_text())
    app.config.write_text(yaml.safe_dump({**config, "mode": "production"}, sort_keys=False))
    app.process.start()
    base = f"http://127.0.0.1:{api_port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    # the API starts last in Service.start(); the SCP port answering first is expected
    wait_for(healthy, timeout=30, message="the API's /health")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}

    refused = httpx.get(f"{base}/status")
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    status = httpx.get(f"{base}/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["instances"] == 0 and body["jobs"] == {} and body["recent_jobs"] == []
    assert status.headers["X-Request-ID"]
    assert "server" not in status.headers

    app.process.stop()
    assert not healthy()
    log = app.log_text()
    assert TOKEN not in log
    assert "Traceback" not in log
