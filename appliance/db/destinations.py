"""The ``destination_pauses`` table: destinations an operator paused, by whom, when and why."""

from __future__ import annotations

from typing import Any

from appliance.db.engine import Tx


def pause(tx: Tx, destination: str, actor: str, reason: str, now: float) -> bool:
    """Pause ``destination``; ``False`` when it is paused already (the first pause stands)."""
    return tx.execute("INSERT INTO destination_pauses (destination, paused_at, actor, reason) VALUES (?,?,?,?) "
                      "ON CONFLICT (destination) DO NOTHING", (destination, now, actor, reason)).rowcount > 0


def resume(tx: Tx, destination: str) -> dict[str, Any] | None:
    """Resume ``destination``; returns the pause it ended (``None``: it was not paused)."""
    row = tx.one("SELECT * FROM destination_pauses WHERE destination = ?", (destination,))
    if row is None:
        return None
    tx.execute("DELETE FROM destination_pauses WHERE destination = ?", (destination,))
    return dict(row)


def paused(tx: Tx) -> dict[str, dict[str, Any]]:
    """Every paused destination: when, by whom and why."""
    return {str(r["destination"]): {"paused_at": float(r["paused_at"]), "actor": str(r["actor"]),
                                    "reason": str(r["reason"])}
            for r in tx.execute("SELECT * FROM destination_pauses ORDER BY destination")}
