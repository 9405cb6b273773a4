"""pynetdicom 3.0.4's pause-handshake race, reproduced deterministically, and our reactor's fix.

A ``send_*()`` method pauses the association reactor by clearing ``_reactor_checkpoint`` and waiting
for ``_is_paused``. The stock reactor sets ``_is_paused = True``, waits on the checkpoint, then sets
``_is_paused = False``: a sender that clears the checkpoint after the wait returned but before that
last assignment sees a paused reactor and sends its request, while the reactor goes on to take the
response off the DIMSE queue ("Received unexpected C-ECHO service message") and the sender waits for
it until the DIMSE timeout, then aborts.

Here the sender is pynetdicom's own ``send_c_echo``. The interleaving is forced with events, not
timing: the reactor's checkpoint wait is held in that window until the sender has sent its request,
and the sender's wait for the response is held until the reactor has either taken a message or
paused again. The fix offered upstream is docs/upstream/pynetdicom-pause-race.patch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom._globals import MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router import reactor

TIMEOUT = 10.0


@dataclass
class Outcome:
    status: Dataset | None = None
    reactor_took: list[Any] = field(default_factory=list)
    sender_saw_paused: bool | None = None
    reactor_paused_again: bool = False


def _race(assoc: Association) -> Outcome:
    """Run ``assoc``'s reactor and a ``send_c_echo`` through the racy interleaving."""
    outcome = Outcome()
    cx = build_context(Verification)
    cx._as_scu = True
    cx._as_scp = False
    cx.context_id = 1
    assoc._accepted_cx = {1: cx}
    assoc.is_established = True

    in_window = threading.Event()  # the reactor's first checkpoint wait has returned
    request_sent = threading.Event()  # the sender saw a paused reactor and sent its request
    decided = threading.Event()  # the reactor took a message off the queue, or paused again
    threads: dict[str, threading.Thread] = {}

    checkpoint = assoc._reactor_checkpoint
    checkpoint_wait = checkpoint.wait
    waits = 0

    def reactor_wait(timeout: float | None = None) -> bool:
        nonlocal waits
        waits += 1
        if waits > 1:
            outcome.reactor_paused_again = True
            decided.set()  # pausing again: whatever the sender does now is safe
        result = checkpoint_wait(timeout)
        if waits == 1:
            in_window.set()
            request_sent.wait(TIMEOUT)
        return result

    checkpoint.wait = reactor_wait  # type: ignore[method-assign]

    dimse = assoc.dimse
    dimse_get_msg = dimse.get_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        # the sender got past its pause handshake; the peer's response is on its way
        outcome.sender_saw_paused = assoc._is_paused
        response = C_ECHO()
        response.MessageIDBeingRespondedTo = primitive.MessageID
        response.AffectedSOPClassUID = Verification
        response.Status = 0x0000
        dimse.msg_queue.put((context_id, response))
        request_sent.set()

    def get_msg(block: bool = False) -> Any:
        if threading.current_thread() is threads["sender"]:
            assert decided.wait(TIMEOUT), "the reactor neither took a message nor paused"
            return dimse_get_msg(block=False)  # the response is queued by now, or it is gone
        taken = dimse_get_msg(block)
        if taken[1] is not None:
            outcome.reactor_took.append(taken[1])
        decided.set()
        return taken

    dimse.send_msg = send_msg  # type: ignore[method-assign]
    dimse.get_msg = get_msg  # type: ignore[method-assign]

    def run_reactor() -> None:
        try:
            assoc._run_reactor()
        finally:
            decided.set()  # a reactor that stopped takes nothing more

    def sender() -> None:
        outcome.status = assoc.send_c_echo()

    threads["reactor"] = threading.Thread(target=run_reactor, daemon=True, name="reactor")
    threads["sender"] = threading.Thread(target=sender, daemon=True, name="sender")
    threads["reactor"].start()
    assert in_window.wait(TIMEOUT), "the reactor never waited on its checkpoint"
    threads["sender"].start()
    for thread in threads.values():
        thread.join(TIMEOUT)
        assert not thread.is_alive(), f"the {thread.name} thread is stuck"
    return outcome


@pytest.fixture
def event_driven() -> Iterator[reactor.EventDrivenAssociation]:
    association = reactor.EventDrivenAssociation(AE(ae_title="T"), MODE_REQUESTOR)
    yield association
    dul = association.dul
    assert isinstance(dul, reactor._EventDrivenDUL)
    # the DUL thread never ran, so its reactor never closed the wake-up pipe
    for fd in (dul._wake_r, dul._wake_w):
        os.close(fd)


def test_stock_reactor_takes_the_senders_response(caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom 3.0.4 as shipped: the bug that the upstream patch fixes.

    When pynetdicom takes the fix this test fails: delete it with the patch (the guard test on
    ``Association._run_reactor`` will have asked for a look at the reactor by then).
    """
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        outcome = _race(Association(AE(ae_title="T"), MODE_REQUESTOR))
    assert outcome.sender_saw_paused is True  # the sender went ahead...
    assert not outcome.reactor_paused_again
    assert [type(msg) for msg in outcome.reactor_took] == [C_ECHO]  # ...and the reactor took its response
    assert "Received unexpected C-ECHO service message" in caplog.text
    # no response for send_c_echo: on a live association it waits out the DIMSE timeout and aborts
    assert outcome.status == Dataset()


def test_event_driven_reactor_pauses_again(event_driven: reactor.EventDrivenAssociation,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        outcome = _race(event_driven)
    assert outcome.sender_saw_paused is True
    assert outcome.reactor_paused_again  # _pause_point saw the cleared checkpoint
    assert outcome.reactor_took == []
    assert "unexpected" not in caplog.text
    assert outcome.status is not None
    assert outcome.status.Status == 0x0000
    assert not event_driven.is_aborted
