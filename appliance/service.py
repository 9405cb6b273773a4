"""``portico serve``: the SCP, the hand-off loop, the job runner and the dispatcher, in one process."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from appliance.api.app import create_app
from appliance.api_server import ApiServer
from appliance.atna_sender import AuditForwarder
from appliance.audit import AuditEvent, AuditRecord
from appliance.fl import build_supervisor
from appliance.handoff import HandOff
from appliance.jobs import JobRunner
from appliance.models import ModelRegistry
from appliance.retention import Retention, fl_cohort_studies
from appliance.settings import Settings
from appliance.store import Store
from dicom_router.dispatch import Dispatcher
from dicom_router.edge import RefusalCount
from dicom_router.rules import load_rules
from dicom_router.scp import StorageSCP
from fl_client.errors import NotEnrolledError
from inference.runtime.onnxruntime import SessionCache

log = logging.getLogger(__name__)


class Service:
    """Everything ``portico serve`` runs. ``start()`` returns once the SCP is listening."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.data_dir, fsync=settings.storage.fsync,
                           min_free_mb=settings.storage.min_free_mb)
        self.rules = load_rules(settings.rules_path)
        self.registry = ModelRegistry.from_settings(settings, audit=self.store.record)
        self.sessions = SessionCache(settings.inference.max_sessions, settings.inference.session_memory_mb * 2**20,
                                     intra_op_threads=settings.inference.intra_op_threads,
                                     cpu_memory_arena=settings.inference.cpu_memory_arena)
        self.handoff = HandOff(self.store, settings.router, self.rules)
        self.runner = JobRunner(settings, self.store, self.registry, self.sessions)
        self.dispatcher = Dispatcher(settings.dispatch, self.store, settings.router.ae_title, tls=settings.router.tls,
                                     event_driven=settings.router.event_driven)
        self.scp = StorageSCP(settings.router, self.store, report_refusals=self._audit_refusals)
        self.fl = build_supervisor(settings, self.store) if settings.fl.enabled else None
        self.audit_forwarder = AuditForwarder(self.store, settings.audit, settings.router.ae_title)
        self.retention = Retention(self.store, settings.storage.retention, protected=fl_cohort_studies(settings))
        self._stop = threading.Event()
        self._wake_jobs = threading.Event()
        self._wake_dispatch = threading.Event()
        self._threads: list[threading.Thread] = []
        self.api = ApiServer(settings, create_app(settings, self.store, self)) if settings.api.enabled else None

    def start(self) -> None:
        self.audit_forwarder.start()  # first: every audit row from here on is queued for ATNA
        recovered = self.store.reindex()
        if recovered:
            log.warning("re-indexed %d instance file(s) the index had lost", recovered)
        resumed = self.store.resume_interrupted()
        self.store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start", "jobs_resumed": resumed}))
        if resumed:
            log.info("resumed %d interrupted job(s)", resumed)
        self.scp.start()
        self._spawn("handoff", self._handoff_loop)
        for n in range(self.settings.inference.workers):
            self._spawn(f"jobs-{n}", self._job_loop)
        self._spawn("dispatch", self._dispatch_loop)
        if self.settings.storage.retention.interval_minutes > 0:
            self._spawn("retention", self._retention_loop)
        if self.fl is not None:
            try:
                self.fl.start()
            except NotEnrolledError as exc:
                log.warning("federated learning is enabled but this site is not enrolled: %s", exc)
                self.fl = None
        log.info("listening as %s on %s:%d", self.settings.router.ae_title, self.settings.router.bind_host,
                 self.settings.router.port)
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

    def _handoff_loop(self) -> None:
        if self.handoff.tick():
            self._wake_jobs.set()
        self._stop.wait(self.settings.router.poll_seconds)

    def _job_loop(self) -> None:
        if self.runner.run_next() is not None:
            self._wake_dispatch.set()
            return
        self._wake_jobs.wait(0.5)
        self._wake_jobs.clear()

    def _retention_loop(self) -> None:
        try:
            self.retention.purge()
        except Exception:  # tried again at the next interval, not every second
            log.exception("retention purge failed")
        self._stop.wait(self.settings.storage.retention.interval_minutes * 60)

    def _dispatch_loop(self) -> None:
        self.dispatcher.run_once()
        self._wake_dispatch.wait(self.settings.dispatch.poll_seconds)
        self._wake_dispatch.clear()

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        self._stop.set()
        self._wake_jobs.set()
        self._wake_dispatch.set()
        self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.fl is not None:
            self.fl.stop()
        self.store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "stop"}))
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
