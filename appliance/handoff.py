"""From received instances to jobs: decide when a study is complete, then route it.

A study is handed off when the sending PACS's own count (C-FIND NumberOfStudyRelatedInstances) is
reached, or after ``router.quiet_seconds`` without a new instance. Each hand-off is a new run version;
instances that arrive after a hand-off open the study again and lead to the next version.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import time
from dataclasses import dataclass, field

from pydicom import dcmread

from appliance.audit import AuditEvent, AuditRecord
from appliance.metrics import Metrics
from appliance.routing_explain import explain, no_match_detail
from appliance.store import Run, Store
from dicom_router.assembly import count_study_instances, is_complete
from dicom_router.errors import TlsConfigError
from dicom_router.rules import RuleSet, SeriesHeaders, StudyHeaders
from dicom_router.settings import Peer, RouterSettings, TlsMode
from dicom_router.tls import client_context

log = logging.getLogger(__name__)

#: how often the PACS is asked for its count while instances are still arriving
QUERY_INTERVAL_SECONDS = 1.0
#: longest wait between counts asked of a peer that gave none (down, refusing): the interval doubles
#: after each failure up to this, so a study arriving while the PACS is down neither hammers it nor
#: logs a failure every second
MAX_QUERY_BACKOFF_SECONDS = 60.0


@dataclass
class HandOff:
    """One tick of this does all due work; the service calls it in a loop."""

    store: Store
    settings: RouterSettings
    rules: RuleSet
    #: counts hand-offs and the wait after each study's last instance
    metrics: Metrics | None = None
    _last_query: dict[str, float] = field(default_factory=dict)
    #: per peer AE title: seconds to wait before asking it again, while it gives no count
    _peer_backoff: dict[str, float] = field(default_factory=dict)
    #: the client context for C-FIND to peers with ``tls: required``, built on first use
    _tls_context: ssl.SSLContext | None = field(default=None, init=False, repr=False)
    _tls_error: str | None = field(default=None, init=False, repr=False)

    def _peer(self, ae_title: str) -> Peer | None:
        return next((p for p in self.settings.peers if p.ae_title == ae_title), None)

    def _count(self, peer: Peer, study_uid: str) -> int | None:
        context = None
        if peer.tls is TlsMode.REQUIRED:
            if self._tls_context is None:
                try:
                    self._tls_context = client_context(self.settings.tls)
                except TlsConfigError as exc:
                    if str(exc) != self._tls_error:  # once per distinct problem, not every tick
                        log.warning("no C-FIND to %s (TLS configuration: %s); completing on the quiet timer",
                                    peer.ae_title, exc)
                    self._tls_error = str(exc)
                    return None
            context = self._tls_context
        return count_study_instances(peer, self.settings.ae_title, study_uid, timeout=5.0,
                                     tls=self.settings.tls, context=context,
                                     event_driven=self.settings.event_driven)

    def _audit_query(self, peer: Peer, study_uid: str, counted: int | None, known: int | None) -> None:
        """Audit a C-FIND when it says something new: a first or changed count, or no answer after one."""
        failed_before = self._peer_backoff.get(peer.ae_title) is not None
        if (counted is not None and counted == known) or (counted is None and failed_before):
            return
        self.store.record(AuditRecord(AuditEvent.QUERIED, study_uid, actor="system", detail={
            "peer": peer.query_ae_title or peer.ae_title, "answered": counted is not None, "count": counted,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.2.2.1"}))

    def _note_count(self, peer: Peer, counted: int | None) -> None:
        """Back off from a peer that gave no count; ask it at the normal pace again once it answers."""
        if counted is not None:
            if self._peer_backoff.pop(peer.ae_title, None) is not None:
                log.info("C-FIND to %s answers again", peer.ae_title)
            return
        before = self._peer_backoff.get(peer.ae_title)
        wait = min(MAX_QUERY_BACKOFF_SECONDS, 2 * (before or QUERY_INTERVAL_SECONDS))
        self._peer_backoff[peer.ae_title] = wait
        if before is None:
            log.warning("C-FIND to %s gave no count; asking it again at most every %.0f s (backing off) "
                        "while studies from it also complete on the quiet timer", peer.ae_title,
                        MAX_QUERY_BACKOFF_SECONDS)

    def tick(self, now: float | None = None) -> list[Run]:
        """Hand off every complete study and route every unrouted run; returns the runs routed."""
        now = time.time() if now is None else now
        for study in self.store.open_studies():
            expected = study.expected_count
            peer = self._peer(study.calling_ae)
            if (peer is not None and peer.query_port is not None
                    and (expected is None or study.received_count < expected)
                    and now - self._last_query.get(study.study_uid, 0.0)
                    >= self._peer_backoff.get(peer.ae_title, QUERY_INTERVAL_SECONDS)
                    and now - self._last_query.get(f"peer:{peer.ae_title}", 0.0)
                    >= self._peer_backoff.get(peer.ae_title, 0.0)):
                self._last_query[study.study_uid] = self._last_query[f"peer:{peer.ae_title}"] = now
                counted = self._count(peer, study.study_uid)
                self._audit_query(peer, study.study_uid, counted, expected)
                self._note_count(peer, counted)
                if counted is not None and counted != expected:
                    self.store.set_expected_count(study.study_uid, counted)
                    expected = counted
            if is_complete(study.received_count, study.last_received, now, self.settings.quiet_seconds,
                           expected):
                reason = "count" if expected is not None and study.received_count >= expected else "quiet"
                run = self.store.hand_off(study.study_uid, reason)
                self._last_query.pop(study.study_uid, None)
                if run is not None and self.metrics is not None:
                    self.metrics.handed_off(reason, run.created - run.last_received)
        routed = []
        for run in self.store.unrouted_runs():
            self.route(run)
            routed.append(run)
        return routed

    def route(self, run: Run) -> None:
        series = self.store.series_of(run.study_uid, run.version)
        headers = StudyHeaders(
            study_uid=run.study_uid,
            series=tuple(SeriesHeaders(series_uid=uid, header=dcmread(paths[0], stop_before_pixels=True),
                                       instance_count=len(paths)) for uid, paths in series.items()),
        )
        routes = self.rules.route(headers)
        members = self.store.series_members(run.study_uid, run.version)
        # with no route, the audit row says which series were considered and why each rule failed
        no_match = None if routes else no_match_detail(explain(self.rules, headers))
        ids = self.store.record_routes(run, [(r.rule, r.model, r.model_version, r.series_uid,
                                              content_key(members[r.series_uid])) for r in routes],
                                       no_match=no_match, priorities={r.rule: r.priority for r in routes})
        log.info("study %s run %d: %d job(s) %s", short(run.study_uid), run.version, len(ids),
                 [r.model for r in routes] or "(no rule matched)")


def content_key(sop_instance_uids: list[str]) -> str:
    """Identifies a series' exact content: the sorted SOP Instance UIDs it holds."""
    return hashlib.sha256("\\".join(sorted(sop_instance_uids)).encode()).hexdigest()


def short(uid: str) -> str:
    """A shortened UID for log lines."""
    return f"…{uid[-12:]}" if len(uid) > 12 else uid
