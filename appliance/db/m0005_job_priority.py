"""Migration 5: a job's priority, from its rule (``priority`` in the rules file): higher runs first in a queue."""

from __future__ import annotations

from appliance.db.ddl import run_script
from appliance.db.engine import Tx

NAME = "job priority"

SCRIPT = """
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(state, priority, id);
"""


def apply(tx: Tx) -> None:
    run_script(tx, SCRIPT)
