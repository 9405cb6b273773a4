"""Migration 4: destinations an operator paused (nothing is sent to them until resumed).

One row per paused destination: who paused it, when and why. The outbox's due items
(:func:`appliance.db.outbox.due`) leave out every destination named here, so a paused destination's
items wait in the outbox, keep their attempt counts, and go once it is resumed.
"""

from __future__ import annotations

from appliance.db.ddl import run_script
from appliance.db.engine import Tx

NAME = "destination pauses"

SCRIPT = """
CREATE TABLE IF NOT EXISTS destination_pauses (
    destination TEXT PRIMARY KEY,
    paused_at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


def apply(tx: Tx) -> None:
    run_script(tx, SCRIPT)
