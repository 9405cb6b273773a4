"""The dashboard's overview: what arrived in the last 24 hours, jobs by state, the outbox per destination, disk.

Cheap enough to poll every few seconds: jobs and outbox are small aggregate queries; the per-hour counts of
the last day scan the instances received since then, so they are computed at most once per
:data:`CHART_SECONDS` per process and shared by every dashboard that polls.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.db import instances, jobs, outbox, studies
from appliance.store import Store

#: hours shown in the chart
HOURS = 24
#: how long one computation of the per-hour counts is reused
CHART_SECONDS = 30.0


@dataclass
class Overview:
    """The overview of one store, with the per-hour counts cached.

    Parameters
    ----------
    store
        The state store.
    data_dir, min_free_bytes
        The data folder whose free space is shown, and the watermark below which the receiver refuses.
    destinations
        The configured destinations: each is shown, with an empty outbox when it has none.
    sessions
        The number of model sessions loaded in this process (a callable; ``None`` where none run here).
    clock
        Seconds since the epoch.
    """

    store: Store
    data_dir: Path
    min_free_bytes: int = 0
    destinations: tuple[str, ...] = ()
    sessions: Callable[[], int] | None = None
    clock: Callable[[], float] = field(default=time.time)
    _chart: tuple[float, dict[str, Any]] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def chart(self) -> dict[str, Any]:
        """Instances and studies received per hour, the last :data:`HOURS` hours (the current one last)."""
        now = self.clock()
        with self._lock:
            if self._chart is not None and now - self._chart[0] < CHART_SECONDS:
                return self._chart[1]
            # whole hours: the last bar is the hour now running
            start = (int(now) // 3600 - HOURS + 1) * 3600
            with self.store.reading() as tx:
                received = instances.received_per_hour(tx, start, HOURS)
                first = studies.first_received_since(tx, start)
            per_study = [0] * HOURS
            for at in first:
                hour = int(at - start) // 3600
                if 0 <= hour < HOURS:
                    per_study[hour] += 1
            chart = {"start": float(start), "hour_seconds": 3600, "instances": received, "studies": per_study}
            self._chart = (now, chart)
            return chart

    def snapshot(self) -> dict[str, Any]:
        """Everything the overview shows, now."""
        with self.store.reading() as tx:
            by_state = jobs.count_by_state(tx)
            depth = outbox.depth_by_destination(tx)
        for name in self.destinations:
            depth.setdefault(name, {"pending": 0, "held": 0, "failed": 0, "oldest_pending": None})
        disk: dict[str, Any] = {"free_bytes": None, "total_bytes": None, "min_free_bytes": self.min_free_bytes}
        try:
            st = os.statvfs(self.data_dir)
            disk.update(free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize)
        except OSError:  # the data folder is gone or unreadable: shown as unknown
            pass
        return {"now": self.clock(), "jobs": by_state, "outbox": dict(sorted(depth.items())), "disk": disk,
                "sessions_loaded": None if self.sessions is None else self.sessions(), "received": self.chart()}
