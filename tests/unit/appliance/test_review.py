"""Review: held results, approve/reject, restart, and approved SEGs as the only Portico-made labels.

Jobs run for real (JobRunner, the tiny ONNX package, a small phantom series), so the held results
are real SEG and SR files; no network: the outbox is inspected, not drained.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.demo_study import write_ct_series
from appliance.fl import StoreStudySource
from appliance.jobs import JobRunner
from appliance.models import ModelRegistry
from appliance.review import ReviewConflict, ReviewNotFound, Reviews, ReviewState
from appliance.settings import ReviewSettings, Settings
from appliance.store import Job, JobState, OutboxState, Store
from dicom_router.ports import ReceivedInstance, StoreOutcome
from fl_client.dataset import build_index, seg_labels
from fl_client.settings import CohortRule, LabelSource
from inference.packages import load_package
from inference.phantom import make_phantom
from inference.runtime.onnxruntime import SessionCache
from inference.volume import load_series
from tests.support.packages import make_package

PATIENT = "REVIEW^PATIENT"
DESTINATIONS = [{"kind": "dimse", "name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 104}
                for n in ("pacs", "archive")]


@dataclass
class Site:
    tmp: Path
    settings: Settings
    store: Store
    runner: JobRunner
    reviews: Reviews

    def reopen(self) -> Site:
        """The appliance restarted: a new store, runner and review book on the same data folder."""
        self.store.close()
        return make_site(self.tmp, self.settings.review.model_dump(), self.settings.storage.database)

    def job(self, seed: int) -> Job:
        """Store a phantom CT series, hand it off, route it to ``tiny`` and run the job."""
        phantom = make_phantom((4, 48, 48), (2.5, 8.0, 8.0), seed=seed)
        series = write_ct_series(phantom.hu, phantom.spacing, self.tmp / f"ct-{seed}", patient_name=PATIENT,
                                 seed=seed)
        for path in series.paths:
            store_file(self.store, path)
        study = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).StudyInstanceUID)
        run = self.store.hand_off(study, "quiet")
        assert run is not None
        members = self.store.series_members(study, run.version)
        (series_uid,) = members
        self.store.record_routes(run, [("r", "tiny", None, series_uid, f"k{seed}")])
        job = self.runner.run_next()
        assert job is not None
        done = self.store.job(job.id)
        assert done is not None and done.state is JobState.DONE, done
        return done

    def outbox(self, job_id: int) -> list[str]:
        return sorted(o["state"] for o in self.store.outbox() if o["job_id"] == job_id)


def store_file(store: Store, path: Path) -> StoreOutcome:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                        str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), "PACS",
                                        "127.0.0.1", path.read_bytes()))


def make_site(tmp: Path, review: dict[str, object], database: str | None = None) -> Site:
    if not (tmp / "models" / "tiny").exists():
        make_package(tmp / "models" / "tiny")
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp / "var"), "fsync": False, "min_free_mb": 0, "database": database or "sqlite"},
        "inference": {"models_dir": str(tmp / "models")},
        "dispatch": {"destinations": DESTINATIONS}, "review": review})
    store = Store.from_settings(settings, fsync=False)
    runner = JobRunner(settings, store, ModelRegistry.from_settings(settings), SessionCache())
    return Site(tmp, settings, store, runner, Reviews(store, settings.review))


@pytest.fixture
def site(tmp_path: Path, database_url: str | None) -> Iterator[Site]:
    s = make_site(tmp_path, {"required": True}, database_url)
    yield s
    s.store.close()


def test_settings_hold_every_model_or_the_listed_ones() -> None:
    assert not ReviewSettings().holds("tiny")
    assert ReviewSettings(required=True).holds("anything")
    listed = ReviewSettings(models=("tiny",))
    assert listed.holds("tiny") and not listed.holds("other")


def test_held_results_wait_then_approval_releases_them_once_to_every_destination(site: Site) -> None:
    job = site.job(1)
    assert {r.kind for r in site.store.results(job.id)} == {"seg", "sr"}
    assert site.outbox(job.id) == ["HELD"] * 4  # SEG and SR, two destinations
    assert site.store.due(100) == []
    held = site.reviews.find()
    assert [(r.job.id, r.state, r.held) for r in held] == [(job.id, ReviewState.HELD, True)]
    assert site.reviews.get(job.id).measurements()  # the SR's measurements, for the reviewer

    outcome = site.reviews.approve(job.id, "Dr Reviewer", "looks right", via="cli")
    assert (outcome.state, outcome.held, outcome.released, outcome.cancelled) == (ReviewState.APPROVED, True, 4, 0)
    due = site.store.due(100)
    assert sorted(i.destination for i in due) == ["archive", "archive", "pacs", "pacs"]
    assert site.reviews.find() == []
    with pytest.raises(ReviewConflict, match="already approved by Dr Reviewer"):
        site.reviews.approve(job.id, "Dr Other", via="cli")
    with pytest.raises(ReviewConflict):
        site.reviews.reject(job.id, "Dr Other", "changed my mind", via="cli")
    assert len(site.store.due(100)) == 4  # nothing queued twice

    events = [e for e in site.store.audit_events() if e["job_id"] == job.id]
    kinds = [e["event"] for e in events]
    assert kinds.index("inferred") < kinds.index("held_for_review") < kinds.index("reviewed")
    reviewed = next(e for e in events if e["event"] == "reviewed")
    assert reviewed["actor"] == "Dr Reviewer"
    assert reviewed["detail"]["decision"] == "approve" and reviewed["detail"]["held"] is True
    assert reviewed["detail"]["released"] == 4 and reviewed["detail"]["reason"] == "looks right"


def test_rejection_cancels_held_results_for_good(site: Site) -> None:
    job = site.job(2)
    with pytest.raises(ValueError, match="reason"):
        site.reviews.reject(job.id, "Dr Reviewer", "  ", via="cli")
    outcome = site.reviews.reject(job.id, "Dr Reviewer", "liver boundary wrong", via="api")
    assert (outcome.state, outcome.cancelled, outcome.released) == (ReviewState.REJECTED, 4, 0)
    assert site.outbox(job.id) == [OutboxState.CANCELLED] * 4
    assert site.store.due(100) == []
    with pytest.raises(ReviewConflict, match="already rejected"):
        site.reviews.approve(job.id, "Dr Other", via="cli")
    assert site.store.due(100) == []
    review = site.reviews.get(job.id)
    assert (review.state, review.reviewer, review.reason, review.via) == \
        (ReviewState.REJECTED, "Dr Reviewer", "liver boundary wrong", "api")


def test_held_results_and_decisions_survive_a_restart(site: Site) -> None:
    first, second = site.job(3), site.job(4)
    site.reviews.reject(second.id, "Dr Reviewer", "artefact", via="cli")
    site = site.reopen()
    try:
        assert [r.job.id for r in site.reviews.find()] == [first.id]
        assert site.store.due(100) == []
        assert site.reviews.get(second.id).state is ReviewState.REJECTED
        site.reviews.approve(first.id, "Dr Reviewer", via="cli")
        site = site.reopen()
        assert site.reviews.get(first.id).state is ReviewState.APPROVED
        assert {i.sop_instance_uid for i in site.store.due(100)} == \
            {r.sop_instance_uid for r in site.store.results(first.id)}
    finally:
        site.store.close()


def test_unknown_unfinished_and_unheld_jobs_are_refused(site: Site) -> None:
    with pytest.raises(ReviewNotFound):
        site.reviews.approve(999, "Dr Reviewer", via="cli")
    with pytest.raises(ReviewNotFound):
        site.reviews.get(999)
    job = site.job(5)
    site.reviews.approve(job.id, "Dr Reviewer", via="cli")
    # a second study routed but not run: nothing to review yet
    phantom = make_phantom((4, 48, 48), (2.5, 8.0, 8.0), seed=6)
    for path in write_ct_series(phantom.hu, phantom.spacing, site.tmp / "ct-6", seed=6).paths:
        store_file(site.store, path)
    study = next(s.study_uid for s in site.store.open_studies())
    run = site.store.hand_off(study, "quiet")
    assert run is not None
    (series_uid,) = site.store.series_members(study, run.version)
    (pending,) = site.store.record_routes(run, [("r", "tiny", None, series_uid, "k6")])
    with pytest.raises(ReviewConflict, match="no results"):
        site.reviews.approve(pending, "Dr Reviewer", via="cli", retrospective=True)
    with pytest.raises(ValueError, match="reviewer"):
        site.reviews.approve(pending, " ", via="cli")


def test_without_review_results_go_at_once_and_may_be_reviewed_retrospectively(tmp_path: Path) -> None:
    site = make_site(tmp_path, {"required": False})
    try:
        job = site.job(7)
        assert site.outbox(job.id) == ["PENDING"] * 4
        assert site.reviews.find() == []
        assert [r.job.id for r in site.reviews.find(ReviewState.UNREVIEWED)] == [job.id]
        with pytest.raises(ReviewConflict, match="not held"):
            site.reviews.approve(job.id, "Dr Reviewer", via="cli")
        outcome = site.reviews.approve(job.id, "Dr Reviewer", "good label", via="cli", retrospective=True)
        assert (outcome.state, outcome.held, outcome.released) == (ReviewState.APPROVED, False, 0)
        assert site.outbox(job.id) == ["PENDING"] * 4  # untouched: they were on their way already
        assert [r.job.id for r in site.reviews.find(ReviewState.APPROVED)] == [job.id]

        other = site.job(8)
        mine = {r.sop_instance_uid for r in site.store.results(other.id)}
        site.store.mark_sent(next(i for i in site.store.due(100) if i.sop_instance_uid in mine).id)
        outcome = site.reviews.reject(other.id, "Dr Reviewer", "wrong series", via="cli", retrospective=True)
        assert (outcome.already_sent, outcome.cancelled) == (1, 3)  # what went stays sent; the rest stops
        assert sorted(site.outbox(other.id)) == ["CANCELLED"] * 3 + ["SENT"]
    finally:
        site.store.close()


def test_per_model_review_holds_only_the_listed_models(tmp_path: Path) -> None:
    site = make_site(tmp_path, {"models": ["someone-else"]})
    try:
        job = site.job(9)
        assert site.outbox(job.id) == ["PENDING"] * 4 and site.reviews.find() == []
    finally:
        site.store.close()


def test_only_approved_portico_segs_become_labels(site: Site) -> None:
    approved, rejected, held = site.job(10), site.job(11), site.job(12)
    site.reviews.approve(approved.id, "Dr Reviewer", via="cli")
    site.reviews.reject(rejected.id, "Dr Reviewer", "wrong", via="cli")
    # a PACS echoing our unreviewed SEG back: never indexed, so never an imported label
    held_seg = next(r.path for r in site.store.results(held.id) if r.kind == "seg")
    assert store_file(site.store, held_seg) is StoreOutcome.DUPLICATE

    candidates = {c.series_uid: c for c in StoreStudySource(site.store, site.reviews).series()}
    assert set(candidates) == {approved.series_uid, rejected.series_uid, held.series_uid}
    approved_seg = next(r.path for r in site.store.results(approved.id) if r.kind == "seg")
    assert list(candidates[approved.series_uid].approved_seg_paths) == [approved_seg]
    for job in (rejected, held):
        assert not candidates[job.series_uid].approved_seg_paths and not candidates[job.series_uid].seg_paths

    cohorts = site.tmp / "cohorts"
    for labels in (LabelSource.APPROVED, LabelSource.ANY):
        index = build_index("c", CohortRule(labels=labels), StoreStudySource(site.store, site.reviews),
                            cohorts / f"{labels}.json")
        assert [(s.series_uid, s.seg_paths) for s in index.series] == [(approved.series_uid, (str(approved_seg),))]
    imported_only = build_index("c", CohortRule(labels=LabelSource.IMPORTED), StoreStudySource(site.store),
                                cohorts / "imported.json")
    assert imported_only.series == ()

    # the approved SEG reads back as a label map on its series
    volume = load_series(list(candidates[approved.series_uid].image_paths))
    labels = seg_labels(approved_seg, volume, load_package(site.tmp / "models" / "tiny").manifest)
    assert labels.shape == volume.hu.shape and set(np.unique(labels)) == {0, 1}


def test_an_approved_seg_whose_file_is_gone_is_no_label(site: Site) -> None:
    job = site.job(13)
    site.reviews.approve(job.id, "Dr Reviewer", via="cli")
    assert [s.job_id for s in site.reviews.approved_segs()] == [job.id]
    # the reviewed SEG file gone (data folder cleaned up by hand): no label rather than a broken one
    next(r.path for r in site.store.results(job.id) if r.kind == "seg").unlink()
    assert site.reviews.approved_segs() == []
