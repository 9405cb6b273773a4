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
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

import pydicom

from appliance.audit import AuditEvent, AuditRecord
from appliance.cli.common import parser, settings_from
from appliance.models import ModelRegistry
from appliance.settings import Settings
from appliance.store import Store
from fl_client.approvals import Approvals, Decision, DecisionKind
from fl_client.dataset import CandidateSeries, build_index
from fl_client.errors import FLClientError
from fl_client.kit import install_kit, make_request, package_signed
from fl_client.layout import SiteLayout, read_json, write_json
from fl_client.policy import write_policy
from fl_client.supervisor import FLEvent, FLEventKind, FLSupervisor, site_status
from inference.errors import PackageError
from inference.packages import load_package

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")

_EVENT_AUDIT = {
    FLEventKind.STARTED: AuditEvent.FL_CLIENT, FLEventKind.EXITED: AuditEvent.FL_CLIENT,
    FLEventKind.STOPPED: AuditEvent.FL_CLIENT, FLEventKind.JOB_WAITING: AuditEvent.FL_JOB_WAITING,
    FLEventKind.JOB_STARTED: AuditEvent.FL_CLIENT, FLEventKind.ROUND: AuditEvent.FL_ROUND,
    FLEventKind.JOB_FINISHED: AuditEvent.FL_JOB_FINISHED, FLEventKind.EXPORTED: AuditEvent.FL_EXPORTED,
    FLEventKind.EXPORT_FAILED: AuditEvent.FL_EXPORTED,
}


def layout_of(settings: Settings) -> SiteLayout:
    return SiteLayout(settings.data_dir / settings.fl.workspace)


class StoreStudySource:
    """The store's image series, each with the SEG instances stored alongside that reference it.

    SEGs produced by Portico and approved in review join here once review records approvals.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def series(self) -> Iterable[CandidateSeries]:
        # the store has no public series listing yet; one read-only query over its index
        rows = self.store._query(
            "SELECT study_uid, series_uid, sop_class_uid, path FROM instances ORDER BY study_uid, series_uid, path")
        images: dict[tuple[str, str], list[Path]] = {}
        segs: dict[str, list[Path]] = {}
        for r in rows:
            if r["sop_class_uid"] in SEG_SOP_CLASSES:
                ds = pydicom.dcmread(r["path"], stop_before_pixels=True)
                for ref in getattr(ds, "ReferencedSeriesSequence", []):
                    segs.setdefault(str(ref.SeriesInstanceUID), []).append(Path(r["path"]))
            else:
                images.setdefault((r["study_uid"], r["series_uid"]), []).append(Path(r["path"]))
        for (study_uid, series_uid), paths in images.items():
            header = pydicom.dcmread(paths[0], stop_before_pixels=True)
            yield CandidateSeries(study_uid, series_uid, header, paths, segs.get(series_uid, []))


def refresh_cohorts(settings: Settings, store: Store, names: Sequence[str] = ()) -> dict[str, int]:
    """Rebuild the cohort index files from the store; series count per cohort."""
    layout = layout_of(settings)
    layout.ensure()
    counts = {}
    for name, rule in settings.fl.cohorts.items():
        if names and name not in names:
            continue
        index = build_index(name, rule, StoreStudySource(store), layout.cohorts / f"{name}.json")
        counts[name] = len(index.series)
    return counts


def audit_fl_event(store: Store, event: FLEvent) -> None:
    detail = {"kind": str(event.kind), **event.detail}
    if event.job_id:
        detail["fl_job_id"] = event.job_id
    store.record(AuditRecord(_EVENT_AUDIT[event.kind], actor="fl", detail=detail))


def install_candidate(settings: Settings, store: Store, job_id: str, actor: str) -> str:
    """Export job ``job_id`` and install it as a candidate version; returns ``name@version``."""
    # torch and ONNX are loaded only when a model is exported, not by every appliance process
    from fl_client.export import export_candidate

    layout = layout_of(settings)
    result = export_candidate(layout, job_id, settings.models_dir)
    registry = ModelRegistry.from_settings(settings, audit=store.record)
    state, _ = registry.install(load_package(result.package.root), actor, source=f"fl:{job_id}")
    ref = result.package.ref
    exported = read_json(layout.job_dir(job_id) / "exported.json", {}) or {}
    write_json(layout.job_dir(job_id) / "exported.json", {**exported, "installed": ref, "role": str(state.role)})
    store.record(AuditRecord(AuditEvent.FL_EXPORTED, actor=actor, detail={
        "fl_job_id": job_id, "package": ref, "role": str(state.role),
        "onnx_max_abs_diff": result.max_abs_diff}))
    return ref


def decide_job(settings: Settings, store: Store, job_id: str, decision: DecisionKind, actor: str,
               reason: str = "") -> Decision:
    """Approve or reject a job waiting at this site, audited (for the CLI and the API).

    Raises
    ------
    KeyError
        When the job has not asked to run here.
    """
    made = Approvals(layout_of(settings)).decide(job_id, decision, actor=actor, reason=reason)
    event = AuditEvent.FL_JOB_APPROVED if decision == "approved" else AuditEvent.FL_JOB_REJECTED
    store.record(AuditRecord(event, actor=actor, detail={"fl_job_id": made.job_id, "name": made.name,
                                                         "submitter": made.submitter, "reason": made.reason}))
    return made


def build_supervisor(settings: Settings, store: Store) -> FLSupervisor:
    """The supervisor ``portico serve`` runs: audited events, store cohorts, automatic export."""
    def on_event(event: FLEvent) -> None:
        audit_fl_event(store, event)

    def on_job_finished(job_id: str) -> None:
        ref = install_candidate(settings, store, job_id, actor="fl")
        log.info("job %s exported as candidate %s; promote with: portico models promote", job_id, ref)

    refresh_cohorts(settings, store)
    return FLSupervisor(settings.fl, settings.data_dir, models_dir=settings.models_dir, on_event=on_event,
                        on_job_finished=on_job_finished)


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
