"""Run one inference job: package + series → SEG and SR files → results and outbox, atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.handoff import short
from appliance.models import ModelRegistry
from appliance.review import Reviews
from appliance.settings import Settings
from appliance.store import Job, ResultFile, Store
from inference.errors import InferenceError, PackageError, ResultEncodingError, SeriesError, describe
from inference.packages import ModelPackage
from inference.pipeline import PipelineResult, run_segmentation
from inference.results.summary import build_summary
from inference.runtime.onnxruntime import SessionCache

log = logging.getLogger(__name__)

#: errors that will not go away by trying again (building the same objects from the same inputs fails alike)
PERMANENT = (PackageError, SeriesError, ResultEncodingError)


class JobRunner:
    """Claims due jobs from the store and runs them, one at a time per runner."""

    def __init__(self, settings: Settings, store: Store, registry: ModelRegistry, sessions: SessionCache) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.sessions = sessions
        self.reviews = Reviews(store, settings.review)

    def run_next(self) -> Job | None:
        """Run the next due job, if any; never raises for a job's own failure."""
        job = self.store.claim_job()
        if job is None:
            return None
        try:
            self._run(job)
        except PERMANENT as exc:
            # an encoding failure is a library's: its traceback (messages withheld) says where
            log.warning("job %d failed: %s: %s", job.id, exc.code, exc, exc_info=isinstance(exc, ResultEncodingError))
            self.store.fail_job(job, str(exc), exc.code, retry_in=None)
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
        return job

    def _retry_or_fail(self, job: Job, error: str, code: str) -> None:
        if job.attempts < self.settings.jobs.max_attempts:
            self.store.fail_job(job, error, code, retry_in=self.settings.jobs.retry_seconds * 2 ** (job.attempts - 1))
        else:
            self.store.fail_job(job, error, code, retry_in=None)

    def _run(self, job: Job) -> None:
        package = self.registry.get(job.model, job.model_version)
        paths = self.store.series_of(job.study_uid, job.run_version).get(job.series_uid)
        if not paths:
            raise SeriesError(f"series {short(job.series_uid)} has no stored instances")
        # derived UIDs follow from the series content, the rule and (inside build_*) the model version
        run_key = f"{job.study_uid}/{job.series_uid}/{job.rule}/{job.content_key}"
        result = run_segmentation(paths, package, self.sessions, self.settings.inference, run_key)
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
