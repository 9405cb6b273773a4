"""``portico review``: results held for a reviewer; approve (send them) or reject (never send them).

    portico review list [--state held|approved|rejected|unreviewed|all] [--json]
    portico review show JOB [--json]
    portico review approve JOB [--reason TEXT] [--retrospective]
    portico review reject JOB --reason TEXT [--retrospective]
    portico review withdraw JOB --reason TEXT

``withdraw`` takes back results already sent: every destination that received them gets an IHE IOCM
Key Object Selection "Rejected for Quality Reasons" referencing what it got (:mod:`appliance.withdraw`).

The CLI runs on the appliance as an operating-system user: a decision is recorded (and audited) as
``cli:<login name>``, never as a name typed on the command line. People review as themselves through
the dashboard or the API (``portico users``).

``--retrospective`` decides on results that were not held (they went out when the job finished):
approving makes its SEG a training label, rejecting keeps it out of training and stops what is not
sent yet. Output names studies by shortened UID only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from appliance.cli.common import also_after, cli_actor, local_time, parser, settings_from
from appliance.handoff import short
from appliance.review import Outcome, Review, ReviewError, Reviews, ReviewState, describe
from appliance.store import Store
from appliance.withdraw import Withdrawal, withdraw

_STATES = {"all": None, **{s.lower(): s for s in ReviewState}}




def _as_json(r: Review, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": r.job.id, "state": str(r.state), "held": r.held, "study_uid": r.job.study_uid,
        "series_uid": r.job.series_uid, "model": r.job.model, "model_version": r.job.model_version,
        "finished": r.job.updated, "reviewer": r.reviewer, "reason": r.reason, "decided_at": r.decided_at}
    if full:
        out |= {"measurements": r.measurements(), "outbox": r.outbox,
                "results": [{"kind": f.kind, "sop_instance_uid": f.sop_instance_uid, "path": str(f.path)}
                            for f in r.results]}
    return out


def _show(r: Review) -> str:
    job = r.job
    refs = sorted({str(f.detail["model"]) for f in r.results if f.detail.get("model")})
    lines = [
        f"job {job.id}: {r.state}" + (" (held for review)" if r.state is ReviewState.HELD else ""),
        f"study   {short(job.study_uid)}  series {short(job.series_uid)}  run {job.run_version}",
        f"model   {', '.join(refs) or job.model}  (rule {job.rule}, {job.provider or '-'})",
        f"done    {local_time(job.updated)}",
    ]
    if r.decided_at is not None:
        how = "held" if r.held else "retrospective"
        lines.append(f"decided {local_time(r.decided_at)} by {r.reviewer} via {r.via} ({how})"
                     + (f": {r.reason}" if r.reason else ""))
    if r.outbox:
        lines.append("outbox  " + ", ".join(f"{n} {state}" for state, n in sorted(r.outbox.items())))
    measurements = r.measurements()
    if measurements:
        lines.append("measurements")
        for m in measurements:
            mean = f", mean {m['mean']:.1f}" if m.get("mean") is not None else ""
            lines.append(f"  {m.get('name', m.get('label'))}: {float(m.get('volume_ml', 0.0)):.1f} ml{mean}")
    lines.append("files")
    lines += [f"  {f.kind:<4} {short(f.sop_instance_uid)}  {f.path}" for f in r.results]
    return "\n".join(lines)


def _decided(o: Outcome) -> str:
    verb = "approved" if o.state is ReviewState.APPROVED else "rejected"
    if o.held:
        what = f"{o.released} item(s) released to the destinations" if verb == "approved" \
            else f"{o.cancelled} item(s) cancelled, never sent"
    else:
        what = f"retrospective; {o.already_sent} item(s) already sent" + \
            (f", {o.cancelled} not yet sent cancelled" if o.cancelled else "")
    return f"{verb} job {o.job_id}: {what}"


def _withdrawn(w: Withdrawal) -> str:
    lines = [f"withdrew job {w.job_id}: rejection note queued to {len(w.notes)} destination(s)"
             + (f", {w.cancelled} item(s) not yet sent cancelled" if w.cancelled else "")]
    lines += [f"  {d}: note {short(uid)} rejects {len(w.rejected[d])} instance(s)"
              for d, uid in sorted(w.notes.items())]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = parser("review", "Results held for review: list, show, approve, reject; withdraw what was sent.")
    sub = p.add_subparsers(dest="action", required=True)
    ls = also_after(sub.add_parser("list", help="jobs by review state (default: held, waiting for a reviewer)"))
    ls.add_argument("--state", choices=list(_STATES), default="held")
    ls.add_argument("--json", action="store_true", dest="as_json")
    sh = also_after(sub.add_parser("show", help="one job: study, model, measurements, files, outbox"))
    sh.add_argument("job_id", type=int)
    sh.add_argument("--json", action="store_true", dest="as_json")
    for name, needs_reason in (("approve", False), ("reject", True)):
        d = also_after(sub.add_parser(name, help=f"{name} a job's results"))
        d.add_argument("job_id", type=int)
        d.add_argument("--reason", required=needs_reason, default="")
        d.add_argument("--retrospective", action="store_true",
                       help="decide on results that were not held (already released)")
    wd = also_after(sub.add_parser("withdraw", help="take back results already sent (IOCM rejection note)"))
    wd.add_argument("job_id", type=int)
    wd.add_argument("--reason", required=True)
    args = p.parse_args(argv)
    settings = settings_from(args)
    store = Store.from_settings(settings)
    try:
        reviews = Reviews(store, settings.review)
        if args.action == "list":
            found = reviews.find(_STATES[args.state])
            if args.as_json:
                sys.stdout.write(json.dumps([_as_json(r, False) for r in found], indent=2) + "\n")
            else:
                sys.stdout.write("".join(describe(r) + "\n" for r in found) or f"no {args.state} jobs\n")
        elif args.action == "show":
            review = reviews.get(args.job_id)
            sys.stdout.write((json.dumps(_as_json(review, True), indent=2) if args.as_json else _show(review))
                             + "\n")
        elif args.action == "withdraw":
            sys.stdout.write(_withdrawn(withdraw(store, settings, args.job_id, cli_actor(), args.reason, via="cli"))
                             + "\n")
        else:
            decide = reviews.approve if args.action == "approve" else reviews.reject
            outcome = decide(args.job_id, cli_actor(), args.reason, via="cli", retrospective=args.retrospective)
            sys.stdout.write(_decided(outcome) + "\n")
    except (ReviewError, ValueError) as exc:
        sys.stderr.write(f"portico review {args.action}: {exc}\n")
        return 1
    finally:
        store.close()
    return 0
