"""The socket of an association the edge admitted: its first PDU already read, every later PDU bounded.

The edge (:mod:`dicom_router.edge`) reads the peer's A-ASSOCIATE-RQ itself, before pynetdicom sees
the connection, so that it can refuse strangers without spending memory on them. Those bytes are
handed on here as a *prefix* that the association reads first. After that, each PDU header is
checked before its body is read: a P-DATA-TF longer than the maximum PDU length we announced, or
any other PDU longer than :data:`MAX_CONTROL_PDU`, closes the connection at once instead of being
buffered (pynetdicom buffers whatever length a peer declares, up to 4 GiB).

The checks work for both reactors: pynetdicom's own DUL reads through :meth:`EdgeAssociationSocket.recv`
(a 6-byte header, then the body), and :mod:`dicom_router.reactor`'s DUL asks :meth:`take_prefix` and
:meth:`body_limit` directly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING

from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

LOGGER = logging.getLogger(__name__)

#: the largest A-ASSOCIATE-RQ (and any PDU other than P-DATA-TF) we read; real ones are < 4 KiB
MAX_CONTROL_PDU = 64 * 1024
P_DATA_TF = 0x04
_HEADER = struct.Struct(">BBL")


class PduTooLarge(OSError):
    """A peer declared a PDU longer than we accept; the connection is closed unread."""


def body_limit(pdu_type: int, max_pdu: int) -> int:
    """The longest variable field we read for a PDU of ``pdu_type`` when we announced ``max_pdu``."""
    return max_pdu if pdu_type == P_DATA_TF else MAX_CONTROL_PDU


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Make a blocked ``recv``/``send`` on ``sock`` fail after ``seconds``, in the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeout does the same with a ``poll`` before every ``recv``: one more system
    call per read on the hot path. Where the options are missing, Python's timeout it is.
    """
    sock.settimeout(None)
    whole = int(seconds)
    interval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, interval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, interval)
    except (OSError, AttributeError):
        sock.settimeout(seconds)


class EdgeAssociationSocket(AssociationSocket):
    """An acceptor's socket with the edge's prefix (the A-ASSOCIATE-RQ) and per-PDU length limits.

    Parameters
    ----------
    assoc
        The association that owns the socket.
    client_socket
        The accepted connection (an ``ssl.SSLSocket`` after a TLS handshake).
    prefix
        Bytes the edge already read from it: exactly one whole A-ASSOCIATE-RQ PDU.
    max_pdu
        The maximum PDU length we announce; a longer P-DATA-TF is refused.
    read_timeout
        Seconds a started PDU may take to arrive in full; a peer that stalls mid-PDU is dropped.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, *, prefix: bytes, max_pdu: int,
                 read_timeout: float) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._prefix = prefix
        self.max_pdu = max_pdu
        self._next_limit: int | None = None
        set_io_timeout(client_socket, read_timeout)

    @property
    def ready_prefix(self) -> bool:
        """Whether the edge's A-ASSOCIATE-RQ is still to be read."""
        return bool(self._prefix)

    def take_prefix(self) -> bytes | None:
        """The already-read PDU, once; ``None`` afterwards."""
        prefix, self._prefix = self._prefix, b""
        return prefix or None

    def check_header(self, header: bytes) -> None:
        """Raise :class:`PduTooLarge` when the PDU this header starts is longer than we read."""
        pdu_type, _, length = _HEADER.unpack(header)
        limit = body_limit(pdu_type, self.max_pdu)
        if length > limit:
            raise PduTooLarge(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds the limit of {limit}")

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        # pynetdicom 3.0.4's DUL._read_pdu_data reads recv(6) for the header, then recv(length)
        if self._prefix:
            chunk, self._prefix = self._prefix[:nr_bytes], self._prefix[nr_bytes:]
            if len(chunk) == nr_bytes:
                return bytearray(chunk)
            return bytearray(chunk) + super().recv(nr_bytes - len(chunk))
        if self._next_limit is not None:
            limit, self._next_limit = self._next_limit, None
            if nr_bytes > limit:
                self.refuse_oversized()
                raise PduTooLarge(f"PDU of {nr_bytes} bytes exceeds the limit of {limit}")
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, _ = _HEADER.unpack(bytes(data))
            self._next_limit = body_limit(pdu_type, self.max_pdu)
        return data

    def refuse_oversized(self) -> None:
        """Log and cut the connection of a peer that declared an oversized PDU."""
        LOGGER.warning("closing the association from %s: it declared a PDU longer than we accept",
                       self.assoc.requestor.ae_title or "an unnamed peer")
        raw = self.socket
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
