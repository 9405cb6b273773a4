"""Site approvals of FL jobs: the appliance writes decisions, the site gate reads them.

One JSON file of decisions (``approvals.json``) and one file per job waiting (``pending/<job>.json``)
with the reason shown to the server. Writes are atomic renames, so the gate never reads half a file.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fl_client.layout import SiteLayout, read_json, write_json

DecisionKind = Literal["approved", "rejected"]


@dataclass(frozen=True)
class Decision:
    job_id: str
    decision: DecisionKind
    #: the job name and submitter the decision was made for: a job differing in either is not approved
    name: str
    submitter: str
    actor: str
    reason: str
    at: float
    #: the sha256 of the client app's content the approval binds (:func:`fl_client.job_review.content_hash`)
    client_app_sha256: str = ""
    #: what the administrator saw: trainer arguments, model, rounds, privacy floor, job hash
    review: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingJob:
    job_id: str
    name: str
    submitter: str
    reason: str
    first_seen: float
    last_seen: float
    attempts: int
    meta: dict[str, Any]


class Approvals:
    """Decisions and pending jobs in ``layout.control``."""

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.layout.control.mkdir(parents=True, exist_ok=True)
        with (self.layout.control / ".approvals.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _decisions(self) -> dict[str, Any]:
        data = read_json(self.layout.approvals, {})
        return data if isinstance(data, dict) else {}

    def decision(self, job_id: str) -> Decision | None:
        raw = self._decisions().get(job_id)
        return Decision(**raw) if isinstance(raw, dict) else None

    def decisions(self) -> list[Decision]:
        return [Decision(**v) for v in self._decisions().values() if isinstance(v, dict)]

    def decide(self, job_id: str, decision: DecisionKind, *, actor: str, reason: str = "",
               name: str | None = None, submitter: str | None = None, client_app_sha256: str = "",
               review: dict[str, Any] | None = None) -> Decision:
        """Record a decision. The job's name and submitter come from its pending record unless given.

        Raises
        ------
        KeyError
            When the job has not asked this site yet and ``name``/``submitter`` are not given.
        """
        with self._locked():
            pending = self.pending_job(job_id)
            if pending is None and (name is None or submitter is None):
                raise KeyError(job_id)
            made = Decision(job_id=job_id, decision=decision,
                            name=name if name is not None else pending.name if pending else "",
                            submitter=submitter if submitter is not None else pending.submitter if pending else "",
                            actor=actor, reason=reason, at=time.time(), client_app_sha256=client_app_sha256,
                            review=review or {})
            data = self._decisions()
            data[job_id] = asdict(made)
            write_json(self.layout.approvals, data)
            if decision == "rejected":
                self._update_pending(job_id, reason=f"rejected by the site: {reason}")
            return made

    def pending_job(self, job_id: str) -> PendingJob | None:
        self.layout.job_dir(job_id)  # validates the id: it names a file
        raw = read_json(self.layout.pending / f"{job_id}.json")
        return PendingJob(**raw) if isinstance(raw, dict) else None

    def pending(self) -> list[PendingJob]:
        """Jobs that asked to run here and were not (yet) allowed."""
        out = []
        for path in sorted(self.layout.pending.glob("*.json")):
            raw = read_json(path)
            if isinstance(raw, dict):
                out.append(PendingJob(**raw))
        return out

    def note_pending(self, job_id: str, *, name: str, submitter: str, command: str, reason: str,
                     meta: dict[str, Any]) -> None:
        now = time.time()
        old = self.pending_job(job_id)
        write_json(self.layout.pending / f"{job_id}.json", asdict(PendingJob(
            job_id=job_id, name=name, submitter=submitter, reason=reason,
            first_seen=old.first_seen if old else now, last_seen=now,
            attempts=(old.attempts if old else 0) + 1, meta={**meta, "last_command": command})))

    def _update_pending(self, job_id: str, reason: str) -> None:
        old = self.pending_job(job_id)
        if old is not None:
            write_json(self.layout.pending / f"{job_id}.json", {**asdict(old), "reason": reason})

    def clear_pending(self, job_id: str) -> None:
        (self.layout.pending / f"{job_id}.json").unlink(missing_ok=True)
