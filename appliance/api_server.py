"""The API inside ``portico serve``: uvicorn on a background thread, bound before ``start()`` returns."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from appliance.settings import Settings

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class ApiServer:
    """Serve ``app`` on ``settings.api.host``:``settings.api.port`` (default loopback only).

    The socket is bound in :meth:`start`, so a port in use fails there, as an ``OSError``.
    """

    def __init__(self, settings: Settings, app: FastAPI) -> None:
        self.host = settings.api.host
        self.port = settings.api.port
        self._config = uvicorn.Config(app, log_config=None, lifespan="off", server_header=False,
                                      timeout_graceful_shutdown=int(STOP_TIMEOUT / 2))
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind, start serving on a daemon thread, and return once requests are answered.

        Raises
        ------
        OSError
            When the address cannot be bound.
        RuntimeError
            When the server does not come up.
        """
        sock = _bind(self.host, self.port)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="api",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise RuntimeError(f"the API did not start on {self.host}:{self.port}; see the log")
            time.sleep(0.02)
        if not _is_loopback(self.host):
            log.warning("the API listens on %s, beyond this machine, over plain HTTP; put TLS in front of it",
                        self.host)
        log.info("API listening on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop accepting, finish requests in flight (bounded), and join the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=STOP_TIMEOUT)
        self._thread = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
