"""``portico demo``: Orthanc + Portico + a phantom study, end to end, then a report."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from appliance.cli.common import parser
from appliance.demo import Demo, format_report
from appliance.logs import configure


def main(argv: Sequence[str]) -> int:
    p = parser("demo", "Run the whole path once on a synthetic CT phantom; Ctrl-C stops everything.")
    p.add_argument("--workdir", type=Path, default=Path(".demo"))
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--no-wait", action="store_true", help="stop after the report even on a terminal")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="model packages to serve (default: the shipped demo model)")
    args = p.parse_args(argv)
    configure(args.log_level, args.json_logs)
    demo = Demo(args.workdir.resolve(), slices=args.slices, show_progress=sys.stdout.isatty())
    if args.models_dir is not None:
        demo.models_dir = args.models_dir.resolve()
    try:
        demo.start()
        report = demo.run_study()
        (args.workdir / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        sys.stdout.write(format_report(report))
        sys.stdout.flush()
        if report.get("failure"):
            return 1
        if sys.stdin.isatty() and not args.no_wait:
            sys.stdout.write("Everything keeps running for you to look. Ctrl-C stops it all.\n")
            sys.stdout.flush()
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
        return 0 if report["seg_and_sr_in_pacs"] else 1
    finally:
        demo.stop()
