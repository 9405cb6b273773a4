"""Poll with a deadline instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> T:
    """Return the first truthy value of ``predicate()``; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)
        last = predicate()
    return last


def api_healthy(base: str, client: httpx.Client | None = None) -> bool:
    """Whether ``base``'s ``/health`` answers 200 now."""
    try:
        answer = (client or httpx).get(f"{base}/health", timeout=2.0)
    except httpx.TransportError:
        return False
    return answer.status_code == 200


def wait_for_api(base: str, client: httpx.Client | None = None, timeout: float = 30.0) -> None:
    """Wait until ``base``'s ``/health`` answers 200 (the API starts last in ``portico serve``)."""
    wait_for(lambda: api_healthy(base, client), timeout=timeout, message="the API's /health")
