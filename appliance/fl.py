"""Federated learning wired to the appliance: store-backed cohorts, audited events, candidate export.

Used by ``portico serve`` (the supervised NVFlare client), ``portico fl`` and the API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pydicom

from appliance.audit import AuditEvent, AuditRecord
from appliance.models import ModelRegistry
from appliance.review import Reviews
from appliance.settings import ReviewSettings, Settings
from appliance.store import Store
from fl_client.approvals import Approvals, Decision, DecisionKind
from fl_client.box import FLUser, box_user, stage_cohort
from fl_client.dataset import CandidateSeries, build_index
from fl_client.errors import BoxError, PolicyError
from fl_client.job_review import review_job, review_trainer, saved_review
from fl_client.kit import enrolment
from fl_client.layout import SiteLayout, read_json, write_json
from fl_client.policy import floor_of_privacy
from fl_client.supervisor import FLEvent, FLEventKind, FLSupervisor
from inference.packages import load_package

log = logging.getLogger(__name__)

SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")

_EVENT_AUDIT = {
    FLEventKind.STARTED: AuditEvent.FL_CLIENT, FLEventKind.EXITED: AuditEvent.FL_CLIENT,
    FLEventKind.STOPPED: AuditEvent.FL_CLIENT, FLEventKind.JOB_WAITING: AuditEvent.FL_JOB_WAITING,
    FLEventKind.JOB_STARTED: AuditEvent.FL_CLIENT, FLEventKind.ROUND: AuditEvent.FL_ROUND,
    FLEventKind.JOB_FINISHED: AuditEvent.FL_JOB_FINISHED, FLEventKind.EXPORTED: AuditEvent.FL_EXPORTED,
    FLEventKind.EXPORT_FAILED: AuditEvent.FL_EXPORTED, FLEventKind.JOB_REFUSED: AuditEvent.FL_JOB_REJECTED,
    FLEventKind.PRIVACY_BUDGET_SPENT: AuditEvent.FL_PRIVACY_BUDGET_SPENT,
}


def layout_of(settings: Settings) -> SiteLayout:
    return SiteLayout(settings.data_dir / settings.fl.workspace)


class StoreStudySource:
    """The store's image series, each with its imported SEGs and the approved SEGs Portico made on it.

    Imported SEGs are stored instances that reference the series; approved ones are Portico's SEG
    results of jobs on the series that a reviewer approved (:mod:`appliance.review`). Portico's own
    results never come in as stored instances (a PACS echoing one back is not indexed), so an
    unreviewed or rejected Portico SEG is never offered as a label.
    """

    def __init__(self, store: Store, reviews: Reviews | None = None) -> None:
        self.store = store
        self.reviews = reviews or Reviews(store, ReviewSettings())

    def series(self) -> Iterable[CandidateSeries]:
        rows = self.store.instance_index()
        images: dict[tuple[str, str], list[Path]] = {}
        segs: dict[str, list[Path]] = {}
        for r in rows:
            if r["sop_class_uid"] in SEG_SOP_CLASSES:
                ds = pydicom.dcmread(r["path"], stop_before_pixels=True)
                for ref in getattr(ds, "ReferencedSeriesSequence", []):
                    segs.setdefault(str(ref.SeriesInstanceUID), []).append(Path(r["path"]))
            else:
                images.setdefault((r["study_uid"], r["series_uid"]), []).append(Path(r["path"]))
        approved = {(s.study_uid, s.series_uid): [s.path] for s in self.reviews.approved_segs()}
        for (study_uid, series_uid), paths in images.items():
            header = pydicom.dcmread(paths[0], stop_before_pixels=True)
            yield CandidateSeries(study_uid, series_uid, header, paths, segs.get(series_uid, []),
                                  approved.get((study_uid, series_uid), []))


def refresh_cohorts(settings: Settings, store: Store, names: Sequence[str] = ()) -> dict[str, int]:
    """Rebuild the cohort index files from the store; series count per cohort."""
    layout = layout_of(settings)
    layout.ensure()
    user = fl_user(settings)
    counts = {}
    for name, rule in settings.fl.cohorts.items():
        if names and name not in names:
            continue
        out = layout.cohorts / f"{name}.json"
        index = build_index(name, rule, StoreStudySource(store, Reviews(store, settings.review)), out)
        if user is not None:
            # the FL user reads copies in its own folder, never the store's owner-only files (fl_client.box)
            staged = stage_cohort(index, layout.cohorts / f"{name}.files", user, base=settings.data_dir)
            write_json(out, staged.model_dump(mode="json"))
        counts[name] = len(index.series)
    return counts


def fl_user(settings: Settings) -> FLUser | None:
    """The FL user when NVFlare will run boxed; None otherwise, also when that user is missing (the
    supervisor then refuses to start, with the reason)."""
    try:
        return box_user(settings.fl.run_as)
    except BoxError:
        return None


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
    registry = ModelRegistry.from_settings(settings, audit=store.record, database=store.db)
    state, _ = registry.install(load_package(result.package.root), actor, source=f"fl:{job_id}")
    ref = result.package.ref
    exported = read_json(layout.job_dir(job_id) / "exported.json", {}) or {}
    write_json(layout.job_dir(job_id) / "exported.json", {**exported, "installed": ref, "role": str(state.role)})
    store.record(AuditRecord(AuditEvent.FL_EXPORTED, actor=actor, detail={
        "fl_job_id": job_id, "package": ref, "role": str(state.role),
        "onnx_max_abs_diff": result.max_abs_diff}))
    return ref


def decide_job(settings: Settings, store: Store, job_id: str, decision: DecisionKind, actor: str,
               reason: str = "", *, job_folder: Path | None = None, content_sha256: str | None = None) -> Decision:
    """Approve or reject a job waiting at this site, audited (for the CLI and the API).

    An approval binds the content of the job's client app: reviewed from ``job_folder`` (the folder the
    researchers submitted), or given as ``content_sha256`` (what ``portico fl inspect`` or the pending
    job's deployed content showed). A job deployed with other content does not start.

    Raises
    ------
    KeyError
        When the job has not asked to run here.
    PolicyError
        When an approval names no content, or the content breaks the site's floor or policy.
    """
    layout = layout_of(settings)
    approvals = Approvals(layout)
    pending = approvals.pending_job(job_id)
    if pending is None and approvals.decision(job_id) is None:
        raise KeyError(job_id)
    review: dict[str, Any] = {}
    sha = ""
    if decision == "approved":
        info = enrolment(layout)
        if job_folder is not None:
            reviewed = review_job(job_folder, settings.fl, info.site if info else None, layout=layout,
                                  project=info.project if info else None)
            if reviewed.problems:
                raise PolicyError("not approved: " + "; ".join(reviewed.problems))
            earlier = approvals.decision(job_id)
            known = pending.name if pending else (earlier.name if earlier else "")
            if known and reviewed.name != known:
                raise PolicyError(f"the folder is job {reviewed.name!r}, job {job_id} is {known!r}")
            if content_sha256 and content_sha256 != reviewed.client_app_sha256:
                raise PolicyError("the content hash given is not the folder's")
            review, sha = reviewed.to_json(), reviewed.client_app_sha256
        elif content_sha256:
            sha = content_sha256
            deployed = (pending.meta.get("deployed") if pending else None) or {}
            kept = saved_review(layout, job_id) or {}
            if isinstance(deployed, dict) and deployed.get("client_app_sha256") == sha:
                problems = review_trainer(dict(deployed.get("trainer") or {}), settings.fl)
                problems += list(deployed.get("problems") or [])
                if problems:
                    raise PolicyError("not approved: " + "; ".join(problems))
                review = {"deployed": deployed, "privacy": floor_of_privacy(settings.fl.privacy)}
            elif kept.get("client_app_sha256") == sha:  # what `portico fl inspect --for` showed
                problems = review_trainer(dict(kept.get("trainer") or {}), settings.fl) + list(
                    kept.get("problems") or [])
                if problems:
                    raise PolicyError("not approved: " + "; ".join(dict.fromkeys(problems)))
                review = kept
        else:
            raise PolicyError("an approval binds the job's content: give the job folder (portico fl approve JOB "
                              "--job FOLDER) or its content hash (--content-sha256, from portico fl inspect)")
    made = approvals.decide(job_id, decision, actor=actor, reason=reason, client_app_sha256=sha, review=review,
                            name=None if pending else earlier_of(approvals, job_id).name,
                            submitter=None if pending else earlier_of(approvals, job_id).submitter)
    event = AuditEvent.FL_JOB_APPROVED if decision == "approved" else AuditEvent.FL_JOB_REJECTED
    store.record(AuditRecord(event, actor=actor, detail={
        "fl_job_id": made.job_id, "name": made.name, "submitter": made.submitter, "reason": made.reason,
        "client_app_sha256": made.client_app_sha256, "job_sha256": review.get("job_sha256"),
        "trainer": review.get("trainer") or (review.get("deployed") or {}).get("trainer"),
        "rounds": review.get("rounds"), "privacy": review.get("privacy")}))
    return made


def earlier_of(approvals: Approvals, job_id: str) -> Decision:
    found = approvals.decision(job_id)
    if found is None:
        raise KeyError(job_id)
    return found


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
