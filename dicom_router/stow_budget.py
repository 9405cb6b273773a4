"""How much one STOW-RS sender may have quarantined per hour: a junk flood keeps a few samples, not every part.

A quarantined part is a file and an audit row. A sender that sends thousands of bad parts (broken
or hostile) gets the first ones kept for inspection; beyond its budget its bad parts are still
refused, part by part, but not kept, and that is said once per episode (the log here, the audit
through ``on_spent``), not once per part.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from dicom_router.settings import RouterSettings

log = logging.getLogger(__name__)


class QuarantineBudget:
    """Quarantined STOW-RS bytes and parts per sender over a sliding hour; one per service, thread-safe.

    Parameters
    ----------
    max_bytes, max_parts
        What one sender may have quarantined within ``window`` seconds.
    on_spent
        Called with the sender's name when its budget becomes spent (once per episode: again only
        after a part of that sender has been kept since); the appliance audits it.
    """

    def __init__(self, max_bytes: int, max_parts: int, *, window: float = 3600.0,
                 on_spent: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._max_parts = max_parts
        self._window = window
        self._on_spent = on_spent
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[str, deque[tuple[float, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._spent: set[str] = set()

    @classmethod
    def from_settings(cls, settings: RouterSettings, on_spent: Callable[[str], None] | None = None
                      ) -> QuarantineBudget:
        return cls(settings.stow_quarantine_mb_per_hour * 2**20, settings.stow_quarantine_parts_per_hour,
                   on_spent=on_spent)

    def take(self, sender: str, size: int) -> bool:
        """Whether ``sender`` may have one more part of ``size`` bytes quarantined; counts it if so."""
        now = self._clock()
        with self._lock:
            kept = self._kept.setdefault(sender, deque())
            while kept and kept[0][0] <= now - self._window:
                self._bytes[sender] -= kept.popleft()[1]
            used = self._bytes.get(sender, 0)
            if len(kept) < self._max_parts and used + size <= self._max_bytes:
                kept.append((now, size))
                self._bytes[sender] = used + size
                self._spent.discard(sender)
                return True
            newly_spent = sender not in self._spent
            self._spent.add(sender)
        if newly_spent:
            log.warning("STOW-RS from %s: quarantine budget spent (%d parts, %d MB within the hour); further "
                        "bad parts are refused and not kept", sender, len(kept), used // 2**20)
            if self._on_spent is not None:
                self._on_spent(sender)
        return False
