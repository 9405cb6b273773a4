"""``portico status``: what the appliance holds and where each job stands."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence

from appliance.cli.common import parser, settings_from
from appliance.store import Store


def main(argv: Sequence[str]) -> int:
    p = parser("status", "Studies, jobs and outbox at a glance.")
    p.add_argument("--json", action="store_true", dest="as_json")
    args = p.parse_args(argv)
    settings = settings_from(args)
    store = Store(settings.data_dir, fsync=False)
    try:
        jobs = store.jobs()
        outbox = store.outbox()
        summary = {
            "instances": store.instance_count(),
            "quarantined": len(store.quarantined()),
            "jobs": dict(Counter(str(j.state) for j in jobs)),
            "outbox": dict(Counter(str(o["state"]) for o in outbox)),
            "recent_jobs": [{"id": j.id, "model": j.model, "state": str(j.state), "provider": j.provider,
                             "error": j.error} for j in jobs[-10:]],
        }
    finally:
        store.close()
    if args.as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        for key, value in summary.items():
            sys.stdout.write(f"{key}: {value}\n")
    return 0
