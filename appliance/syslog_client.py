"""Syslog out: RFC 5424 messages over TCP (RFC 6587 octet counting), TLS (RFC 5425) or UDP (RFC 5426).

IHE ATNA (ITI-20) fixes the header: facility 10 (security/authorization), severity 5 (notice) or 4
(warning), MSGID ``IHE+RFC-3881``; the MSG is the XML audit message, UTF-8 with its BOM.

TCP has no acknowledgements, so a connection can lose what was written just before the collector went
away. :meth:`SyslogConnection.alive` sees the collector close or reset the connection (it is checked
before every write and while idle), and :meth:`SyslogConnection.close` ends a connection with a
half-close and waits for the collector's own close, which shows it read everything up to that point.
"""

from __future__ import annotations

import datetime as dt
import select
import socket
import ssl

from appliance.settings import SyslogSettings, SyslogTransport
from dicom_router.settings import DicomTlsSettings
from dicom_router.tls import client_context

#: RFC 5424 facility 10: security/authorization messages
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
#: IHE ITI-20's MSGID
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
NILVALUE = "-"


def header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, else ``-``."""
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or NILVALUE


def format_message(*, severity: int, timestamp: float, hostname: str, app_name: str, procid: str,
                   structured_data: str, message: bytes, msgid: str = MSGID) -> bytes:
    """One SYSLOG-MSG (RFC 5424 section 6): header, structured data, then BOM and the UTF-8 message."""
    pri = FACILITY_AUTHPRIV * 8 + severity
    stamp = dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = (f"<{pri}>1 {stamp} {header_field(hostname, 255)} {header_field(app_name, 48)} "
              f"{header_field(procid, 128)} {header_field(msgid, 32)} {structured_data or NILVALUE} ")
    return header.encode("ascii") + BOM + message


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(settings: SyslogSettings) -> ssl.SSLContext:
    """The client context for ``transport: tls``: TLS 1.2+, BCP 195 suites, the collector's name verified.

    Raises
    ------
    dicom_router.errors.TlsConfigError
        A file is missing, unreadable or not PEM, or the key does not fit the certificate.
    """
    identity = None
    if settings.certificate and settings.private_key:
        identity = DicomTlsSettings(certificate=settings.certificate, private_key=settings.private_key,
                                    ca_bundle=settings.ca_bundle, require_client_certificate=False)
    return client_context(identity, settings.ca_bundle)


class SyslogConnection:
    """One connection (or, for UDP, one socket) to the collector."""

    def __init__(self, settings: SyslogSettings, *, timeout: float = 10.0,
                 context: ssl.SSLContext | None = None) -> None:
        self.transport = settings.transport
        self._timeout = timeout
        #: whether a write that returned can still be lost without us knowing (UDP: always)
        self.confirms = settings.transport is not SyslogTransport.UDP
        address = (settings.host, settings.effective_port)
        if settings.transport is SyslogTransport.UDP:
            family, kind, proto, _, target = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0]
            self._sock: socket.socket = socket.socket(family, kind, proto)
            self._sock.connect(target)
            return
        raw = socket.create_connection(address, timeout=timeout)
        if settings.transport is SyslogTransport.TLS:
            try:
                raw = (context or tls_context(settings)).wrap_socket(raw, server_hostname=settings.host)
            except BaseException:
                raw.close()
                raise
        self._sock = raw

    def send(self, messages: list[bytes]) -> None:
        """Write ``messages`` (each a SYSLOG-MSG); raises ``OSError`` when the connection failed."""
        if self.transport is SyslogTransport.UDP:
            for message in messages:
                self._sock.send(message)
            return
        self._sock.sendall(b"".join(octet_counted(m) for m in messages))

    def alive(self) -> bool:
        """False once the collector closed or reset the connection (a collector never writes to us)."""
        if self.transport is SyslogTransport.UDP:
            return True
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable and not (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()):
                return True
            self._sock.setblocking(False)
            try:
                data = self._sock.recv(4096)
            finally:
                self._sock.settimeout(self._timeout)
        except (ssl.SSLWantReadError, BlockingIOError):  # a TLS record for the session, no data
            return True
        except (OSError, ValueError):
            return False
        return bool(data)  # b"": the collector closed its side

    def close(self, wait: float = 0.0) -> bool:
        """Close; with ``wait``, half-close first and wait that long for the collector to close too.

        Returns whether the collector closed in time after reading everything we wrote (TCP and TLS;
        ``False`` for UDP and without ``wait``).
        """
        try:
            if not (wait and self.confirms):
                return False
            self._sock.settimeout(wait)
            if isinstance(self._sock, ssl.SSLSocket):
                try:  # close_notify after everything we wrote; the collector answers or closes
                    self._sock = self._sock.unwrap()
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    return True
            self._sock.shutdown(socket.SHUT_WR)
            while self._sock.recv(4096):
                pass
            return True
        except OSError:  # a timeout, or a reset: what we wrote last may be lost
            return False
        finally:
            self._sock.close()
