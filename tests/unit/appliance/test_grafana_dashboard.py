"""The Grafana dashboard in ``deploy/grafana``: valid JSON whose every query reads metrics Portico exports."""

from __future__ import annotations

import json

from appliance.metrics import EXPORTED
from tests.support.prometheus import DASHBOARD, dashboard_queries, metric_names


def test_every_metric_the_dashboard_queries_is_one_portico_exports() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    unknown = {(name, expr) for expr in queries for name in metric_names(expr) if name not in EXPORTED}
    assert not unknown, f"the dashboard queries metrics Portico does not export: {sorted(unknown)}"
    assert all(metric_names(expr) for expr in queries), "a query that reads no Portico metric"


def test_the_dashboard_shows_what_operations_needs() -> None:
    used = {name for expr in dashboard_queries() for name in metric_names(expr)}
    for needed in ("portico_instances_received_total", "portico_received_bytes_total", "portico_associations_total",
                   "portico_studies_handed_off_total", "portico_jobs", "portico_stage_duration_seconds_bucket",
                   "portico_outbox_items", "portico_outbox_oldest_pending_age_seconds",
                   "portico_dispatch_retries_total", "portico_disk_free_bytes", "portico_model_sessions"):
        assert needed in used, needed


def test_the_dashboard_is_importable_as_it_stands() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "portico-operations" and board["title"] == "Portico"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    # the data source is a variable, so the file imports into any Grafana without editing
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
