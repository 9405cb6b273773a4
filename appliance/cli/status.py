"""``portico status``: what the appliance holds and where each job stands."""

from __future__ import annotations

import json
import sys
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
        summary = store.summary()
    finally:
        store.close()
    if args.as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        for key, value in summary.items():
            sys.stdout.write(f"{key}: {value}\n")
    return 0
