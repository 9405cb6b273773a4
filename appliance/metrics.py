"""Prometheus metrics of one Portico process: events counted where they happen, state read at scrape time.

One :class:`Metrics` per process (per app in tests), each with its own
:class:`~prometheus_client.CollectorRegistry`, never the library's global one. Events (an instance
stored, a study handed off, a job finished, an item dispatched) are counted by the code that sees them:
the appliance wraps the store it hands to the lower floors (:class:`MeteredSink`, :class:`MeteredOutbox`)
and the DICOM listener reports each connection's outcome through its
:data:`~dicom_router.ports.AssociationObserver` port. State (jobs by state, the outbox per destination,
disk free, the model session cache) is computed from the store's public methods when Prometheus
scrapes (:class:`StateCollector`).

Labels carry only bounded, value-free words: a protocol, an outcome or reason code, a job state, a
configured destination's name. Never a UID, an AE title offered by a stranger, or a patient's anything.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from dicom_router.ports import AssociationOutcome, OutboxItem, ReceivedInstance, SpoolingSink, StoreOutcome

if TYPE_CHECKING:
    from appliance.store import Store
    from dicom_router.ports import Outbox
    from inference.runtime.onnxruntime import SessionCache

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE", "EXPORTED", "Ingest", "MeteredOutbox", "MeteredSink", "Metrics", "Stage",
           "StateCollector"]

#: the classic text format (what generate_latest writes), read by every Prometheus since 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: seconds: from a fraction of a second (a dispatch on loopback) to an hour (a study waiting its turn)
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: due items remembered for the dispatch latency; beyond this (items never marked) the memory is reset
_MAX_IN_FLIGHT = 10_000


class Ingest(StrEnum):
    """How an instance arrived."""

    DIMSE = "dimse"
    STOW = "stow"


class Stage(StrEnum):
    """The stages whose latency is measured (``portico_stage_duration_seconds{stage}``)."""

    #: the study's last instance received → the study handed off (the completeness wait)
    HANDOFF = "handoff"
    #: the study handed off → its job claimed by a worker (first attempt only)
    QUEUE = "queue"
    #: a worker runs the job: load, model, encode, results written and queued (successful jobs)
    INFERENCE = "inference"
    #: an outbox item picked up by the dispatcher → acknowledged by its destination
    DISPATCH = "dispatch"


class Metrics:
    """The counters and histograms of one process, in a registry of its own."""

    def __init__(self) -> None:
        # process-wide, as the library has it: no ``*_created`` series (twice the series, nothing a dashboard uses)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped in the library)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._instances = Counter("portico_instances_received", "Instances stored (new ones; duplicates apart)",
                                  ["protocol"], registry=r)
        self._duplicates = Counter("portico_instances_duplicate", "Instances received that were already held",
                                   ["protocol"], registry=r)
        self._quarantined = Counter("portico_instances_quarantined", "Received data kept in quarantine, not stored",
                                    ["protocol"], registry=r)
        self._bytes = Counter("portico_received_bytes", "Bytes of the instances stored", ["protocol"], registry=r)
        self._associations = Counter("portico_associations", "Connections to the DICOM listener by outcome",
                                     ["outcome"], registry=r)
        self._refused = Counter("portico_associations_refused", "Connections the edge refused, by reason",
                                ["reason"], registry=r)
        self._handed_off = Counter("portico_studies_handed_off", "Studies handed off to routing, by reason",
                                   ["reason"], registry=r)
        self._jobs = Counter("portico_jobs_finished", "Job attempts finished, by outcome (done, retry, failed)",
                             ["outcome"], registry=r)
        self._dispatched = Counter("portico_dispatched", "Outbox items delivered", ["destination"], registry=r)
        self._retries = Counter("portico_dispatch_retries", "Failed deliveries that will be tried again",
                                ["destination"], registry=r)
        self._failures = Counter("portico_dispatch_failures", "Deliveries given up for good", ["destination"],
                                 registry=r)
        self._stages = Histogram("portico_stage_duration_seconds", "Latency of each stage of a study's way through",
                                 ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self._steps = Histogram("portico_inference_step_duration_seconds", "Time of each step of a job",
                                ["step"], buckets=STAGE_BUCKETS, registry=r)
        for protocol in Ingest:
            for family in (self._instances, self._duplicates, self._quarantined, self._bytes):
                family.labels(protocol=protocol.value)
        for outcome in AssociationOutcome:
            self._associations.labels(outcome=outcome.value)
        for stage in Stage:
            self._stages.labels(stage=stage.value)
        for job_outcome in ("done", "retry", "failed"):
            self._jobs.labels(outcome=job_outcome)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # ---- events ------------------------------------------------------------------------------

    def instance(self, protocol: Ingest, outcome: StoreOutcome, size: int) -> None:
        """An instance went to the store: ``STORED`` (``size`` bytes) or ``DUPLICATE``."""
        if outcome is StoreOutcome.STORED:
            self._instances.labels(protocol=protocol.value).inc()
            self._bytes.labels(protocol=protocol.value).inc(size)
        else:
            self._duplicates.labels(protocol=protocol.value).inc()

    def quarantined(self, protocol: Ingest) -> None:
        self._quarantined.labels(protocol=protocol.value).inc()

    def association(self, outcome: AssociationOutcome, reason: str) -> None:
        """The DICOM listener's :data:`~dicom_router.ports.AssociationObserver`."""
        self._associations.labels(outcome=outcome.value).inc()
        if outcome is AssociationOutcome.REFUSED:
            self._refused.labels(reason=reason).inc()

    def handed_off(self, reason: str, waited: float) -> None:
        """A study was handed off (``count`` or ``quiet``), ``waited`` seconds after its last instance."""
        self._handed_off.labels(reason=reason).inc()
        self._stages.labels(stage=Stage.HANDOFF.value).observe(max(0.0, waited))

    def claimed(self, waited: float) -> None:
        """A job's first attempt was claimed ``waited`` seconds after its study was handed off."""
        self._stages.labels(stage=Stage.QUEUE.value).observe(max(0.0, waited))

    def job_finished(self, outcome: str, seconds: float | None = None,
                     steps: Mapping[str, float] | None = None) -> None:
        """A job attempt ended: ``done`` (with its duration and step timings), ``retry`` or ``failed``."""
        self._jobs.labels(outcome=outcome).inc()
        if seconds is not None:
            self._stages.labels(stage=Stage.INFERENCE.value).observe(seconds)
        for step, took in (steps or {}).items():
            self._steps.labels(step=step).observe(took)

    def dispatched(self, destination: str, seconds: float | None) -> None:
        self._dispatched.labels(destination=destination).inc()
        if seconds is not None:
            self._stages.labels(stage=Stage.DISPATCH.value).observe(max(0.0, seconds))

    def dispatch_failed(self, destination: str, *, permanent: bool) -> None:
        (self._failures if permanent else self._retries).labels(destination=destination).inc()

    def known_destinations(self, names: Iterable[str]) -> None:
        """Start the per-destination counters at zero, so that a dashboard shows every destination."""
        for name in names:
            for family in (self._dispatched, self._retries, self._failures):
                family.labels(destination=name)

    # ---- exposition --------------------------------------------------------------------------

    def watch(self, collector: Collector) -> None:
        """Add a scrape-time collector (:class:`StateCollector`) to this registry."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (``Content-Type``: :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class MeteredSink:
    """A :class:`~dicom_router.ports.SpoolingSink` that counts what passes through to ``sink``."""

    def __init__(self, sink: SpoolingSink, metrics: Metrics, protocol: Ingest) -> None:
        self._sink = sink
        self._metrics = metrics
        self._protocol = protocol

    @property
    def spool_dir(self) -> Path:
        return self._sink.spool_dir

    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        outcome = self._sink.store(instance)
        self._metrics.instance(self._protocol, outcome, len(instance.data))
        return outcome

    def store_file(self, instance: ReceivedInstance, path: Path) -> StoreOutcome:
        size = path.stat().st_size  # before: on STORED the file has moved
        outcome = self._sink.store_file(instance, path)
        self._metrics.instance(self._protocol, outcome, size)
        return outcome

    def quarantine(self, data: bytes, reason: str, calling_ae_title: str, peer_address: str) -> str:
        qid = self._sink.quarantine(data, reason, calling_ae_title, peer_address)
        self._metrics.quarantined(self._protocol)
        return qid

    def quarantine_file(self, path: Path, reason: str, calling_ae_title: str, peer_address: str) -> str:
        qid = self._sink.quarantine_file(path, reason, calling_ae_title, peer_address)
        self._metrics.quarantined(self._protocol)
        return qid


class MeteredOutbox:
    """An :class:`~dicom_router.ports.Outbox` that counts deliveries, retries and failures per destination.

    The dispatch latency is from :meth:`due` handing an item out to its :meth:`mark_sent`.
    """

    def __init__(self, outbox: Outbox, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[str, float]] = {}

    def due(self, limit: int) -> list[OutboxItem]:
        items = self._outbox.due(limit)
        now = self._clock()
        with self._lock:
            if len(self._in_flight) > _MAX_IN_FLIGHT:
                self._in_flight.clear()
            for item in items:
                self._in_flight.setdefault(item.id, (item.destination, now))
        return items

    def _taken(self, item_id: int) -> tuple[str, float] | None:
        with self._lock:
            return self._in_flight.pop(item_id, None)

    def mark_sent(self, item_id: int) -> None:
        self._outbox.mark_sent(item_id)
        taken = self._taken(item_id)
        if taken is not None:
            destination, since = taken
            self._metrics.dispatched(destination, self._clock() - since)

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None:
        self._outbox.mark_failed(item_id, error, retry_in_seconds, permanent)
        taken = self._taken(item_id)
        if taken is not None:
            self._metrics.dispatch_failed(taken[0], permanent=permanent)


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by themselves
class StateCollector(Collector):
    """Gauges computed from the store at scrape time.

    Parameters
    ----------
    store
        Read through its public methods only (``jobs``, ``destination_status``, ``outbox``, ``instance_count``).
    data_dir, min_free_bytes
        The data folder whose free space is reported, and the watermark below which the SCP refuses.
    destinations
        The configured destinations: each gets an outbox depth (0 when it has no items).
    sessions
        The model session cache of a process that runs inference.
    associations
        The number of DICOM associations running now, in a process that listens.
    clock
        Seconds since the epoch (the store's timestamps).
    """

    store: Store
    data_dir: Path
    min_free_bytes: int = 0
    destinations: Sequence[str] = ()
    sessions: SessionCache | None = None
    associations: Callable[[], int] | None = None
    clock: Callable[[], float] = field(default=time.time)

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only (the registry then does not call collect() on register)

    def collect(self) -> Iterator[Metric]:
        yield from self._disk()
        yield from self._sessions()
        if self.associations is not None:
            active = GaugeMetricFamily("portico_scp_associations_active", "DICOM associations running now")
            try:
                active.add_metric([], float(self.associations()))
            except Exception:  # the listener is not running (starting, stopping)
                active.add_metric([], 0.0)
            yield active
        up = GaugeMetricFamily("portico_state_up", "1 when the store answered this scrape's queries, else 0")
        try:
            families = list(self._store_state())
        except Exception:
            log.exception("metrics: the store did not answer")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _disk(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("portico_disk_free_bytes", "Bytes free for the appliance in the data folder")
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return
        free.add_metric([], float(st.f_bavail * st.f_frsize))
        yield free
        watermark = GaugeMetricFamily("portico_disk_min_free_bytes",
                                      "Below this many free bytes the appliance refuses new instances "
                                      "(storage.min_free_mb)")
        watermark.add_metric([], float(self.min_free_bytes))
        yield watermark

    def _sessions(self) -> Iterator[Metric]:
        cache = self.sessions
        if cache is None:
            return
        held = GaugeMetricFamily("portico_model_sessions", "Model runtimes held in the session cache")
        held.add_metric([], float(len(cache)))
        size = GaugeMetricFamily("portico_model_session_bytes", "Model file bytes of the runtimes held")
        size.add_metric([], float(cache.loaded_bytes))
        hits = CounterMetricFamily("portico_model_session_cache_hits", "Jobs that found their model loaded")
        hits.add_metric([], float(cache.hits))
        misses = CounterMetricFamily("portico_model_session_cache_misses", "Jobs that had to load their model")
        misses.add_metric([], float(cache.misses))
        yield from (held, size, hits, misses)

    def _store_state(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("portico_jobs", "Jobs by state", labels=["state"])
        by_state = Tally(self.store.job_counts())
        for state in ("PENDING", "RUNNING", "DONE", "FAILED"):
            jobs.add_metric([state], float(by_state.pop(state, 0)))
        for state, n in sorted(by_state.items()):
            jobs.add_metric([state], float(n))
        stored = GaugeMetricFamily("portico_instances_stored", "Instances held in the data folder")
        stored.add_metric([], float(self.store.instance_count()))
        items = GaugeMetricFamily("portico_outbox_items", "Outbox items per destination and state",
                                  labels=["destination", "state"])
        status = self.store.destination_status()
        for name in self.destinations:
            status.setdefault(name, {"states": {}})
        for name, entry in sorted(status.items()):
            states: dict[str, int] = dict(entry.get("states", {}))
            states.setdefault("PENDING", 0)
            for state, n in sorted(states.items()):
                items.add_metric([name, state], float(n))
        oldest = GaugeMetricFamily("portico_outbox_oldest_pending_age_seconds",
                                   "Age of the oldest item still to be delivered (0: none)", labels=["destination"])
        now = self.clock()
        first = {name: float(entry["oldest_pending"]) for name, entry in status.items()
                 if entry.get("oldest_pending") is not None}
        for name in sorted(status):
            oldest.add_metric([name], max(0.0, now - first[name]) if name in first else 0.0)
        yield from (jobs, stored, items, oldest)


#: every metric name a dashboard may query, as Prometheus stores them (counters with ``_total``,
#: histograms with ``_bucket``/``_sum``/``_count``); the Grafana dashboard's test checks against it
EXPORTED: frozenset[str] = frozenset({
    *(f"portico_{name}_total" for name in (
        "instances_received", "instances_duplicate", "instances_quarantined", "received_bytes", "associations",
        "associations_refused", "studies_handed_off", "jobs_finished", "dispatched", "dispatch_retries",
        "dispatch_failures", "model_session_cache_hits", "model_session_cache_misses")),
    *(f"portico_{name}_{suffix}" for name in ("stage_duration_seconds", "inference_step_duration_seconds")
      for suffix in ("bucket", "sum", "count")),
    "portico_jobs", "portico_instances_stored", "portico_outbox_items", "portico_outbox_oldest_pending_age_seconds",
    "portico_disk_free_bytes", "portico_disk_min_free_bytes", "portico_model_sessions",
    "portico_model_session_bytes", "portico_scp_associations_active", "portico_state_up",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds",
})
