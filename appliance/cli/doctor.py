"""``portico doctor``: check this site's set-up and say what to fix; exits 1 when a check fails."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from appliance.cli.common import parser, settings_from
from appliance.doctor import Finding, Status, failed, run_checks
from appliance.settings import config_path
from dicom_router.dispatch import echo
from dicom_router.settings import DicomTlsSettings, DimseDestination

_LABELS = {Status.OK: "ok", Status.WARN: "WARN", Status.FAIL: "FAIL"}


def _echo(destination: DimseDestination, calling_ae: str, timeout: float, tls: DicomTlsSettings | None,
          event_driven: bool) -> bool:
    return echo(destination, calling_ae, timeout, tls=tls, event_driven=event_driven)


def main(argv: Sequence[str]) -> int:
    p = parser("doctor", "Check ports, certificates, disk, permissions, models and peers; print what to fix.")
    p.add_argument("--no-network", action="store_true", help="skip the C-ECHO and connection checks of peers")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per peer (default 5)")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    args = p.parse_args(argv)
    settings = settings_from(args)
    findings = run_checks(settings, config_path(args.config), _echo, network=not args.no_network,
                          timeout=args.timeout)
    _print(findings)
    return 1 if failed(findings, strict=args.strict) else 0


def _print(findings: list[Finding]) -> None:
    out = sys.stdout
    for f in findings:
        out.write(f"{_LABELS[f.status]:<5} {f.check:<12} {f.message}\n")
        if f.fix and f.status is not Status.OK:
            out.write(f"{'':<5} {'':<12} fix: {f.fix}\n")
    fails = sum(f.status is Status.FAIL for f in findings)
    warns = sum(f.status is Status.WARN for f in findings)
    verdict = "nothing to fix" if not fails and not warns else f"{fails} to fix, {warns} to look at"
    out.write(f"\n{len(findings)} checks: {verdict}\n")
