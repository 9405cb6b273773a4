"""The API inside ``portico serve``: uvicorn on a background thread, bound before ``start()`` returns.

HTTPS when ``api.tls`` is set: our own :class:`ssl.SSLContext` (TLS 1.2 or later, client certificates
required when ``api.tls.client_ca`` is set), handed to uvicorn through ``ssl_context_factory``.
``X-Forwarded-For``/``-Proto`` are ignored unless ``api.behind_tls_proxy``, and then believed from
``api.proxy_addresses`` only: otherwise anyone on this machine could claim any address, and the
STOW-RS senders' address allow-lists (which read the client address) would mean nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from appliance.settings import ApiTlsSettings, Settings, is_loopback
from dicom_router.tls import BCP195_CIPHERS

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


class ApiTlsError(ValueError):
    """The API's certificate, private key or client CA cannot be loaded; names the file, not its contents."""


def server_context(tls: ApiTlsSettings) -> ssl.SSLContext:
    """The API's TLS server context: TLS 1.2 or later, client certificates required with ``client_ca``.

    Raises
    ------
    ApiTlsError
        When a file is missing, unreadable, not PEM, or the key does not match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # the same BCP 195 list as DICOM TLS (forward-secret AEAD suites); TLS 1.3's are OpenSSL's own
    context.set_ciphers(BCP195_CIPHERS)
    try:
        # the password callback keeps OpenSSL from prompting on a terminal for an encrypted key
        context.load_cert_chain(tls.certificate, tls.private_key, password=lambda: b"")
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        hint = "; the key must be unencrypted PEM matching the certificate" if isinstance(exc, ssl.SSLError) else ""
        raise ApiTlsError(f"api.tls: cannot load certificate {tls.certificate} with private key "
                          f"{tls.private_key} ({_reason(exc)}{hint})") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ValueError) as exc:
            raise ApiTlsError(f"api.tls.client_ca {tls.client_ca} cannot be loaded ({_reason(exc)})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    context.sslobject_class = _LoggedHandshake
    _warn_if_world_readable(tls.private_key)
    return context


#: OpenSSL's reasons for the handshake failures a site will meet, in words
_HANDSHAKE_FAILURES = {
    "HTTP_REQUEST": "plain HTTP sent to the HTTPS port",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate failed verification",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate",
    "UNSUPPORTED_PROTOCOL": "the client offered only TLS versions below 1.2",
    "NO_SHARED_CIPHER": "no cipher in common",
}


class _LoggedHandshake(ssl.SSLObject):
    """Logs why a TLS handshake failed: asyncio reports that only in its debug mode."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            reason = exc.reason or type(exc).__name__
            detail = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else None
            log.warning("refused an HTTPS connection: %s (%s)%s",
                        _HANDSHAKE_FAILURES.get(reason, "TLS handshake failed"), reason,
                        f": {detail}" if detail else "")
            raise


#: a DICOM UID in a URL path (``/dicom-web/studies/1.2.840…``): five or more numeric components (an IPv4
#: address, which uvicorn logs too, has four)
_PATH_UID = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){4,}(?![0-9.])")


class ShortUidsInAccessLog(logging.Filter):
    """Shortens the UIDs in uvicorn's access log lines (request paths) to their last 12 characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_PATH_UID.sub(lambda m: f"…{m.group(0)[-12:]}", a) if isinstance(a, str) else a
                                for a in args)
        return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _warn_if_world_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("api.tls.private_key %s is readable by every user of this machine; chmod o-r it", path)


def _context_factory(context: ssl.SSLContext) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]],
                                                         ssl.SSLContext]:
    def factory(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return context
    return factory


class QuietServer(uvicorn.Server):
    """uvicorn's server, waking once a second at rest instead of ten times.

    uvicorn's ``main_loop`` sleeps 0.1 s between ``on_tick`` calls only to notice ``should_exit``; here it
    waits up to a second for :meth:`wake` (called by :meth:`ApiServer.stop`), so stopping stays immediate.
    ``on_tick`` is called with a counter that steps by ten, so it still refreshes the Date header each
    second. ``main_loop`` and ``on_tick`` are uvicorn's own (0.47+); test_api_server_idle.py
    notices when they change.
    """

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)

    def wake(self) -> None:
        """Make the main loop look at ``should_exit`` now (from any thread)."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(event.set)


class ApiServer:
    """Serve ``app`` on ``settings.api.host``:``settings.api.port`` (default loopback only).

    The TLS files (``api.tls``) are loaded here, so a bad one fails before anything starts, as an
    :class:`ApiTlsError`. The socket is bound in :meth:`start`, so a port in use fails there, as an
    ``OSError``.
    """

    def __init__(self, settings: Settings, app: FastAPI) -> None:
        api = settings.api
        self.host = api.host
        self.port = api.port
        self.scheme = api.scheme
        self._settings = api
        context = server_context(api.tls) if api.tls is not None else None
        self._config = uvicorn.Config(
            app, log_config=None, lifespan="off", server_header=False,
            timeout_graceful_shutdown=int(STOP_TIMEOUT / 2),
            # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise
            proxy_headers=api.behind_tls_proxy,
            forwarded_allow_ips=list(api.proxy_addresses) if api.behind_tls_proxy else [],
            ssl_context_factory=_context_factory(context) if context is not None else None,
        )
        self._server = QuietServer(self._config)
        access = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, ShortUidsInAccessLog) for f in access.filters):
            access.addFilter(ShortUidsInAccessLog())
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
        api = self._settings
        if api.tls is None and not api.behind_tls_proxy and not is_loopback(self.host):
            log.warning("the API listens on %s, beyond this machine, over plain HTTP; set api.tls or put a TLS "
                        "proxy in front of it (api.behind_tls_proxy)", self.host)
        if api.behind_tls_proxy:
            log.info("API behind a TLS proxy: X-Forwarded-For believed from %s only",
                     ", ".join(api.proxy_addresses))
        log.info("API listening on %s://%s:%d%s", self.scheme, self.host, self.port,
                 " (client certificates required)" if api.tls is not None and api.tls.client_ca else "")

    def stop(self) -> None:
        """Stop accepting, finish requests in flight (bounded), and join the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._server.wake()
        self._thread.join(timeout=STOP_TIMEOUT)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=STOP_TIMEOUT)
        self._thread = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)

