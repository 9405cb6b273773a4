"""``portico purge [--dry-run] [--json]``: remove what ``storage.retention`` no longer keeps, now.

The service does the same every ``storage.retention.interval_minutes``. ``--dry-run`` says what would
go (and which old studies are kept back, and why) without removing anything. Studies are named by
shortened UID only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from appliance.cli.common import parser, settings_from
from appliance.handoff import short
from appliance.retention import DAY, PurgeReport, Retention, fl_cohort_studies
from appliance.store import Store


def main(argv: Sequence[str]) -> int:
    p = parser("purge", "Remove the studies, results and quarantined files that storage.retention no "
                        "longer keeps.")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true", dest="as_json")
    args = p.parse_args(argv)
    settings = settings_from(args)
    store = Store.from_settings(settings, fsync=False)
    try:
        report = Retention(store, settings.storage.retention, protected=fl_cohort_studies(settings),
                           actor="portico purge").purge(dry_run=args.dry_run)
    finally:
        store.close()
    sys.stdout.write(json.dumps(dataclasses.asdict(report), indent=2) + "\n" if args.as_json else describe(report))
    return 0


def describe(report: PurgeReport) -> str:
    """The report in lines: each study purged, each kept back, the quarantine, the total."""
    verb = "would remove" if report.dry_run else "removed"
    lines = []
    for s in report.studies:
        rows = "; and its index rows" if s.forgotten else ""
        lines.append(f"study {short(s.study_uid)} (finished {s.age / DAY:.1f} days ago): {verb} "
                     f"{s.instances} instance(s), {s.result_files} result file(s), {s.bytes / 2**20:.1f} MB{rows}")
    for k in report.kept:
        lines.append(f"study {short(k.study_uid)}: kept, {k.reason}")
    if report.quarantine_ids:
        why = ", ".join(f"{n} by {reason}" for reason, n in sorted(report.quarantine_reasons.items()))
        lines.append(f"quarantine: {verb} {len(report.quarantine_ids)} file(s) ({why}), "
                     f"{report.quarantine_bytes / 2**20:.1f} MB")
    lines.append(f"{'dry run: ' if report.dry_run else ''}{len(report.studies)} studies, "
                 f"{len(report.quarantine_ids)} quarantined files, {report.bytes / 2**20:.1f} MB "
                 f"{'would be ' if report.dry_run else ''}freed; {len(report.kept)} studies kept back")
    return "\n".join(lines) + "\n"
