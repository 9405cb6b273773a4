"""``portico fl``: enrol in a federated project, approve jobs, see status, export a global model.

    portico fl enrol KIT --fingerprint SHA256:…   a startup kit (zip or folder) from the project admin;
                                               the root CA fingerprint comes out of band
    portico fl request --project P --site S --org O    distributed provisioning: key + CSR stay here
    portico fl enrol SIGNED.zip --fingerprint SHA256:…  … then the approved, signed zip
    portico fl status [--json]
    portico fl inspect JOB_FOLDER              trainer arguments, model, rounds, privacy floor, content hash
    portico fl approve JOB --job FOLDER        (or --content-sha256 H) the approval binds the content
    portico fl reject JOB --reason TEXT
    portico fl cohort refresh [NAME]           select the local training cohort from the store
    portico fl export JOB                      global model → candidate package (then models promote)
    portico fl run                             run only the supervised NVFlare client (no SCP)

This module also wires :mod:`fl_client` to the appliance for ``portico serve``:
:func:`build_supervisor` (store-backed cohort, audit of every FL event, automatic export).
"""

from __future__ import annotations

import getpass
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.audit import AuditEvent, AuditRecord
from appliance.cli.common import parser, settings_from
from appliance.fl import build_supervisor, decide_job, install_candidate, layout_of, refresh_cohorts
from appliance.settings import Settings
from appliance.store import Store
from fl_client.approvals import Approvals, DecisionKind
from fl_client.errors import FLClientError
from fl_client.job_review import review_job, save_review
from fl_client.kit import FINGERPRINT_WAIVER_FLAG, enrolment, install_kit, is_signed_zip, make_request, package_signed
from fl_client.layout import SiteLayout
from fl_client.policy import write_policy
from fl_client.supervisor import site_status
from inference.errors import PackageError

log = logging.getLogger(__name__)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def _print_status(status: dict[str, object], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2, default=str) + "\n")
        return
    for key in ("site", "project", "server", "enrolment_mode", "state", "process", "running_jobs"):
        sys.stdout.write(f"{key}: {status.get(key)}\n")
    privacy = status.get("privacy") or {}
    budget = privacy.get("budget") or {} if isinstance(privacy, dict) else {}
    if budget:
        sys.stdout.write(f"privacy budget of project {budget.get('project')}: epsilon spent "
                         f"{budget.get('epsilon_spent')} of {budget.get('epsilon_budget')} "
                         f"(delta {budget.get('delta')}), "
                         f"{budget.get('rounds_accounted')} round(s) accounted\n")
        if budget.get("exhausted"):
            sys.stdout.write(f"BUDGET SPENT: {budget['exhausted'].get('reason')}\n")
    sys.stdout.write(f"privacy floor: {privacy.get('floor') if isinstance(privacy, dict) else None}\n")
    jobs = status.get("jobs") or {}
    for job_id, job in jobs.items() if isinstance(jobs, dict) else []:
        sys.stdout.write(f"job {job_id}: last round {job.get('last_round')}, final {job.get('final')}, "
                         f"exported {job.get('exported')}\n")
    for pending in status.get("pending_approval") or []:  # type: ignore[attr-defined]
        sys.stdout.write(f"WAITING {pending['job_id']} {pending['name']!r} from {pending['submitter']}: "
                         f"{pending['reason']}\n")


def _print_review(review: dict[str, Any]) -> None:
    """The approval screen: what the job will do with this site's data, and under which floor."""
    out = sys.stdout.write
    out(f"job {review.get('name')!r}: client app {review.get('client_app')}\n")
    trainer = review.get("trainer") or {}
    out(f"  model {trainer.get('model')!r} on cohort {trainer.get('cohort')!r}; rounds {review.get('rounds')}\n")
    out("  trainer: " + ", ".join(f"{k}={v}" for k, v in sorted(trainer.items())) + "\n")
    out("  server: " + ", ".join(f"{k}={v}" for k, v in sorted((review.get("server") or {}).items())) + "\n")
    out("  privacy floor that applies: " + ", ".join(f"{k}={v}" for k, v in sorted(
        (review.get("privacy") or {}).items())) + "\n")
    out(f"  content sha256 (client app): {review.get('client_app_sha256')}\n")
    out(f"  content sha256 (whole job):  {review.get('job_sha256')}\n")
    for problem in review.get("problems") or []:
        out(f"  REFUSED: {problem}\n")


def main(argv: Sequence[str]) -> int:
    p = parser("fl", "Federated learning: enrolment, approvals, status, export.")
    sub = p.add_subparsers(dest="action", required=True)
    enrol = sub.add_parser("enrol", help="install a startup kit (zip or folder) or a signed zip")
    enrol.add_argument("kit", type=Path)
    enrol.add_argument("--fingerprint", help="the project's root CA fingerprint (SHA256:…), received out of band")
    enrol.add_argument(FINGERPRINT_WAIVER_FLAG, action="store_true", dest="fingerprint_waived",
                       help="enrol a kit without a fingerprint: you checked the server by other means (audited)")
    req = sub.add_parser("request", help="distributed provisioning: make a key and certificate request")
    req.add_argument("--project", required=True)
    req.add_argument("--site", required=True)
    req.add_argument("--org", required=True)
    st = sub.add_parser("status")
    st.add_argument("--json", action="store_true", dest="as_json")
    ins = sub.add_parser("inspect", help="what a job folder will do here, and the content hash to approve")
    ins.add_argument("folder", type=Path)
    ins.add_argument("--for", dest="for_job", metavar="JOB_ID",
                     help="keep the review for this waiting job: the dashboard shows it, an approval binds it")
    ins.add_argument("--json", action="store_true", dest="as_json")
    ap = sub.add_parser("approve", help="approve a waiting job's content (shown before it is bound)")
    ap.add_argument("job_id")
    ap.add_argument("--job", type=Path, dest="job_folder", help="the job folder the researchers submitted")
    ap.add_argument("--content-sha256", dest="content_sha256", help="the client app's content hash (fl inspect)")
    rj = sub.add_parser("reject")
    rj.add_argument("job_id")
    rj.add_argument("--reason", required=True)
    co = sub.add_parser("cohort")
    co.add_argument("op", choices=["refresh"])
    co.add_argument("names", nargs="*")
    ex = sub.add_parser("export")
    ex.add_argument("job_id")
    sub.add_parser("run", help="run the supervised NVFlare client in the foreground")
    args = p.parse_args(argv)
    settings = settings_from(args)
    layout = layout_of(settings)
    store = Store.from_settings(settings)
    try:
        return _dispatch(args, settings, layout, store)
    except (FLClientError, PackageError) as exc:
        sys.stderr.write(f"portico fl {args.action}: {exc}\n")
        return 1
    finally:
        store.close()


def _dispatch(args: object, settings: Settings, layout: SiteLayout, store: Store) -> int:
    a = args.__dict__
    action = a["action"]
    actor = _actor()
    if action == "enrol":
        if is_signed_zip(a["kit"]):
            if not a["fingerprint"]:
                sys.stderr.write("portico fl enrol: a signed zip needs --fingerprint SHA256:… (from the project "
                                 "admin, out of band)\n")
                return 1
            info = package_signed(a["kit"], layout, expected_fingerprint=a["fingerprint"], python=settings.fl.python)
        else:
            info = install_kit(a["kit"], layout, python=settings.fl.python, expected_fingerprint=a["fingerprint"],
                               fingerprint_waived=a["fingerprint_waived"])
        write_policy(settings.fl, layout, settings.models_dir)
        if not a["fingerprint"]:
            store.record(AuditRecord(AuditEvent.FL_FINGERPRINT_WAIVED, actor=actor, detail={
                "site": info.site, "project": info.project, "root_ca_fingerprint": info.root_ca_fingerprint}))
        store.record(AuditRecord(AuditEvent.FL_ENROLLED, actor=actor, detail={
            **info.to_json(), "fingerprint_checked": bool(a["fingerprint"])}))
        sys.stdout.write(f"enrolled as site {info.site} of project {info.project} (server {info.server_target}, "
                         f"root CA {info.root_ca_fingerprint})\n")
    elif action == "request":
        path = make_request(layout, project=a["project"], site=a["site"], org=a["org"], python=settings.fl.python)
        sys.stdout.write(f"send this request to the project admin: {path}\n"
                         f"(the private key stays in {path.parent})\n")
    elif action == "status":
        _print_status(site_status(layout, privacy=settings.fl.privacy), a["as_json"])
    elif action == "inspect":
        site = enrolment(layout)
        review = review_job(a["folder"], settings.fl, site.site if site else None, layout=layout,
                            project=site.project if site else None)
        if a.get("for_job"):
            if Approvals(layout).pending_job(a["for_job"]) is None:
                sys.stderr.write(f"job {a['for_job']} is not waiting at this site\n")
                return 1
            save_review(layout, a["for_job"], review)
        if a["as_json"]:
            sys.stdout.write(json.dumps(review.to_json(), indent=2, default=str) + "\n")
        else:
            _print_review(review.to_json())
        return 1 if review.problems else 0
    elif action in ("approve", "reject"):
        decision: DecisionKind = "approved" if action == "approve" else "rejected"
        if decision == "approved" and a.get("job_folder"):
            enrolled = enrolment(layout)
            _print_review(review_job(a["job_folder"], settings.fl, enrolled.site if enrolled else None,
                                     layout=layout, project=enrolled.project if enrolled else None).to_json())
        try:
            made = decide_job(settings, store, a["job_id"], decision, actor, a.get("reason") or "",
                              job_folder=a.get("job_folder"), content_sha256=a.get("content_sha256"))
        except KeyError:
            sys.stderr.write(f"job {a['job_id']} has not asked to run at this site\n")
            return 1
        bound = f", content sha256 {made.client_app_sha256}" if made.client_app_sha256 else ""
        sys.stdout.write(f"{decision} job {made.job_id} ({made.name!r} from {made.submitter}{bound})\n")
    elif action == "cohort":
        for name, count in refresh_cohorts(settings, store, a["names"]).items():
            sys.stdout.write(f"cohort {name}: {count} series\n")
    elif action == "export":
        ref = install_candidate(settings, store, a["job_id"], actor)
        sys.stdout.write(f"installed candidate {ref}; make it active with: portico models promote {ref}\n")
    elif action == "run":
        return _run(settings, store)
    return 0


def _run(settings: Settings, store: Store) -> int:
    supervisor = build_supervisor(settings, store)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    supervisor.start()
    done.wait()
    supervisor.stop()
    return 0
