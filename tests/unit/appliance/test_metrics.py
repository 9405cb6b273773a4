"""Portico's Prometheus metrics: events counted through the wrappers, state read at scrape time, one registry each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from appliance.handoff import HandOff
from appliance.metrics import EXPORTED, Ingest, MeteredOutbox, MeteredSink, Metrics, Stage, StateCollector
from appliance.store import Store
from dicom_router.ports import AssociationOutcome, OutboxItem, ReceivedInstance, StoreOutcome
from dicom_router.rules import RuleSet
from dicom_router.settings import RouterSettings
from inference.runtime.onnxruntime import SessionCache

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = f"{STUDY}.1"
PATIENT = "Doe^Jane"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) → value."""
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def instance(n: int, size: int = 64) -> ReceivedInstance:
    return ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{SERIES}.{n}", STUDY, SERIES, "1.2.840.10008.1.2.1",
                            "PACS", "127.0.0.1", b"DICM" + PATIENT.encode() + bytes([n]) * size)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "var", fsync=False)
    yield store
    store.close()


def test_instances_and_bytes_are_counted_per_protocol_and_duplicates_apart(store: Store) -> None:
    metrics = Metrics()
    sink = MeteredSink(store, metrics, Ingest.DIMSE)
    first = instance(1)
    assert sink.store(first) is StoreOutcome.STORED
    assert sink.store(instance(2)) is StoreOutcome.STORED
    assert sink.store(first) is StoreOutcome.DUPLICATE
    sink.quarantine(b"junk", "unreadable", "PACS", "127.0.0.1")
    assert value(metrics, "portico_instances_received_total", protocol="dimse") == 2
    assert value(metrics, "portico_instances_duplicate_total", protocol="dimse") == 1
    assert value(metrics, "portico_instances_quarantined_total", protocol="dimse") == 1
    assert value(metrics, "portico_received_bytes_total", protocol="dimse") == 2 * len(first.data)
    assert value(metrics, "portico_instances_received_total", protocol="stow") == 0


def test_a_spooled_instance_is_counted_with_its_file_size(store: Store) -> None:
    metrics = Metrics()
    sink = MeteredSink(store, metrics, Ingest.STOW)
    spooled = sink.spool_dir / "part-1"
    spooled.write_bytes(b"DICM" + bytes(500))
    assert sink.store_file(instance(3, size=0), spooled) is StoreOutcome.STORED
    assert not spooled.exists()
    assert value(metrics, "portico_received_bytes_total", protocol="stow") == 504


def test_each_metrics_has_its_own_registry_and_none_uses_the_global_one(store: Store) -> None:
    one, two = Metrics(), Metrics()
    MeteredSink(store, one, Ingest.DIMSE).store(instance(4))
    assert value(one, "portico_instances_received_total", protocol="dimse") == 1
    assert value(two, "portico_instances_received_total", protocol="dimse") == 0
    assert REGISTRY.get_sample_value("portico_instances_received_total", {"protocol": "dimse"}) is None


def test_associations_by_outcome_and_refusals_by_reason() -> None:
    metrics = Metrics()
    metrics.association(AssociationOutcome.ACCEPTED, "")
    metrics.association(AssociationOutcome.REFUSED, "unknown_address")
    metrics.association(AssociationOutcome.REFUSED, "unknown_address")
    metrics.association(AssociationOutcome.REJECTED, "negotiation")
    assert value(metrics, "portico_associations_total", outcome="accepted") == 1
    assert value(metrics, "portico_associations_total", outcome="refused") == 2
    assert value(metrics, "portico_associations_total", outcome="rejected") == 1
    assert value(metrics, "portico_associations_refused_total", reason="unknown_address") == 2


def test_a_hand_off_is_counted_by_reason_with_its_wait(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    store.store(instance(5))
    handoff = HandOff(store, RouterSettings(quiet_seconds=1.0), RuleSet(rules=()), metrics)
    monkeypatch.setattr(handoff, "route", lambda run: None)  # routing reads real headers; not what is tested
    last = store.open_studies()[0].last_received
    handoff.tick(now=last + 5.0)
    assert value(metrics, "portico_studies_handed_off_total", reason="quiet") == 1
    assert value(metrics, "portico_stage_duration_seconds_count", stage=Stage.HANDOFF) == 1


def test_jobs_and_stages() -> None:
    metrics = Metrics()
    metrics.claimed(3.0)
    metrics.job_finished("done", 2.0, {"load": 0.5, "inference": 1.2})
    metrics.job_finished("retry")
    assert value(metrics, "portico_jobs_finished_total", outcome="done") == 1
    assert value(metrics, "portico_jobs_finished_total", outcome="retry") == 1
    assert value(metrics, "portico_stage_duration_seconds_sum", stage="queue") == 3.0
    assert value(metrics, "portico_stage_duration_seconds_sum", stage="inference") == 2.0
    assert value(metrics, "portico_inference_step_duration_seconds_count", step="load") == 1


@dataclass
class FakeOutbox:
    items: list[OutboxItem]
    sent: list[int] = field(default_factory=list)
    failed: list[tuple[int, bool]] = field(default_factory=list)

    def due(self, limit: int) -> list[OutboxItem]:
        return self.items[:limit]

    def mark_sent(self, item_id: int) -> None:
        self.sent.append(item_id)

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None:
        self.failed.append((item_id, permanent))


def test_deliveries_retries_and_failures_per_destination_with_the_dispatch_latency() -> None:
    metrics = Metrics()
    metrics.known_destinations(["pacs", "archive"])
    items = [OutboxItem(n, "pacs", Path(f"/r/{n}.dcm"), "1.2", f"1.2.{n}", 0) for n in (1, 2, 3)]
    clock = iter([100.0, 100.5, 101.0, 101.5])
    outbox = MeteredOutbox(FakeOutbox(items), metrics, clock=lambda: next(clock))
    assert outbox.due(10) == items
    outbox.mark_sent(1)
    outbox.mark_failed(2, "timeout", 4.0, False)
    outbox.mark_failed(3, "refused", 4.0, True)
    assert value(metrics, "portico_dispatched_total", destination="pacs") == 1
    assert value(metrics, "portico_dispatch_retries_total", destination="pacs") == 1
    assert value(metrics, "portico_dispatch_failures_total", destination="pacs") == 1
    assert value(metrics, "portico_dispatched_total", destination="archive") == 0
    assert value(metrics, "portico_stage_duration_seconds_sum", stage="dispatch") == 0.5


class FakeStore:
    """The three public store methods the collector reads (aggregates: no whole table is read)."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken

    def job_counts(self) -> dict[str, int]:
        if self.broken:
            raise RuntimeError("database is locked")
        return {"DONE": 2, "PENDING": 1, "FAILED": 1}

    def instance_count(self) -> int:
        return 12

    def destination_status(self) -> dict[str, dict[str, Any]]:
        return {"pacs": {"states": {"SENT": 4, "PENDING": 2}, "last_error": None, "next_retry_at": None,
                         "oldest_pending": 940.0}}


def test_state_is_read_at_scrape_time(tmp_path: Path) -> None:
    metrics = Metrics()
    sessions = SessionCache(2)
    metrics.watch(StateCollector(cast(Store, FakeStore()), tmp_path, 5 * 2**20, ["pacs", "archive"], sessions,
                                 lambda: 3, clock=lambda: 1000.0))
    got = samples(metrics)
    assert got[("portico_jobs", (("state", "DONE"),))] == 2
    assert got[("portico_jobs", (("state", "RUNNING"),))] == 0
    assert got[("portico_outbox_items", (("destination", "pacs"), ("state", "PENDING")))] == 2
    assert got[("portico_outbox_items", (("destination", "archive"), ("state", "PENDING")))] == 0
    assert got[("portico_outbox_oldest_pending_age_seconds", (("destination", "pacs"),))] == 60.0
    assert got[("portico_outbox_oldest_pending_age_seconds", (("destination", "archive"),))] == 0.0
    assert got[("portico_instances_stored", ())] == 12
    assert got[("portico_disk_free_bytes", ())] > 0
    assert got[("portico_disk_min_free_bytes", ())] == 5 * 2**20
    assert got[("portico_model_sessions", ())] == 0
    assert got[("portico_model_session_cache_misses_total", ())] == 0
    assert got[("portico_scp_associations_active", ())] == 3
    assert got[("portico_state_up", ())] == 1


def test_a_store_that_does_not_answer_makes_state_up_zero_not_a_failed_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.watch(StateCollector(cast(Store, FakeStore(broken=True)), tmp_path))
    got = samples(metrics)
    assert got[("portico_state_up", ())] == 0
    assert ("portico_jobs", (("state", "DONE"),)) not in got
    assert got[("portico_disk_free_bytes", ())] > 0


def test_every_metric_name_exported_is_listed_and_none_carries_patient_data(store: Store, tmp_path: Path) -> None:
    metrics = Metrics()
    MeteredSink(store, metrics, Ingest.DIMSE).store(instance(6))
    metrics.association(AssociationOutcome.REFUSED, "unknown_calling_ae")
    metrics.handed_off("count", 1.0)
    metrics.job_finished("done", 1.0, {"load": 0.1})
    metrics.dispatched("pacs", 0.2)
    metrics.dispatch_failed("pacs", permanent=False)
    metrics.dispatch_failed("pacs", permanent=True)
    metrics.watch(StateCollector(store, tmp_path, 0, ["pacs"], SessionCache(1), lambda: 0))
    names = {name for name, _ in samples(metrics)}
    portico = {n for n in names if n.startswith("portico_")}
    assert portico == {n for n in EXPORTED if n.startswith("portico_")}
    assert {n for n in EXPORTED if not n.startswith("portico_")} <= names
    text = metrics.exposition().decode()
    for secret in (PATIENT, STUDY, "PACS"):
        assert secret not in text
