"""``portico serve`` with the API enabled: real uvicorn on a free loopback port, real HTTP, accounts made by the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import REPO
from tests.integration.conftest import Appliance
from tests.support.net import free_port
from tests.support.polling import api_healthy, wait_for_api

PASSWORD = "first admin's passphrase"
LEGACY = "legacy-shared-t0ken-for-tests"


def portico(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args, "-c", str(config)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_serve_answers_health_status_and_sign_in_for_accounts_made_on_the_command_line(
        portico_factory: Callable[..., Appliance]) -> None:
    api_port = free_port()
    app = portico_factory(free_port(), extra={"api": {"enabled": True, "port": api_port, "token": LEGACY}},
                          start=False)
    # production mode: no default account; the first admin is made on the command line, before serving
    config: dict[str, Any] = yaml.safe_load(app.config.read_text())
    app.config.write_text(yaml.safe_dump({**config, "mode": "production"}, sort_keys=False))
    added = portico(app.config, "users", "add", "ada", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    issued = portico(app.config, "users", "token", "ada", "--label", "integration test")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    app.process.start()
    base = f"http://127.0.0.1:{api_port}"

    # the API starts last in Service.start(); the SCP port answering first is expected
    wait_for_api(base)
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}

    refused = httpx.get(f"{base}/status")
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    status = httpx.get(f"{base}/status", headers={"Authorization": f"Bearer {token}"})
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["instances"] == 0 and body["jobs"] == {} and body["recent_jobs"] == []
    assert status.headers["X-Request-ID"]
    assert "server" not in status.headers
    # the deprecated shared token still opens the API, as the admin "api"
    me = httpx.get(f"{base}/auth/me", headers={"Authorization": f"Bearer {LEGACY}"}).json()
    assert (me["user"], me["roles"]) == ("api", ["admin"])

    with httpx.Client(base_url=base) as browser:
        signed_in = browser.post("/auth/login", json={"username": "ada", "password": PASSWORD},
                                 headers={"X-Requested-With": "portico"})
        assert signed_in.status_code == 200, signed_in.text
        assert browser.get("/auth/me").json()["user"] == "ada"
        assert browser.post("/auth/logout", headers={"X-Requested-With": "portico"}).status_code == 204

    listed = portico(app.config, "users", "list")
    assert listed.returncode == 0 and "from 127.0.0.1" in listed.stdout, listed.stderr

    app.process.stop()
    assert not api_healthy(base)
    log = app.log_text()
    assert "api.token is deprecated" in log
    for secret in (token, LEGACY, PASSWORD):
        assert secret not in log
    assert "Traceback" not in log
