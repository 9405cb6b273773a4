"""Run one inference job: package + series → SEG and SR files → results and outbox, atomically."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from pydicom.dataset import Dataset

from appliance.handoff import short
from appliance.models import ModelRegistry
from appliance.settings import Settings
from appliance.store import Job, ResultFile, Store
from inference.errors import InferenceError, PackageError, SeriesError
from inference.pipeline import run_segmentation
from inference.runtime.onnxruntime import SessionCache

log = logging.getLogger(__name__)

#: errors that will not go away by trying again
PERMANENT = (PackageError, SeriesError)


class JobRunner:
    """Claims due jobs from the store and runs them, one at a time per runner."""

    def __init__(self, settings: Settings, store: Store, registry: ModelRegistry, sessions: SessionCache) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.sessions = sessions

    def run_next(self) -> Job | None:
        """Run the next due job, if any; never raises for a job's own failure."""
        job = self.store.claim_job()
        if job is None:
            return None
        try:
            self._run(job)
        except PERMANENT as exc:
            log.warning("job %d failed: %s", job.id, exc)
            self.store.fail_job(job, str(exc), exc.code, retry_in=None)
        except InferenceError as exc:
            self._retry_or_fail(job, str(exc), exc.code)
        except Exception as exc:  # a job must never take the service down
            log.exception("job %d failed unexpectedly", job.id)
            self._retry_or_fail(job, f"{type(exc).__name__}: {exc}", "unexpected")
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
        destinations = [d.name for d in self.settings.dispatch.destinations]
        self.store.complete_job(job, files, destinations, result.provider, package.package_hash, result.timings)
        log.info("job %d done: %s on %s, %s", job.id, package.ref, result.provider,
                 ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))

    def _write(self, folder: Path, kind: str, ds: Dataset, detail: dict[str, object]) -> ResultFile:
        path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return ResultFile(str(ds.SOPInstanceUID), kind, str(ds.SOPClassUID), path, dict(detail))
