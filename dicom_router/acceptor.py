"""An event-driven association acceptor for pynetdicom 3.0: same protocol, no polling sleeps.

pynetdicom's acceptor runs two threads per association that poll each other with 1 ms sleeps: the
association reactor sleeps before looking for a decoded DIMSE message, and the DUL reactor sleeps
before looking for a response to send or for the peer's next PDU. With a synchronous sender (one
C-STORE in flight, as DCMTK and most PACS send) those sleeps add about 1.5 ms to every instance, and
the socket is read in 4 KiB pieces. Here the same pynetdicom classes wait on what they wait for:

* the association thread blocks on an :class:`threading.Event` set whenever a DIMSE message or a
  DUL primitive (release, abort) is queued for it;
* the DUL thread blocks in ``select`` on the socket and on a wake-up pipe written whenever the
  association queues a primitive to send;
* PDUs are read with ``recv_into`` straight into one buffer.

Only the waiting changes; every PDU still goes through pynetdicom's state machine, ACSE and DIMSE.
The overrides track pynetdicom 3.0's private structure (``RequestHandler._create_association``,
``Association._run_reactor``, ``DULServiceProvider._is_transport_event``); with another version
:func:`supported` is false and the SCP uses pynetdicom's own acceptor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

LOGGER = logging.getLogger(__name__)

#: how long a reactor waits for work before looking at its timers and flags again
TICK_SECONDS = 0.01
_RECV_CHUNK = 1 << 20


def supported() -> bool:
    """Whether the installed pynetdicom has the structure these overrides were written for."""
    return (
        pynetdicom.__version__.startswith("3.0.")
        and hasattr(RequestHandler, "_create_association")
        and hasattr(Association, "_run_reactor")
        and hasattr(DULServiceProvider, "_is_transport_event")
    )


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _EventDrivenDUL(DULServiceProvider):
    """DUL provider that sleeps in ``select`` (socket or wake-up pipe) instead of ``time.sleep``."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _WakingQueue(self.wake)
        # the stock loop sleeps this long after an idle pass; our idle pass already waited in select
        self._run_loop_delay = 0

    def wake(self) -> None:
        # a full pipe means a wake-up is already pending; a closed one that the DUL has stopped
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _is_transport_event(self) -> bool:
        if super()._is_transport_event():
            return True
        if self.event_queue.qsize() or self.to_provider_queue.qsize() or self._kill_thread:
            return False
        sock = self.socket
        raw = sock.socket if sock is not None else None
        if raw is None or raw.fileno() < 0:
            time.sleep(0.001)
            return False
        try:
            ready, _, _ = select.select([raw.fileno(), self._wake_r], [], [], TICK_SECONDS)
        except (OSError, ValueError):
            return False  # the socket closed under us; the next pass reports it
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        return False

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class _EventDrivenAssociation(Association):
    """Acceptor whose reactor wakes when the DIMSE or DUL layer queues something for it."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._work = threading.Event()
        self.dul = _EventDrivenDUL(self)
        self.dul.to_user_queue = _WakingQueue(self._work.set)
        self.dimse.msg_queue = _WakingQueue(self._work.set)

    def kill(self) -> None:
        super().kill()
        self._work.set()

    def _run_reactor(self) -> None:
        # pynetdicom 3.0's acceptor loop with the 1 ms sleep replaced by a wait for queued work
        self._is_paused = False
        while not self._kill:
            self._work.wait(TICK_SECONDS)
            self._work.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            while not self._kill:
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                LOGGER.info("association aborted by %s",
                            "the network layer" if self.acse.is_aborted("a-p-abort") else "the peer")
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("network timeout reached, aborting the association")
                self.abort()
                self.kill()
                return


def _fast_recv(raw: socket.socket) -> Any:
    """``AssociationSocket.recv`` reading into one buffer instead of 4 KiB appends."""

    def recv(nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        while got < nr_bytes:
            n = raw.recv_into(view[got:], min(nr_bytes - got, _RECV_CHUNK))
            if n == 0:
                view.release()
                del buffer[got:]
                return buffer
            got += n
        view.release()
        return buffer

    return recv


class EventDrivenRequestHandler(RequestHandler):
    """Request handler that builds :class:`_EventDrivenAssociation` acceptors."""

    def _create_association(self) -> Association:
        # pynetdicom 3.0's RequestHandler._create_association with our Association class
        assoc = _EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        sock = AssociationSocket(assoc, client_socket=self.request)
        sock.recv = _fast_recv(self.request)  # type: ignore[method-assign]
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event, bound in self.server._handlers.items():
            if event.is_intervention and bound:
                handler, args = cast("tuple[Any, list[Any] | None]", bound)
                assoc.bind(event, handler, args)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast("list[tuple[Any, list[Any] | None]]", bound):
                    assoc.bind(event, handler, args)
        return assoc
