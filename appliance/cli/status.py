"""``portico status``: what the appliance holds and where each job stands."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from appliance.cli.common import parser, settings_from
from appliance.store import Store


def main(argv: Sequence[str]) -> int:
    p = parser("status", "Studies, jobs and outbox at a glance.")
    p.add_argument("--json", action="store_true", dest="as_json")
    args = p.parse_args(argv)
    settings = settings_from(args)
    store = Store.from_settings(settings, fsync=False)
    try:
        summary = store.summary()
    finally:
        store.close()
    if args.as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        for key, value in summary.items():
            if key == "destinations":
                sys.stdout.write(f"destinations:{'' if value else ' (nothing queued)'}\n")
                for line in destination_lines(value, time.time()):
                    sys.stdout.write(f"  {line}\n")
            else:
                sys.stdout.write(f"{key}: {value}\n")
    return 0


def destination_lines(destinations: dict[str, dict[str, Any]], now: float) -> list[str]:
    """One line per destination: outbox counts, its last error and when it is tried again."""
    lines = []
    for name, d in destinations.items():
        counts = ", ".join(f"{n} {state}" for state, n in sorted(d["states"].items()))
        line = f"{name}: {counts}"
        if d.get("last_error"):
            line += f"; last error: {d['last_error']}"
        at = d.get("next_retry_at")
        if at is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
            line += f"; next retry {when} (in {max(0, round(at - now))} s)"
        lines.append(line)
    return lines
