"""Migration 2: jobs carry a lease (who runs them, until when) and their progress.

Several workers (``portico work``, one per GPU or machine) claim jobs from one database: a claimed job's
``lease_owner`` names the worker (host and process), ``lease_expires`` is renewed by its heartbeat, and a
job whose lease ran out goes back to the queue (:meth:`appliance.store.Store.reap_expired_leases`).
``progress_done``/``progress_total`` are the slices inferred so far, for ``make demo`` and the dashboard.
"""

from __future__ import annotations

from appliance.db.ddl import run_script
from appliance.db.engine import Tx

NAME = "job leases and progress"

SCRIPT = """
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN progress_done INTEGER;
ALTER TABLE jobs ADD COLUMN progress_total INTEGER;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_attempt_at);
"""


def apply(tx: Tx) -> None:
    run_script(tx, SCRIPT)
