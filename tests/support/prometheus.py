"""A real Prometheus (Debian ``prometheus``) on a free loopback port scraping one target; the dashboard's queries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.net import free_port
from tests.support.polling import wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "portico.json"
#: what Grafana puts in for the dashboard's variables, for running its queries elsewhere
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "${datasource}": "prometheus"}


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows' own panels too) and its variables."""
    board: dict[str, Any] = json.loads(path.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(str(t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict) and query.get("query"):
            exprs.append(str(query["query"]))
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (ours and the client library's process metrics)."""
    return set(re.findall(r"\b((?:portico|process)_[a-z0-9_]+)\b", expr))


def concrete(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query``'s whole answer (``status``, ``data`` or ``error``)."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body: dict[str, Any] = answer.json()
        return body

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; ``None`` while it has no result."""
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_prometheus(folder: Path, target: str, *, token: str | None = None, interval: str = "1s") -> Prometheus:
    """Start Prometheus scraping ``target`` (``host:port``) every ``interval``; returns once it is ready."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: run `make setup` (Debian package prometheus)")
    folder.mkdir(parents=True, exist_ok=True)
    scrape: dict[str, Any] = {"job_name": "portico", "metrics_path": "/metrics", "scrape_interval": interval,
                              "scrape_timeout": interval, "static_configs": [{"targets": [target]}]}
    if token is not None:
        token_file = folder / "scrape-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        scrape["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": interval, "evaluation_interval": interval},
                                      "scrape_configs": [scrape]}))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=max(1.0, deadline - time.monotonic()), message="prometheus /-/ready")
    except BaseException:
        server.stop()
        raise
    return server
