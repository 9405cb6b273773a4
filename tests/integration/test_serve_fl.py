"""`portico serve` with federated learning enabled on a site that has not enrolled yet."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Appliance
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for


@pytest.mark.slow
def test_serve_with_fl_enabled_but_not_enrolled_keeps_serving(
        portico_factory: Callable[..., Appliance]) -> None:
    portico = portico_factory(free_port(), extra={"fl": {"enabled": True}})
    wait_for(lambda: "not enrolled" in portico.log_text(), timeout=30, message="the FL warning")
    assert "Traceback" not in portico.log_text()
    assert port_open(portico.port)  # the SCP is still up
    store = portico.store()
    try:
        assert any(e["event"] == "service" and e["detail"].get("action") == "start" for e in store.audit_events())
    finally:
        store.close()
