"""``portico serve``: the SCP, the hand-off loop, the job runner and the dispatcher, in one process.

The same program runs one role per process or machine (``portico receive|work|dispatch``) over one shared
database (PostgreSQL) and one file store (a shared POSIX path): :class:`Role` says what each starts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from types import FrameType

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.atna_sender import AuditForwarder
from appliance.audit import AuditEvent, AuditRecord
from appliance.fl import build_supervisor
from appliance.handoff import HandOff
from appliance.health import Readiness
from appliance.jobs import JobRunner
from appliance.metrics import Ingest, MeteredOutbox, MeteredSink, Metrics, StateCollector
from appliance.models import ModelRegistry
from appliance.retention import Retention, fl_cohort_studies
from appliance.settings import Settings
from appliance.store import JOBS, OUTBOX, RECEIVED, Store
from dicom_router.dispatch import Dispatcher
from dicom_router.edge import RefusalCount
from dicom_router.rules import load_rules
from dicom_router.scp import StorageSCP
from fl_client.errors import BoxError, NotEnrolledError
from inference.runtime.onnxruntime import SessionCache, available_providers
from inference.runtime.workers import plan as worker_plan

log = logging.getLogger(__name__)

#: the longest an idle loop sleeps when commits wake it (a safety net, not the way work is found)
IDLE_WAIT_SECONDS = 30.0
#: how often a loop looks for work when no wake-up reaches it (roles in several processes over SQLite)
CROSS_PROCESS_POLL_SECONDS = 0.5


class Role(StrEnum):
    """What one process of a site runs; ``portico serve`` runs them all."""

    #: the C-STORE SCP and STOW-RS (several receivers may share one address), completeness and routing
    RECEIVE = "receive"
    #: inference workers claiming jobs with leases (one process per GPU or machine)
    WORK = "work"
    #: the outbox to every destination, ATNA forwarding and retention: run exactly one per site
    DISPATCH = "dispatch"


ALL_ROLES = frozenset(Role)


class Service:
    """Everything ``portico serve`` runs (or the ``roles`` given). ``start()`` returns once the SCP listens."""

    def __init__(self, settings: Settings, roles: frozenset[Role] = ALL_ROLES) -> None:
        self.settings = settings
        self.roles = roles
        self.store = Store.from_settings(settings, min_free_mb=settings.storage.min_free_mb)
        self.rules = load_rules(settings.rules_path)
        self.registry = ModelRegistry.from_settings(settings, audit=self.store.record, database=self.store.db)
        inference = settings.inference
        self.workers = worker_plan(inference.workers, inference.intra_op_threads, inference.providers,
                                   available_providers())
        self.sessions = SessionCache(settings.inference.max_sessions, settings.inference.session_memory_mb * 2**20,
                                     intra_op_threads=self.workers.intra_op_threads,
                                     cpu_memory_arena=settings.inference.cpu_memory_arena)
        self.metrics = Metrics()
        destinations = [d.name for d in settings.dispatch.destinations]
        self.metrics.known_destinations(destinations)
        self.handoff = HandOff(self.store, settings.router, self.rules, self.metrics)
        self.runner = JobRunner(settings, self.store, self.registry, self.sessions, self.metrics,
                                lease_seconds=settings.jobs.lease_seconds)
        self.dispatcher = Dispatcher(settings.dispatch, MeteredOutbox(self.store, self.metrics),
                                     settings.router.ae_title, tls=settings.router.tls,
                                     event_driven=settings.router.event_driven)
        self.scp = StorageSCP(settings.router, MeteredSink(self.store, self.metrics, Ingest.DIMSE),
                              report_refusals=self._audit_refusals, observe=self.metrics.association)
        min_free = settings.storage.min_free_mb * 2**20
        self.metrics.watch(StateCollector(self.store, settings.data_dir, min_free, destinations, self.sessions,
                                          lambda: self.scp.gate.associations))
        listening: dict[str, Callable[[], bool]] = {"scp": lambda: self.scp.is_running} \
            if Role.RECEIVE in roles else {}
        self.readiness = Readiness(self.store, settings.data_dir, min_free, listening)
        # the FL client trains beside the whole appliance; a site split into roles runs `portico fl run` apart
        self.fl = build_supervisor(settings, self.store) if settings.fl.enabled and roles == ALL_ROLES else None
        self.audit_forwarder = AuditForwarder(self.store, settings.audit, settings.router.ae_title)
        self.retention = Retention(self.store, settings.storage.retention, protected=fl_cohort_studies(settings))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.api = ApiServer(settings, create_app(settings, self.store, self)) if settings.api.enabled else None

    def start(self) -> None:
        if Role.DISPATCH in self.roles:
            self.audit_forwarder.start()  # first: every audit row from here on is queued for ATNA
        if Role.RECEIVE in self.roles:
            recovered = self.store.reindex()
            if recovered:
                log.warning("re-indexed %d instance file(s) the index had lost", recovered)
        # commits in other processes (other roles, other machines) wake this one's loops (PostgreSQL)
        self.store.db.listen(*([JOBS] if Role.WORK in self.roles else []),
                             *([OUTBOX] if Role.DISPATCH in self.roles else []))
        resumed = self.store.resume_interrupted() if Role.WORK in self.roles else 0
        self.store.record(AuditRecord(AuditEvent.SERVICE, detail={
            "action": "start", "jobs_resumed": resumed, "roles": sorted(self.roles)}))
        if resumed:
            log.info("resumed %d interrupted job(s)", resumed)
        if Role.RECEIVE in self.roles:
            self.scp.start()
            self._spawn("handoff", self._handoff_loop)
        if Role.WORK in self.roles:
            log.info("%d inference worker(s): %s", self.workers.workers, self.workers.reason)
            for n in range(self.workers.workers):
                self._spawn(f"jobs-{n}", self._job_loop)
            self._spawn("leases", self._lease_loop)
        if Role.DISPATCH in self.roles:
            self._spawn("dispatch", self._dispatch_loop)
            if self.settings.storage.retention.interval_minutes > 0:
                self._spawn("retention", self._retention_loop)
        if self.fl is not None:
            try:
                self.fl.start()
            except NotEnrolledError as exc:
                log.warning("federated learning is enabled but this site is not enrolled: %s", exc)
                self.fl = None
            except BoxError as exc:  # imaging goes on; the FL client does not start outside its box
                log.error("federated learning not started: %s", exc)
                self.fl = None
        if Role.RECEIVE in self.roles:
            log.info("listening as %s on %s:%d", self.settings.router.ae_title, self.settings.router.bind_host,
                     self.settings.router.port)
        if self.roles != ALL_ROLES:
            log.info("running as %s", " + ".join(sorted(self.roles)))
        if self.api is not None:
            try:
                self.api.start()
            except OSError:
                log.error("the API cannot listen on %s:%d; stopping", self.settings.api.host, self.settings.api.port)
                self.stop()
                raise

    def _audit_refusals(self, counts: list[RefusalCount]) -> None:
        for item in counts:
            self.store.record(AuditRecord(AuditEvent.CONNECTIONS_REFUSED, actor=item.address, detail={
                "reason": item.reason.value, "count": item.count, "description": item.description,
                "first": item.detail}))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=self._guard(name, target), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    loop()
                except Exception:  # keep the loop alive; the error is in the log
                    log.exception("%s loop error", name)
                    self._stop.wait(1.0)
        return run

    # Loops sleep until a commit wakes them (appliance.db.engine.Wakeups) or the next timed item falls due;
    # they poll only where no wake-up can reach them (roles in several processes over SQLite).

    def _idle_wait(self) -> float:
        """The longest a loop sleeps with nothing due."""
        reachable = self.store.db.wakes_other_processes or self.roles == ALL_ROLES
        return IDLE_WAIT_SECONDS if reachable else CROSS_PROCESS_POLL_SECONDS

    def _sleep(self, channel: str, token: int) -> None:
        due = self.store.next_due(channel)
        wait = self._idle_wait() if due is None else min(self._idle_wait(), max(0.0, due - time.time()) + 0.01)
        self.store.db.wakeups.wait(channel, token, wait)

    def _handoff_loop(self) -> None:
        token = self.store.db.wakeups.token(RECEIVED)
        self.handoff.tick()
        if self.store.open_studies():  # quiet timers and the PACS's count: looked at every poll_seconds
            self._stop.wait(self.settings.router.poll_seconds)
        else:  # nothing open: asleep until an instance arrives
            self.store.db.wakeups.wait(RECEIVED, token, IDLE_WAIT_SECONDS)

    def _job_loop(self) -> None:
        token = self.store.db.wakeups.token(JOBS)
        if self.runner.run_next() is None:
            self._sleep(JOBS, token)

    def _lease_loop(self) -> None:
        """Take back jobs whose worker died (its lease ran out), on whichever machine it ran."""
        self._stop.wait(self.settings.jobs.lease_seconds / 2)
        if not self._stop.is_set():
            self.store.resume_interrupted()

    def _retention_loop(self) -> None:
        try:
            self.retention.purge()
        except Exception:  # tried again at the next interval, not every second
            log.exception("retention purge failed")
        self._stop.wait(self.settings.storage.retention.interval_minutes * 60)

    def _dispatch_loop(self) -> None:
        token = self.store.db.wakeups.token(OUTBOX)
        self.dispatcher.run_once()
        self._sleep(OUTBOX, token)

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        self._stop.set()
        self.store.db.wakeups.interrupt()
        if Role.RECEIVE in self.roles:
            self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.fl is not None:
            self.fl.stop()
        self.store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "stop"}))
        if Role.DISPATCH in self.roles:
            self.audit_forwarder.stop()
        self.store.close()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT, then stop."""
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        done.wait()
        log.info("stopping")
        self.stop()
