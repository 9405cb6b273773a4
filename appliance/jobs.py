"""Run one inference job: package + series → SEG and SR files → results and outbox, atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.handoff import short
from appliance.metrics import Metrics
from appliance.models import ModelRegistry
from appliance.review import Reviews
from appliance.settings import Settings
from appliance.store import LEASE_SECONDS, Job, LeaseLost, ResultFile, Store, worker_name
from inference.errors import InferenceError, PackageError, ResultEncodingError, SeriesError, describe
from inference.memory import release_memory, tune_allocator
from inference.packages import ModelPackage
from inference.pipeline import PipelineResult, run_segmentation
from inference.results.summary import build_summary
from inference.runtime.onnxruntime import SessionCache

log = logging.getLogger(__name__)

#: errors that will not go away by trying again (building the same objects from the same inputs fails alike)
PERMANENT = (PackageError, SeriesError, ResultEncodingError)


class JobRunner:
    """Claims due jobs from the store and runs them, one at a time per runner."""

    def __init__(self, settings: Settings, store: Store, registry: ModelRegistry, sessions: SessionCache,
                 metrics: Metrics | None = None, *, lease_seconds: float = LEASE_SECONDS) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.sessions = sessions
        self.metrics = metrics
        self.reviews = Reviews(store, settings.review)
        #: this runner as a lease owner (several runners in one process each hold their own jobs' leases)
        self.owner = worker_name()
        self.lease_seconds = lease_seconds
        tune_allocator()  # so that release_memory() can hand each job's memory back (inference.memory)

    def run_next(self) -> Job | None:
        """Run the next due job, if any; never raises for a job's own failure."""
        job = self.store.claim_job(self.owner, self.lease_seconds)
        if job is None:
            return None
        self._claimed(job)
        started = time.perf_counter()
        try:
            with Heartbeat(self.store, job, self.lease_seconds):
                timings = self._run(job)
        except LeaseLost as exc:  # another worker runs it now; its results have the same UIDs
            log.warning("job %d: %s; its results are left to the next run", job.id, exc)
            self._finished("lease_lost")
        except PERMANENT as exc:
            # an encoding failure is a library's: its traceback (messages withheld) says where
            log.warning("job %d failed: %s: %s", job.id, exc.code, exc, exc_info=isinstance(exc, ResultEncodingError))
            self._fail(job, str(exc), exc.code, retry_in=None)
            self._finished("failed")
        except InferenceError as exc:
            log.warning("job %d failed: %s: %s", job.id, exc.code, exc)
            self._retry_or_fail(job, str(exc), exc.code)
        except Exception as exc:  # a job must never take the service down
            # never str(exc): a library's message may quote the value it choked on (a birth date, a
            # name); the type and where it was raised say enough, and the log's formatter keeps the
            # traceback without the message (appliance.logs)
            error = describe(exc)
            log.exception("job %d failed: unexpected %s", job.id, error)
            self._retry_or_fail(job, error, "unexpected")
        else:
            self._finished("done", time.perf_counter() - started, timings)
        # the job's volume, label map and objects are gone now; give their pages back (glibc keeps them)
        release_memory()
        return job

    def _claimed(self, job: Job) -> None:
        """Measure the queue wait: from the study's hand-off to its job's first attempt."""
        if self.metrics is None or job.attempts != 1:
            return
        run = self.store.run(job.study_uid, job.run_version)
        if run is not None:
            self.metrics.claimed(time.time() - run.created)

    def _finished(self, outcome: str, seconds: float | None = None, steps: dict[str, float] | None = None) -> None:
        if self.metrics is not None:
            self.metrics.job_finished(outcome, seconds, steps)

    def _retry_or_fail(self, job: Job, error: str, code: str) -> None:
        if job.attempts < self.settings.jobs.max_attempts:
            self._fail(job, error, code, retry_in=self.settings.jobs.retry_seconds * 2 ** (job.attempts - 1))
            self._finished("retry")
        else:
            self._fail(job, error, code, retry_in=None)
            self._finished("failed")

    def _fail(self, job: Job, error: str, code: str, retry_in: float | None) -> None:
        try:
            self.store.fail_job(job, error, code, retry_in=retry_in)
        except LeaseLost as exc:  # another worker has it now: its outcome counts, not this one's
            log.warning("job %d: %s; its failure is not recorded", job.id, exc)

    def _run(self, job: Job) -> dict[str, float]:
        """Run ``job``; returns its step timings (seconds by step)."""
        package = self.registry.get(job.model, job.model_version)
        paths = self.store.series_of(job.study_uid, job.run_version).get(job.series_uid)
        if not paths:
            raise SeriesError(f"series {short(job.series_uid)} has no stored instances")
        # derived UIDs follow from the series content, the rule and (inside build_*) the model version
        run_key = f"{job.study_uid}/{job.series_uid}/{job.rule}/{job.content_key}"
        result = run_segmentation(paths, package, self.sessions, self.settings.inference, run_key,
                                  progress=ProgressReport(self.store, job.id))
        folder = self.store.results_dir / f"job-{job.id}"
        folder.mkdir(parents=True, exist_ok=True)
        files = [
            self._write(folder, "seg", result.seg, {"model": package.ref}),
            self._write(folder, "sr", result.sr, {
                "model": package.ref,
                "measurements": [dataclasses.asdict(m) for m in result.measurements],
            }),
        ]
        # Secondary Capture key images only for the destinations that ask for them
        sc_destinations = [d.name for d in self.settings.dispatch.destinations if d.secondary_capture]
        if sc_destinations:
            files += self._summary(job, folder, result, package, run_key)
        destinations = [d.name for d in self.settings.dispatch.destinations]
        hold = self.reviews.hold_for(job)
        self.store.complete_job(job, files, destinations, result.provider, package.package_hash, result.timings,
                                destinations_for={f.sop_instance_uid: sc_destinations
                                                  for f in files if f.kind == "sc"}, hold=hold)
        log.info("job %d done%s: %s on %s, %s", job.id, ", held for review" if hold else "", package.ref,
                 result.provider, ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
        return dict(result.timings)

    def _summary(self, job: Job, folder: Path, result: PipelineResult, package: ModelPackage,
                 run_key: str) -> list[ResultFile]:
        """Key images of the label map the SEG encodes, on the series already loaded.

        They are a convenience copy: when they cannot be made, the SEG and SR still go out.
        """
        t0 = time.perf_counter()
        try:
            images = build_summary(result.volume, result.labels, result.measurements, package.manifest,
                                   self.settings.inference.device, self.settings.inference.uid_root, run_key)
        except Exception:  # never let the convenience images hold back the SEG and SR
            log.exception("job %d: summary images failed; SEG and SR are sent without them", job.id)
            return []
        result.timings["summary"] = time.perf_counter() - t0
        return [self._write(folder, "sc", ds, {"model": package.ref, "key_image": n})
                for n, ds in enumerate(images, start=1)]

    def _write(self, folder: Path, kind: str, ds: Dataset, detail: dict[str, object]) -> ResultFile:
        path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return ResultFile(str(ds.SOPInstanceUID), kind, str(ds.SOPClassUID), path, dict(detail))


class Heartbeat:
    """Renews a running job's lease every third of its length, in a thread, while the job runs."""

    def __init__(self, store: Store, job: Job, lease_seconds: float) -> None:
        self.store = store
        self.job = job
        self.every = lease_seconds / 3
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not self.store.renew_lease(self.job.id, self.job.lease_owner, self.lease_seconds):
                    log.warning("job %d: lease lost while running", self.job.id)
                    return
            except Exception:  # the database away for a moment: the next beat tries again
                log.exception("job %d: could not renew its lease", self.job.id)


class ProgressReport:
    """``progress(done, total)`` for the pipeline: recorded on the job at most once a second, and at the end."""

    def __init__(self, store: Store, job_id: int, every: float = 1.0) -> None:
        self.store = store
        self.job_id = job_id
        self.every = every
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        try:
            self.store.set_progress(self.job_id, done, total)
        except Exception:  # progress is for people watching; the job goes on without it
            log.exception("job %d: progress not recorded", self.job_id)
