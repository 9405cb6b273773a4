"""Review: a job's results held until a reviewer approves them, and reviewed SEGs as training labels.

When ``review`` settings hold a job's model, :class:`appliance.jobs.JobRunner` stores its results with
their outbox rows ``HELD`` (never due) and a ``HELD`` review, in one transaction. Approving releases
the held rows to every destination (``PENDING``, exactly once); rejecting cancels them
(``CANCELLED``, never sent). Results that were not held may be reviewed *retrospectively*: approving
records that they are fit to train on; rejecting keeps them out of training and cancels what is not
sent yet. Every decision is one transaction in the appliance database, audited as ``reviewed``.

SEGs Portico made whose job was approved (held or retrospectively) are the labels
:func:`approved_segs` offers to federated learning; rejected and unreviewed ones never are.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from appliance.audit import AuditEvent, AuditRecord
from appliance.db import jobs, outbox, reviews
from appliance.db.engine import Tx
from appliance.handoff import short
from appliance.settings import ReviewSettings
from appliance.store import OUTBOX, Job, JobState, OutboxState, ResultFile, Store

log = logging.getLogger(__name__)

class ReviewState(StrEnum):
    """Where a finished job stands with review."""

    #: results stored, not sent: waiting for a reviewer
    HELD = "HELD"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    #: taken back after it was sent: the destinations got an IOCM rejection note (appliance.withdraw)
    WITHDRAWN = "WITHDRAWN"
    #: not held and nobody reviewed it (never stored: the absence of a review row)
    UNREVIEWED = "UNREVIEWED"


class Decision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    WITHDRAW = "withdraw"


class ReviewError(Exception):
    """A review action that cannot be done; ``code`` is stable (``not_found``, ``conflict``)."""

    code = "review_error"


class ReviewNotFound(ReviewError):
    code = "not_found"


class ReviewConflict(ReviewError):
    code = "conflict"


@dataclass(frozen=True)
class Review:
    """One finished job as a reviewer sees it."""

    job: Job
    state: ReviewState
    #: whether its results were held for this review (False: released when the job finished)
    held: bool
    reviewer: str | None = None
    reason: str = ""
    decided_at: float | None = None
    #: ``cli`` or ``api``
    via: str | None = None
    results: tuple[ResultFile, ...] = ()
    #: outbox rows of the job, counted by state
    outbox: dict[str, int] = field(default_factory=dict)

    def measurements(self) -> list[dict[str, Any]]:
        """The per-segment measurements the job's SR carries (from the results' detail)."""
        return [m for r in self.results if r.kind == "sr" for m in r.detail.get("measurements", [])]


@dataclass(frozen=True)
class Outcome:
    """What a decision changed."""

    job_id: int
    state: ReviewState
    held: bool
    #: outbox rows released to the destinations (approve) or cancelled (reject)
    released: int = 0
    cancelled: int = 0
    #: rows already sent before a retrospective decision (they stay sent)
    already_sent: int = 0


@dataclass(frozen=True)
class LabelSeg:
    """A SEG Portico made, approved in review, for the image series its job ran on."""

    study_uid: str
    series_uid: str
    job_id: int
    path: Path


class Reviews:
    """The ``reviews`` table beside the store's jobs, results and outbox."""

    def __init__(self, store: Store, settings: ReviewSettings) -> None:
        self.store = store
        self.settings = settings

    # ---- holding ---------------------------------------------------------------------------------

    def hold_for(self, job: Job) -> Callable[[Tx], None] | None:
        """What :meth:`Store.complete_job` runs to hold ``job``'s results; ``None``: not held."""
        if not self.settings.holds(job.model):
            return None

        def hold(tx: Tx) -> None:
            if reviews.hold(tx, job.id, ReviewState.HELD, time.time()):
                held = outbox.count(tx, job.id, OutboxState.HELD)
                Store.audit_in(tx, AuditRecord(AuditEvent.HELD_FOR_REVIEW, job.study_uid, job.id,
                                               detail={"model": job.model, "outbox_held": held}))
        return hold

    # ---- reading ---------------------------------------------------------------------------------

    def get(self, job_id: int) -> Review:
        """The review of job ``job_id`` with its results and outbox counts.

        Raises
        ------
        ReviewNotFound
            When there is no such job.
        """
        job = self.store.job(job_id)
        if job is None:
            raise ReviewNotFound(f"no job {job_id}")
        with self.store.reading() as tx:
            row = reviews.get(tx, job_id)
            states = Counter(outbox.states_of_job(tx, job_id))
        return _review(job, row, tuple(self.store.results(job_id)), dict(states))

    def find(self, state: ReviewState | None = ReviewState.HELD) -> list[Review]:
        """Finished jobs in review ``state`` (``None``: every finished job and every reviewed one), oldest first.

        Results and outbox counts are left out; :meth:`get` has them.
        """
        with self.store.reading() as tx:
            rows = reviews.of_finished_jobs(tx, JobState.DONE)
        out = []
        for r in rows:
            found = ReviewState(r["state"]) if r["job_id"] is not None else ReviewState.UNREVIEWED
            if state is not None and found is not state:
                continue
            job = self.store.job(int(r["id"]))
            if job is not None:
                out.append(_review(job, r if r["job_id"] is not None else None))
        return out

    # ---- deciding --------------------------------------------------------------------------------

    def approve(self, job_id: int, reviewer: str, reason: str = "", *, via: str,
                retrospective: bool = False) -> Outcome:
        """Approve job ``job_id``'s results: held ones go to every destination; all become usable as labels.

        Raises
        ------
        ReviewNotFound
            When there is no such job.
        ReviewConflict
            When it was decided already, has no results, or was not held and ``retrospective`` is false.
        """
        return self._decide(job_id, Decision.APPROVE, reviewer, reason, via, retrospective)

    def reject(self, job_id: int, reviewer: str, reason: str, *, via: str, retrospective: bool = False) -> Outcome:
        """Reject job ``job_id``'s results: held ones are cancelled (never sent); none is ever a label.

        Raises
        ------
        ValueError
            When ``reason`` is empty.
        ReviewNotFound, ReviewConflict
            As for :meth:`approve`.
        """
        if not reason.strip():
            raise ValueError("a rejection needs a reason")
        return self._decide(job_id, Decision.REJECT, reviewer, reason, via, retrospective)

    def _decide(self, job_id: int, decision: Decision, reviewer: str, reason: str, via: str,
                retrospective: bool) -> Outcome:
        if not reviewer.strip():
            raise ValueError("a decision needs the reviewer's name")
        state = ReviewState.APPROVED if decision is Decision.APPROVE else ReviewState.REJECTED
        now = time.time()
        with self.store.transaction() as tx:
            job = jobs.get(tx, job_id)
            if job is None:
                raise ReviewNotFound(f"no job {job_id}")
            row = reviews.get(tx, job_id)
            if row is not None and row["state"] != ReviewState.HELD:
                raise ReviewConflict(f"job {job_id} was already {str(row['state']).lower()} by {row['reviewer']}")
            if row is None:
                if job.state != JobState.DONE:
                    raise ReviewConflict(f"job {job_id} has no results to review (it is {job.state})")
                if not retrospective:
                    raise ReviewConflict(
                        f"job {job_id} was not held for review: its results were released when it finished. "
                        "Review it retrospectively (--retrospective) to approve it as a training label or "
                        "keep it out of training")
                reviews.start_retrospective(tx, job_id, ReviewState.HELD, now)
            held = row is not None
            released, cancelled, sent = self._apply(tx, job_id, decision, held)
            reviews.decide(tx, job_id, state, now, reviewer, reason, via)
            outcome = Outcome(job_id, state, held, released, cancelled, sent)
            Store.audit_in(tx, AuditRecord(AuditEvent.REVIEWED, job.study_uid, job_id, actor=reviewer, detail={
                "decision": str(decision), "reason": reason, "held": held, "via": via, "model": job.model,
                "released": outcome.released, "cancelled": outcome.cancelled,
                "already_sent": outcome.already_sent}))
        log.info("job %d %s in review by %s (%s): %d released, %d cancelled", job_id, state.lower(), reviewer,
                 "held" if held else "retrospective", outcome.released, outcome.cancelled)
        return outcome

    @staticmethod
    def _apply(tx: Tx, job_id: int, decision: Decision, held: bool) -> tuple[int, int, int]:
        """Release or cancel the job's outbox rows; (released, cancelled, already sent)."""
        sent = outbox.count(tx, job_id, OutboxState.SENT)
        if decision is Decision.APPROVE:
            tx.notify(OUTBOX)
            return outbox.release(tx, job_id), 0, sent
        # not held: what is still waiting to go is stopped too; what went stays sent
        waiting = (OutboxState.HELD,) if held else (OutboxState.HELD, OutboxState.PENDING)
        return 0, outbox.cancel(tx, job_id, waiting, "rejected in review"), sent

    # ---- labels ----------------------------------------------------------------------------------

    def approved_segs(self) -> list[LabelSeg]:
        """Portico's SEGs whose job was approved: the latest approved job's per (study, series)."""
        with self.store.reading() as tx:
            rows = reviews.approved_segs(tx, ReviewState.APPROVED)
        latest: dict[tuple[str, str], LabelSeg] = {}
        for r in rows:
            latest[(r["study_uid"], r["series_uid"])] = LabelSeg(r["study_uid"], r["series_uid"], int(r["id"]),
                                                                 Path(r["path"]))
        return [s for s in latest.values() if s.path.is_file()]


def _review(job: Job, row: Any, results: tuple[ResultFile, ...] = (),
            outbox: dict[str, int] | None = None) -> Review:
    if row is None:
        return Review(job, ReviewState.UNREVIEWED, held=False, results=results, outbox=outbox or {})
    return Review(job, ReviewState(row["state"]), held=bool(row["held"]), reviewer=row["reviewer"],
                  reason=row["reason"] or "", decided_at=row["decided_at"], via=row["via"], results=results,
                  outbox=outbox or {})


def describe(review: Review) -> str:
    """One line for a list: job, state, study (short UID), model, reviewer. No patient identifiers."""
    job = review.job
    model = f"{job.model}@{job.model_version}" if job.model_version else job.model
    who = f" by {review.reviewer}" if review.reviewer else ""
    return f"{job.id:>6}  {review.state:<10}  study {short(job.study_uid)}  {model}{who}"
