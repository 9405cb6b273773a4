"""``portico fl``: enrol in a federated project, approve jobs, see status, export a global model.

    portico fl enrol KIT                       a startup kit (zip or folder) from the project admin
    portico fl request --project P --site S --org O    distributed provisioning: key + CSR stay here
    portico fl enrol SIGNED.zip --fingerprint SHA256:…  … then the approved, signed zip
    portico fl status [--json]
    portico fl approve JOB | reject JOB --reason TEXT
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

from appliance.audit import AuditEvent, AuditRecord
from appliance.cli.common import parser, settings_from
from appliance.fl import build_supervisor, decide_job, install_candidate, layout_of, refresh_cohorts
from appliance.settings import Settings
from appliance.store import Store
from fl_client.approvals import DecisionKind
from fl_client.errors import FLClientError
from fl_client.kit import install_kit, make_request, package_signed
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
    jobs = status.get("jobs") or {}
    for job_id, job in jobs.items() if isinstance(jobs, dict) else []:
        sys.stdout.write(f"job {job_id}: last round {job.get('last_round')}, final {job.get('final')}, "
                         f"exported {job.get('exported')}\n")
    for pending in status.get("pending_approval") or []:  # type: ignore[attr-defined]
        sys.stdout.write(f"WAITING {pending['job_id']} {pending['name']!r} from {pending['submitter']}: "
                         f"{pending['reason']}\n")


def main(argv: Sequence[str]) -> int:
    p = parser("fl", "Federated learning: enrolment, approvals, status, export.")
    sub = p.add_subparsers(dest="action", required=True)
    enrol = sub.add_parser("enrol", help="install a startup kit (zip or folder) or a signed zip")
    enrol.add_argument("kit", type=Path)
    enrol.add_argument("--fingerprint", help="root CA fingerprint (signed zip from distributed provisioning)")
    req = sub.add_parser("request", help="distributed provisioning: make a key and certificate request")
    req.add_argument("--project", required=True)
    req.add_argument("--site", required=True)
    req.add_argument("--org", required=True)
    st = sub.add_parser("status")
    st.add_argument("--json", action="store_true", dest="as_json")
    ap = sub.add_parser("approve")
    ap.add_argument("job_id")
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
    store = Store(settings.data_dir, fsync=settings.storage.fsync)
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
        if a["fingerprint"]:
            info = package_signed(a["kit"], layout, expected_fingerprint=a["fingerprint"], python=settings.fl.python)
        else:
            info = install_kit(a["kit"], layout, python=settings.fl.python)
        write_policy(settings.fl, layout, settings.models_dir)
        store.record(AuditRecord(AuditEvent.FL_ENROLLED, actor=actor, detail=info.to_json()))
        sys.stdout.write(f"enrolled as site {info.site} of project {info.project} (server {info.server_target}, "
                         f"root CA {info.root_ca_fingerprint})\n")
    elif action == "request":
        path = make_request(layout, project=a["project"], site=a["site"], org=a["org"], python=settings.fl.python)
        sys.stdout.write(f"send this request to the project admin: {path}\n"
                         f"(the private key stays in {path.parent})\n")
    elif action == "status":
        _print_status(site_status(layout), a["as_json"])
    elif action in ("approve", "reject"):
        decision: DecisionKind = "approved" if action == "approve" else "rejected"
        try:
            made = decide_job(settings, store, a["job_id"], decision, actor, a.get("reason") or "")
        except KeyError:
            sys.stderr.write(f"job {a['job_id']} has not asked to run at this site\n")
            return 1
        sys.stdout.write(f"{decision} job {made.job_id} ({made.name!r} from {made.submitter})\n")
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
