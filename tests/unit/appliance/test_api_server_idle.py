"""The API's uvicorn wakes once a second at rest, and still stops at once and stamps a fresh Date header."""

from __future__ import annotations

import inspect
import time

import httpx
import uvicorn
from fastapi import FastAPI

from appliance.api_server import ApiServer, QuietServer
from appliance.settings import Settings
from tests.support.net import free_port


def test_uvicorn_still_has_the_loop_we_replace() -> None:
    # QuietServer overrides main_loop and calls on_tick(counter): a uvicorn that renames them breaks it
    assert "main_loop" in uvicorn.Server.__dict__ and "on_tick" in uvicorn.Server.__dict__
    assert list(inspect.signature(uvicorn.Server.on_tick).parameters) == ["self", "counter"]
    assert "counter % 10 == 0" in inspect.getsource(uvicorn.Server.on_tick)  # the Date header, per ten ticks


def test_an_idle_api_answers_with_a_current_date_and_stops_at_once() -> None:
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"ok": "yes"}

    port = free_port()
    server = ApiServer(Settings.model_validate({"api": {"enabled": True, "port": port}}), app)
    assert isinstance(server._server, QuietServer)
    server.start()
    try:
        first = httpx.get(f"http://127.0.0.1:{port}/ping").headers["date"]
        deadline = time.monotonic() + 5
        while httpx.get(f"http://127.0.0.1:{port}/ping").headers["date"] == first:  # refreshed each second
            assert time.monotonic() < deadline, "the Date header stopped moving"
    finally:
        t0 = time.monotonic()
        server.stop()
        stopped = time.monotonic() - t0
    assert stopped < 0.9  # woken, not waiting out its one-second rest
