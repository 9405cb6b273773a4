"""Taking sent results back (IOCM rejection notes) and the review screen's overlay images.

Jobs run for real (JobRunner, the tiny ONNX package, a phantom series), so the SEG, SR and SC files
the notes reference and the overlay images are drawn from are real; the outbox is inspected, not drained.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from appliance.demo_study import write_ct_series
from appliance.jobs import JobRunner
from appliance.models import ModelRegistry
from appliance.review import ReviewConflict, Reviews, ReviewState
from appliance.review_images import ReviewImagesUnavailable, key_images
from appliance.settings import Settings
from appliance.store import Job, JobState, OutboxState, Store
from appliance.withdraw import withdraw
from dicom_router.ports import ReceivedInstance
from inference.phantom import make_phantom
from inference.results.kos import KOS_SOP_CLASS_UID
from inference.results.seg import build_fractional_seg
from inference.results.summary import labels_from_seg
from inference.runtime.onnxruntime import SessionCache
from inference.settings import DeviceIdentity
from inference.volume import load_series
from tests.support.packages import make_package
from tests.support.segs import soft_probabilities

PATIENT = "WITHDRAW^PATIENT"
DESTINATIONS = [
    {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
     "secondary_capture": True},
    {"kind": "dimse", "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 104},
]


@dataclass
class Site:
    tmp: Path
    settings: Settings
    store: Store
    runner: JobRunner
    reviews: Reviews

    def job(self, seed: int) -> Job:
        phantom = make_phantom((6, 64, 64), (2.5, 6.0, 6.0), seed=seed)
        series = write_ct_series(phantom.hu, phantom.spacing, self.tmp / f"ct-{seed}", patient_name=PATIENT,
                                 seed=seed)
        for path in series.paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.store.store(ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                              str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                                              "PACS", "127.0.0.1", path.read_bytes()))
        study = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).StudyInstanceUID)
        run = self.store.hand_off(study, "quiet")
        assert run is not None
        (series_uid,) = self.store.series_members(study, run.version)
        self.store.record_routes(run, [("r", "tiny", None, series_uid, f"k{seed}")])
        job = self.runner.run_next()
        assert job is not None
        done = self.store.job(job.id)
        assert done is not None and done.state is JobState.DONE, done
        return done

    def mark_sent(self, job_id: int) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, sent_at = 1 WHERE job_id = ? AND state = ?",
                       (OutboxState.SENT, job_id, OutboxState.PENDING))


@pytest.fixture
def site(tmp_path: Path, database_url: str | None) -> Iterator[Site]:
    make_package(tmp_path / "models" / "tiny")
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "dispatch": {"destinations": DESTINATIONS}, "review": {"required": True}})
    store = Store(settings.data_dir, fsync=False, database=database_url)
    runner = JobRunner(settings, store, ModelRegistry.from_settings(settings), SessionCache())
    yield Site(tmp_path, settings, store, runner, Reviews(store, settings.review))
    store.close()


def test_withdraw_sends_each_destination_a_rejection_note_for_what_it_received(site: Site) -> None:
    job = site.job(1)
    site.reviews.approve(job.id, "Dr Reviewer", "", via="cli")
    site.mark_sent(job.id)
    sent = {(o["destination"], o["sop_instance_uid"]) for o in site.store.outbox() if o["job_id"] == job.id}
    kinds = {r.sop_instance_uid: r.kind for r in site.store.results(job.id)}
    assert sorted(kinds[u] for d, u in sent if d == "pacs")[:2] == ["sc", "sc"]  # SC only where asked for

    out = withdraw(site.store, site.settings, job.id, "Dr Reviewer", "outline misses the liver", via="cli")

    assert set(out.notes) == {"pacs", "archive"} and out.cancelled == 0
    for destination, uid in out.notes.items():
        (note,) = [r for r in site.store.results(job.id) if r.sop_instance_uid == uid]
        assert note.kind == "kos" and note.sop_class_uid == KOS_SOP_CLASS_UID
        kos = pydicom.dcmread(note.path)
        title = kos.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == \
            ("113001", "DCM", "Rejected for Quality Reasons")
        referenced = {i.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
                      for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert referenced == {u for d, u in sent if d == destination} == set(out.rejected[destination])
        assert PATIENT.encode() in note.path.read_bytes()  # the study's own patient, as the PACS expects
        assert "outline misses" not in str(kos)  # the reviewer's free text stays in Portico
        if shutil.which("dciodvfy"):
            run = subprocess.run(["dciodvfy", str(note.path)], capture_output=True, text=True)
            problems = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
            assert not problems, problems
    queued = [(o["destination"], o["state"]) for o in site.store.outbox() if o["sop_class_uid"] == KOS_SOP_CLASS_UID]
    assert sorted(queued) == [("archive", "PENDING"), ("pacs", "PENDING")]
    review = site.reviews.get(job.id)
    assert (review.state, review.reviewer, review.reason) == (ReviewState.WITHDRAWN, "Dr Reviewer",
                                                              "outline misses the liver")
    (event,) = [e for e in site.store.audit_events() if e["event"] == "reviewed"
                and e["detail"].get("decision") == "withdraw"]
    assert event["actor"] == "Dr Reviewer" and event["detail"]["notes"] == out.notes
    assert site.reviews.approved_segs() == []  # never a training label

    with pytest.raises(ReviewConflict, match="withdrawn already"):
        withdraw(site.store, site.settings, job.id, "Dr Reviewer", "again", via="cli")
    with pytest.raises(ReviewConflict, match="already withdrawn"):
        site.reviews.approve(job.id, "Dr Reviewer", "", via="cli")


def test_withdraw_needs_something_sent_and_a_reason(site: Site) -> None:
    job = site.job(2)
    with pytest.raises(ValueError, match="reason"):
        withdraw(site.store, site.settings, job.id, "Dr Reviewer", " ", via="cli")
    with pytest.raises(ReviewConflict, match="reject it in review instead"):
        withdraw(site.store, site.settings, job.id, "Dr Reviewer", "wrong", via="cli")  # still held


def test_withdraw_stops_what_has_not_gone_yet(site: Site) -> None:
    job = site.job(3)
    site.reviews.approve(job.id, "Dr Reviewer", "", via="cli")
    with site.store.transaction() as db:  # only the archive got its results so far
        db.execute("UPDATE outbox SET state = ? WHERE job_id = ? AND destination = 'archive'",
                   (OutboxState.SENT, job.id))
    out = withdraw(site.store, site.settings, job.id, "Dr Reviewer", "wrong", via="api")
    assert set(out.notes) == {"archive"} and out.cancelled > 0
    states = {(o["destination"], o["state"]) for o in site.store.outbox() if o["job_id"] == job.id}
    assert ("pacs", "PENDING") not in states and ("pacs", "CANCELLED") in states


def test_key_images_show_the_segmentation_in_its_colour_and_are_kept(site: Site) -> None:
    job = site.job(4)
    images = key_images(site.store, site.runner.registry, job)
    assert 1 <= len(images) <= 3
    manifest = site.runner.registry.get("tiny").manifest
    colour = np.array(manifest.output.segments[0].colour)
    for image in images:
        with Image.open(image.path) as png:
            assert png.format == "PNG" and png.mode == "RGB"
            pixels = np.asarray(png)
        assert pixels.std() > 10  # not blank
        assert (np.abs(pixels.reshape(-1, 3).astype(int) - colour).sum(axis=1) < 30).sum() > 50  # outline drawn
        assert 0 <= image.slice_index < 6
    again = key_images(site.store, site.runner.registry, job)
    assert [i.path for i in again] == [i.path for i in images]  # rendered once


def test_key_images_of_a_fractional_seg_show_its_most_probable_segment(site: Site) -> None:
    """A FRACTIONAL SEG is drawn as the label map its probabilities make (the one the run measured)."""
    job = site.job(6)
    manifest = site.runner.registry.get("tiny").manifest
    (stored,) = [r for r in site.store.results(job.id) if r.kind == "seg"]
    paths = site.store.series_of(job.study_uid, job.run_version)[job.series_uid]
    volume = load_series(paths)
    labels = labels_from_seg(pydicom.dcmread(stored.path), volume, manifest)
    assert labels.any()
    # the same result as the model's probabilities: over one half inside, under it on a rim around
    fractional = build_fractional_seg(volume, soft_probabilities(labels, manifest), manifest, DeviceIdentity(),
                                      site.settings.inference.uid_root, "fractional")
    assert fractional.SegmentationType == "FRACTIONAL"
    fractional.save_as(stored.path, enforce_file_format=True)
    images = key_images(site.store, site.runner.registry, job)
    assert 1 <= len(images) <= 3
    colour = np.array(manifest.output.segments[0].colour)
    for image in images:
        with Image.open(image.path) as png:
            pixels = np.asarray(png)
        assert pixels.std() > 10
        assert (np.abs(pixels.reshape(-1, 3).astype(int) - colour).sum(axis=1) < 30).sum() > 50
    assert np.array_equal(labels_from_seg(pydicom.dcmread(stored.path), volume, manifest), labels)


def test_key_images_are_unavailable_without_a_readable_seg(site: Site) -> None:
    job = site.job(5)
    for r in site.store.results(job.id):
        if r.kind == "seg":
            r.path.unlink()
    with pytest.raises(ReviewImagesUnavailable, match="no stored SEG"):
        key_images(site.store, site.runner.registry, job)
