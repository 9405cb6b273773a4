"""Migration 3: instances by time received (the dashboard's per-hour chart read every instance without it)."""

from __future__ import annotations

from appliance.db.ddl import run_script
from appliance.db.engine import Tx

NAME = "instances by time received"

SCRIPT = """
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);
"""


def apply(tx: Tx) -> None:
    run_script(tx, SCRIPT)
