"""Retention with a clock the test controls: what is purged, what is kept back and why, and the audit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from appliance.cli.purge import describe
from appliance.retention import DAY, EVERY_STUDY, Kept, Retention, fl_cohort_studies
from appliance.review import Reviews
from appliance.settings import RetentionSettings, ReviewSettings, Settings
from appliance.store import Job, JobState, ResultFile, Store
from dicom_router.ports import ReceivedInstance

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Clock:
    """Seconds since the epoch, moved on by the test (the store stamps real time; we look ahead)."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def days_later(self, days: float) -> None:
        self.now += days * DAY


@dataclass
class Site:
    tmp: Path
    store: Store
    clock: Clock
    settings: RetentionSettings = field(default_factory=RetentionSettings)

    def retention(self, protected: frozenset[str] | None = None, **settings: float) -> Retention:
        chosen = RetentionSettings(**{**self.settings.model_dump(), **settings})
        return Retention(self.store, chosen, clock=self.clock,
                         protected=None if protected is None else (lambda: protected))

    def study(self, instances: int = 2) -> tuple[str, str]:
        """Store ``instances`` instances of a new one-series study and hand it off; (study, series)."""
        study, series = generate_uid(), generate_uid()
        for _ in range(instances):
            self.store.store(ReceivedInstance(CT, generate_uid(), study, series, "1.2.840.10008.1.2.1", "PACS",
                                              "127.0.0.1", b"\0" * 1000))
        run = self.store.hand_off(study, "quiet")
        assert run is not None
        return study, series

    def job(self, study: str, series: str, *, hold: bool = False, send: bool = True) -> Job:
        """Route the study to one job, run it (a fake SEG file), and deliver its result unless told not to."""
        run = self.store.run(study, 1)
        assert run is not None
        (job_id,) = self.store.record_routes(run, [("r", "tiny", None, series, f"k-{study}")])
        job = self.store.claim_job()
        assert job is not None and job.id == job_id
        folder = self.store.results_dir / f"job-{job.id}"
        folder.mkdir(parents=True)
        seg_uid = generate_uid()
        path = folder / f"seg-{seg_uid}.dcm"
        path.write_bytes(b"\0" * 500)
        (folder / f"{path.name}.jpeg-ls").write_bytes(b"\0" * 100)  # a compressed copy beside it
        reviews = Reviews(self.store, ReviewSettings(required=hold))
        self.store.complete_job(job, [ResultFile(seg_uid, "seg", SEG, path, {})], ["pacs"], "cpu", "hash", {},
                                hold=reviews.hold_for(job))
        if send:
            for item in self.store.due(100):
                self.store.mark_sent(item.id)
        done = self.store.job(job.id)
        assert done is not None
        return done

    def purged(self) -> list[dict[str, Any]]:
        return [e for e in self.store.audit_events() if e["event"] == "purged"]


@pytest.fixture
def site(tmp_path: Path, database_url: str | None) -> Iterator[Site]:
    store = Store(tmp_path / "var", fsync=False, database=database_url)
    yield Site(tmp_path, store, Clock())
    store.close()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_delivered_study_loses_its_instances_then_its_results_then_its_rows(site: Site) -> None:
    study, series = site.study(3)
    job = site.job(study, series)
    retention = site.retention()  # defaults: instances 30 days, results 90 days

    site.clock.days_later(29.9)
    assert retention.purge().studies == ()
    assert site.store.instance_count(study) == 3

    site.clock.days_later(0.2)
    report = retention.purge()
    (purged,) = report.studies
    assert (purged.study_uid, purged.instances, purged.result_files, purged.bytes, purged.forgotten) == \
        (study, 3, 0, 3000, False)
    assert site.store.instance_count(study) == 0
    assert not (site.store.instances_dir / study).exists()
    assert len(_files(site.store.results_dir / f"job-{job.id}")) == 2  # results are kept longer
    assert site.store.job(job.id) is not None
    (row,) = site.purged()
    assert row["study_uid"] == study and row["actor"] == "retention"
    assert row["detail"] == {"instances": 3, "result_files": 0, "bytes": 3000, "forgotten": False,
                             "days_since_finished": pytest.approx(30.1, abs=0.01)}
    assert retention.purge().studies == ()  # nothing left to do until the results' time

    site.clock.days_later(60)
    (purged,) = retention.purge().studies
    assert (purged.instances, purged.result_files, purged.bytes, purged.forgotten) == (0, 2, 600, True)
    assert not (site.store.results_dir / f"job-{job.id}").exists()
    assert site.store.job(job.id) is None and site.store.outbox() == [] and site.store.results() == []
    assert site.store.db.query("SELECT * FROM studies WHERE study_uid = ?", (study,)) == []
    assert [r["detail"]["forgotten"] for r in site.purged()] == [False, True]


def test_studies_with_work_left_are_kept_back_with_the_reason(site: Site) -> None:
    delivered = site.study()
    site.job(*delivered)
    held = site.study()
    held_job = site.job(*held, hold=True)
    undelivered = site.study()
    undelivered_job = site.job(*undelivered, send=False)
    retrying = site.study()
    run = site.store.run(retrying[0], 1)
    assert run is not None
    site.store.record_routes(run, [("r", "tiny", None, retrying[1], "k-retry")])
    claimed = site.store.claim_job()
    assert claimed is not None
    site.store.fail_job(claimed, "runtime hiccup", "runtime", retry_in=60.0)
    retried = site.store.job(claimed.id)
    assert retried is not None and retried.state is JobState.PENDING and retried.error
    receiving = site.study()
    site.store.store(ReceivedInstance(CT, generate_uid(), receiving[0], receiving[1], "1.2.840.10008.1.2.1",
                                      "PACS", "127.0.0.1", b"\0" * 10))  # a late instance reopens it

    site.clock.days_later(365)
    report = site.retention(results_days=30).purge()
    assert [s.study_uid for s in report.studies] == [delivered[0]]
    assert sorted(report.kept, key=lambda k: k.reason) == sorted([
        Kept(retrying[0], "a job is pending, running or waiting for its retry"),
        Kept(undelivered[0], "a result is not delivered yet"),
        Kept(held[0], "results held for review"),
        Kept(receiving[0], "instances still arriving"),
    ], key=lambda k: k.reason)
    for kept_study, _ in (held, undelivered, retrying, receiving):
        assert site.store.instance_count(kept_study) >= 2
    assert [r["study_uid"] for r in site.purged()] == [delivered[0]]

    # once the work is done, they go at the next pass
    Reviews(site.store, ReviewSettings()).approve(held_job.id, "Dr Reviewer", via="cli")
    for item in site.store.due(100):
        site.store.mark_sent(item.id)
    report = site.retention(results_days=30).purge()
    assert {s.study_uid for s in report.studies} == {held[0], undelivered[0]}
    assert all(s.forgotten for s in report.studies)
    assert site.store.job(undelivered_job.id) is None


def test_a_permanently_failed_delivery_is_kept_until_someone_acts(site: Site) -> None:
    study, series = site.study()
    site.job(study, series, send=False)
    (item,) = site.store.due(10)
    site.store.mark_failed(item.id, "refused 0xA900", 0.0, permanent=True)
    site.clock.days_later(365)
    report = site.retention().purge()
    assert report.studies == () and report.kept == (Kept(study, "a result is not delivered yet"),)


def test_dry_run_reports_and_removes_nothing(site: Site) -> None:
    study, series = site.study()
    site.job(study, series)
    site.clock.days_later(100)
    before = _files(site.store.data_dir)
    report = site.retention().purge(dry_run=True)
    (would,) = report.studies
    assert (would.instances, would.result_files, would.forgotten) == (2, 2, True)
    assert _files(site.store.data_dir) == before and site.purged() == []
    text = describe(report)
    assert "would remove 2 instance(s), 2 result file(s)" in text and study not in text  # short UIDs only
    assert site.retention().purge().studies == report.studies  # and then it does just that
    assert site.store.instance_count(study) == 0


def test_zero_days_keeps_for_ever(site: Site) -> None:
    study, series = site.study()
    site.job(study, series)
    site.clock.days_later(10_000)
    assert site.retention(instances_days=0, results_days=0).purge().studies == ()
    (only_results,) = site.retention(instances_days=0, results_days=1).purge().studies
    assert (only_results.instances, only_results.result_files, only_results.forgotten) == (0, 2, False)
    assert site.store.instance_count(study) == 2


def test_a_study_sent_again_after_its_instances_went_is_taken_in_afresh(site: Site) -> None:
    study, series = site.study()
    job = site.job(study, series)
    site.clock.days_later(31)
    site.retention().purge()
    assert site.store.instance_count(study) == 0
    site.store.store(ReceivedInstance(CT, generate_uid(), study, series, "1.2.840.10008.1.2.1", "PACS",
                                      "127.0.0.1", b"\0" * 10))
    (open_study,) = site.store.open_studies()
    assert open_study.received_count == 1  # counted afresh, not on top of the purged ones
    run = site.store.hand_off(study, "quiet")
    assert run is not None and run.version == 2
    assert site.store.job(job.id) is not None  # the earlier job stays: an unchanged series is not redone


def test_federated_learning_cohorts_keep_their_studies(site: Site) -> None:
    in_cohort, other = site.study(), site.study()
    site.job(*in_cohort)
    site.job(*other)
    site.clock.days_later(365)
    report = site.retention(protected=frozenset({in_cohort[0]})).purge(dry_run=True)
    assert [s.study_uid for s in report.studies] == [other[0]]
    assert report.kept == (Kept(in_cohort[0], "in a federated-learning cohort"),)
    assert site.retention(protected=EVERY_STUDY).purge(dry_run=True).studies == ()

    # the cohort index files are what is protected, and only while fl.enabled
    settings = Settings.model_validate({"mode": "dev", "storage": {"data_dir": str(site.store.data_dir)},
                                        "fl": {"enabled": True}})
    cohorts = site.store.data_dir / "fl" / "portico" / "cohorts"
    cohorts.mkdir(parents=True)
    (cohorts / "default.json").write_text(json.dumps({"name": "default", "series": [
        {"study_uid": in_cohort[0], "series_uid": in_cohort[1], "split": "train"}]}))
    assert fl_cohort_studies(settings)() == frozenset({in_cohort[0]})
    off = Settings.model_validate({"mode": "dev", "storage": {"data_dir": str(site.store.data_dir)}})
    assert fl_cohort_studies(off)() == frozenset()
    (cohorts / "broken.json").write_text("{\"series\": 3}")
    assert fl_cohort_studies(settings)() == EVERY_STUDY


def test_quarantine_goes_by_age_and_beyond_its_quota_oldest_first(site: Site) -> None:
    ids = []
    for n in range(4):
        ids.append(site.store.quarantine(b"\0" * 400_000, f"bad {n}", "PACS", "127.0.0.1"))
    # spread the quarantine over time: the first one is 40 days old, the others a few seconds apart
    with site.store.transaction() as tx:
        tx.execute("UPDATE quarantine SET ts = ts - ? WHERE id = ?", (40 * DAY, ids[0]))
    for n, qid in enumerate(ids[1:], start=1):
        with site.store.transaction() as tx:
            tx.execute("UPDATE quarantine SET ts = ts + ? WHERE id = ?", (n, qid))

    report = site.retention(quarantine_days=30, quarantine_max_mb=1).purge()
    # 40 days old: by age; of the three left (1.2 MB), the oldest is over the 1 MB quota
    assert report.quarantine_reasons == {"age": 1, "quota": 1}
    assert set(report.quarantine_ids) == {ids[0], ids[1]}
    assert [q["id"] for q in site.store.quarantined()] == ids[2:]
    assert len(_files(site.store.quarantine_dir)) == 2
    (row,) = site.purged()
    assert row["study_uid"] is None and row["detail"]["quarantine"] == 2
    assert row["detail"]["reasons"] == {"age": 1, "quota": 1}
    assert sorted(row["detail"]["quarantine_ids"]) == sorted(ids[:2])
    assert row["detail"]["bytes"] == 800_000

    assert site.retention(quarantine_days=30, quarantine_max_mb=1).purge().quarantine_ids == ()
    assert site.retention(quarantine_days=0, quarantine_max_mb=0).purge().quarantine_ids == ()
