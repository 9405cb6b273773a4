"""Liveness and readiness of one Portico process, for ``/health/live`` and ``/health/ready``.

*Live*: the process answers HTTP (a supervisor restarts it when not). *Ready*: it can take work now: the
database answers, the data folder has more free space than ``storage.min_free_mb`` (below it the SCP
answers 0xA700), and each listener this process runs (the DICOM SCP) is listening. A load balancer sends
new work only to a ready process. Messages are value-free: no path beyond the setting's name, no UID.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.store import Store

log = logging.getLogger(__name__)

MIB = 2**20


@dataclass(frozen=True)
class Check:
    """One readiness check's answer."""

    name: str
    ok: bool
    detail: str


@dataclass
class Readiness:
    """The checks that decide whether this process is ready.

    Parameters
    ----------
    store
        The state store; reachable when a primary-key lookup answers.
    data_dir
        The data folder whose free space is checked.
    min_free_bytes
        The watermark (``storage.min_free_mb``): ready only above it.
    listeners
        Name → whether that listener is up now (``{"scp": service.scp.is_running}``).
    """

    store: Store
    data_dir: Path
    min_free_bytes: int
    listeners: Mapping[str, Callable[[], bool]] = field(default_factory=dict)

    def checks(self) -> list[Check]:
        found = [self._database(), disk_check(self.data_dir, self.min_free_bytes)]
        for name, up in self.listeners.items():
            try:
                listening = up()
            except Exception:  # a listener that cannot even say is not ready
                listening = False
            found.append(Check(name, listening, "listening" if listening else "not listening"))
        return found

    def _database(self) -> Check:
        try:
            # the cheapest query the store answers (a primary-key lookup); TODO(appliance.db): a ping()
            self.store.ping()
        except Exception as exc:
            log.warning("readiness: the database did not answer (%s)", type(exc).__name__)
            return Check("database", False, f"not reachable ({type(exc).__name__})")
        return Check("database", True, "reachable")


def disk_check(data_dir: Path, min_free_bytes: int) -> Check:
    """Whether the data folder has more than ``min_free_bytes`` free (and at least one byte)."""
    try:
        st = os.statvfs(data_dir)
    except OSError as exc:
        return Check("disk", False, f"data folder not readable ({exc.strerror or type(exc).__name__})")
    free = st.f_bavail * st.f_frsize
    if free <= 0 or free < min_free_bytes:
        return Check("disk", False, f"{free // MIB} MB free, below storage.min_free_mb ({min_free_bytes // MIB} MB)")
    return Check("disk", True, f"{free // MIB} MB free (storage.min_free_mb: {min_free_bytes // MIB} MB)")
