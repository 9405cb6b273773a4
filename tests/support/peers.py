"""Peers on loopback for the edge tests: a C-ECHO with a deadline, a TCP connection from a given address."""

from __future__ import annotations

import socket

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

#: on no allow-list, and an allow-listed host that misbehaves (Linux routes all of 127/8 to loopback)
STRANGER, NOISY = "127.0.0.2", "127.0.0.3"


def echo(port: int, calling: str = "PYSCU", timeout: float = 2.0) -> bool:
    """A C-ECHO from 127.0.0.1 to ``PORTICO`` that must be answered within ``timeout`` seconds."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="PORTICO")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def connect(port: int, source: str) -> socket.socket:
    """A TCP connection to ``127.0.0.1:port`` from the loopback address ``source``."""
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
