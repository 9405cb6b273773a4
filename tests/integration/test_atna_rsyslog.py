"""Audit events reach a real syslog collector (Debian rsyslogd) as IHE ATNA messages, and none are lost."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import atna_outbox
from appliance.atna_sender import AuditForwarder
from appliance.audit import AuditEvent, AuditRecord
from appliance.demo import PorticoProcess, portico_config
from appliance.settings import AuditSettings, SyslogSettings
from appliance.store import Store
from dicom_router.ports import ReceivedInstance
from tests.conftest import REPO
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port
from tests.support.polling import wait_for
from tests.support.rsyslog import Rsyslog, SyslogRecord, gtls_missing, rsyslog_missing

pytestmark = pytest.mark.slow

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
#: PS3.15 A.5.1: the elements of an AuditMessage, in order
ORDER = ("EventIdentification", "ActiveParticipant", "AuditSourceIdentification", "ParticipantObjectIdentification")


@pytest.fixture(autouse=True)
def _needs_rsyslog() -> None:
    missing = rsyslog_missing()
    if missing:
        pytest.fail(missing)


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[list[Rsyslog]]:
    started: list[Rsyslog] = []
    yield started
    for collector in started:
        collector.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "var", fsync=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def collector(collectors: list[Rsyslog], folder: Path, transport: str = "tcp", **kw: Any) -> Rsyslog:
    made = Rsyslog(folder, transport, **kw)
    made.start()
    collectors.append(made)
    return made


def forwarder(store: Store, syslog: SyslogSettings, **kw: Any) -> AuditForwarder:
    options: dict[str, Any] = {"confirm_seconds": 0.5, "poll_seconds": 0.1, "backoff_initial": 0.1,
                               "backoff_max": 0.5}
    return AuditForwarder(store, AuditSettings(syslog=syslog, site_id="RXX"), "PORTICO", **{**options, **kw})


def instance(study: str, n: int, sop_class: str, calling: str) -> ReceivedInstance:
    return ReceivedInstance(sop_class, f"{study}.1.{n}", study, f"{study}.1", "1.2.840.10008.1.2.1", calling,
                            "127.0.0.1", b"DICM" + bytes([n]) * 64)


def check_header(record: SyslogRecord) -> None:
    """RFC 5424 as IHE ITI-20 fills it."""
    assert record.version == "1" and record.facility == 10 and record.severity in (4, 5)
    assert record.timestamp.endswith("Z")
    dt.datetime.fromisoformat(record.timestamp.replace("Z", "+00:00"))
    assert record.hostname == socket.gethostname()
    assert record.app_name == "portico" and record.msgid == "IHE+RFC-3881"
    assert record.procid == str(os.getpid())  # the forwarder runs in this process
    assert record.bom and record.sequence_id is not None


def check_message(root: ET.Element) -> dict[str, Any]:
    """The key elements of a PS3.15 A.5.1 AuditMessage; returns what the counts need."""
    assert root.tag == "AuditMessage"
    tags = [child.tag for child in root]
    assert tags == sorted(tags, key=ORDER.index), tags
    assert tags[0] == "EventIdentification" and "ActiveParticipant" in tags and "AuditSourceIdentification" in tags
    ident = root[0]
    assert ident.get("EventActionCode") in ("C", "R", "U", "D", "E")
    dt.datetime.fromisoformat(str(ident.get("EventDateTime")).replace("Z", "+00:00"))
    outcome = int(str(ident.get("EventOutcomeIndicator")))
    assert outcome in (0, 4, 8, 12)
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("codeSystemName") == "DCM" and event_id.get("originalText")
    event_type = ident.find("EventTypeCode")
    for participant in root.findall("ActiveParticipant"):
        assert participant.get("UserID") and participant.get("UserIsRequestor") in ("true", "false")
        for role in participant.findall("RoleIDCode"):
            assert role.get("csd-code") and role.get("codeSystemName") == "DCM"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") and source.get("AuditEnterpriseSiteID") == "RXX"
    type_code = source.find("AuditSourceTypeCode")
    assert type_code is not None and type_code.get("csd-code") == "4"
    studies = {}
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID") and obj[0].tag == "ParticipantObjectIDTypeCode"
        if obj[0].get("csd-code") == "110180":
            counts = {c.get("UID"): int(str(c.get("NumberOfInstances"))) for c in obj.iter("SOPClass")}
            studies[obj.get("ParticipantObjectID")] = counts
    return {"event": (event_id.get("csd-code"), None if event_type is None else event_type.get("csd-code")),
            "outcome": outcome, "studies": studies,
            "participants": {p.get("UserID"): (p.get("UserIsRequestor"),
                                               [r.get("csd-code") for r in p.findall("RoleIDCode")])
                             for p in root.findall("ActiveParticipant")}}


def audit_event_of(store: Store) -> dict[int, str]:
    return {int(r["id"]): str(r["event"]) for r in store.db.query("SELECT id, event FROM audit")}


def test_every_mapped_event_reaches_rsyslog_over_tcp(tmp_path: Path, store: Store,
                                                     collectors: list[Rsyslog]) -> None:
    rsyslog = collector(collectors, tmp_path / "rsyslog")
    syslog = SyslogSettings(host="127.0.0.1", port=rsyslog.port, transport="tcp")
    atna_outbox.set_enabled(store, True)  # as forwarder.start() does; the events first, so groups are fixed
    store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
    for n in range(5):
        store.store(instance(STUDY_A, n, CT, "CT01"))
    for n, sop_class in enumerate((CT, CT, MR)):
        store.store(instance(STUDY_B, n, sop_class, "PACS"))
    store.store(instance(STUDY_A, 0, CT, "CT01"))  # duplicate: audited locally, no ATNA mapping
    store.quarantine(b"not dicom", "not a DICOM file", "CT01", "127.0.0.1")
    for reason in ("unknown_address", "tls_handshake_failed"):
        store.record(AuditRecord(AuditEvent.CONNECTIONS_REFUSED, actor="10.9.9.9",
                                 detail={"reason": reason, "count": 3}))
    for n in range(3):
        store.record(AuditRecord(AuditEvent.DISPATCHED, STUDY_A, 1, detail={"destination": "pacs",
                                                                            "sop_instance_uid": f"9.9.{n}"}))
    store.record(AuditRecord(AuditEvent.DISPATCH_FAILED, STUDY_A, 1, detail={
        "destination": "archive", "error": "connection refused", "permanent": False, "retry_in": 2}))
    store.record(AuditRecord(AuditEvent.SIGNED_IN, actor="alice", detail={"user": "alice", "address": "10.0.0.7"}))
    store.record(AuditRecord(AuditEvent.SIGN_IN_FAILED, actor="mallory", detail={"user": "mallory",
                                                                                 "address": "10.0.0.8"}))
    store.record(AuditRecord(AuditEvent.SIGNED_OUT, actor="alice", detail={"user": "alice"}))
    store.record(AuditRecord(AuditEvent.PURGED, STUDY_B, actor="retention", detail={"instances": 3}))
    store.record(AuditRecord(AuditEvent.QUARANTINE_BUDGET_SPENT, actor="stow-1", detail={"parts": 100}))
    store.record(AuditRecord(AuditEvent.MODEL_PROMOTED, actor="cli:root", detail={"model": "ct", "version": "2"}))
    store.record(AuditRecord(AuditEvent.ROUTED, STUDY_A, 1, detail={"rule": "r"}))  # not mapped
    store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "stop"}))
    sender = forwarder(store, syslog)
    sender.start()
    try:
        wait_for(lambda: len(rsyslog.lines()) >= 15, timeout=30, message="15 messages at the collector")
    finally:
        sender.stop()
    records = rsyslog.records()
    events = audit_event_of(store)
    seen = []
    for record in records:
        check_header(record)
        facts = check_message(record.xml())
        assert record.severity == (5 if facts["outcome"] == 0 else 4)
        seen.append((events[record.sequence_id or 0], facts))
    by_code = Counter(facts["event"] for _, facts in seen)
    assert by_code == {("110100", "110120"): 1, ("110100", "110121"): 1, ("110104", None): 4,
                       ("110113", "110126"): 2, ("110113", "110132"): 2, ("110113", "110131"): 1,
                       ("110114", "110122"): 2, ("110114", "110123"): 1, ("110105", None): 1}
    by_event = Counter(event for event, _ in seen)
    assert by_event == {"service": 2, "received": 2, "dispatched": 1, "dispatch_failed": 1, "quarantined": 1,
                        "connections_refused": 2, "signed_in": 1, "sign_in_failed": 1, "signed_out": 1,
                        "purged": 1, "quarantine_budget_spent": 1, "model_promoted": 1}
    received = [facts for event, facts in seen if event == "received"]
    assert sorted((f["studies"] for f in received), key=str) == [{STUDY_A: {CT: 5}}, {STUDY_B: {CT: 2, MR: 1}}]
    sent = next(facts for event, facts in seen if event == "dispatched")
    assert sent["studies"] == {STUDY_A: {None: 3}}
    assert sent["participants"]["pacs"] == ("false", ["110152"])
    first_received = next(f for f in received if STUDY_A in f["studies"])
    assert first_received["participants"]["CT01"] == ("true", ["110153"])
    failed = [facts for event, facts in seen if event in ("dispatch_failed", "sign_in_failed")]
    assert [f["outcome"] for f in failed] == [4, 4]
    assert atna_outbox.counts(store) == {"sent": 23, "skipped": 2}


def test_a_collector_restart_loses_nothing_at_least_once(tmp_path: Path, store: Store,
                                                         collectors: list[Rsyslog]) -> None:
    """Stop the collector, audit while it is away, start it again: every row arrives, some twice.

    Rows written just before the stop were not yet confirmed (``confirm_seconds``), so they are sent
    again: at least once, never lost. Rows sent once the collector is back and then closed cleanly
    arrive exactly once.
    """
    rsyslog = collector(collectors, tmp_path / "rsyslog")
    sender = forwarder(store, SyslogSettings(host="127.0.0.1", port=rsyslog.port, transport="tcp"),
                       confirm_seconds=30.0)
    sender.start()

    def refused(n: int, phase: str) -> None:
        for i in range(n):
            store.record(AuditRecord(AuditEvent.CONNECTIONS_REFUSED, actor=f"10.0.0.{i}",
                                     detail={"reason": "unknown_address", "count": 1, "phase": phase}))

    try:
        refused(5, "before")
        wait_for(lambda: len(rsyslog.lines()) == 5, timeout=20, message="5 messages before the stop")
        rsyslog.stop()
        refused(10, "while away")
        wait_for(lambda: atna_outbox.counts(store).get("pending") == 15, timeout=20,
                 message="the 5 unconfirmed rows back in the queue beside the 10 new ones")
        rsyslog.start()
        refused(3, "after")
        wait_for(lambda: len({r.sequence_id for r in rsyslog.records()}) == 18, timeout=30,
                 message="all 18 rows at the collector")
    finally:
        sender.stop()
    ids = Counter(r.sequence_id for r in rsyslog.records())
    expected = {int(r["id"]) for r in store.db.query("SELECT id FROM audit WHERE event = 'connections_refused'")}
    assert set(ids) == expected
    assert sorted(ids.values()) == [1] * 13 + [2] * 5  # the 5 unconfirmed at the stop came twice
    assert atna_outbox.counts(store) == {"sent": 18}  # the clean close at stop confirmed the rest


def test_tls_with_client_certificate(tmp_path: Path, store: Store, collectors: list[Rsyslog], pki: Pki,
                                     caplog: pytest.LogCaptureFixture) -> None:
    if gtls_missing():
        pytest.fail(str(gtls_missing()))
    rsyslog = collector(collectors, tmp_path / "rsyslog", "tls", server=pki.server, ca=pki.ca)
    client = pki.client("portico")
    good = SyslogSettings(host="localhost", port=rsyslog.port, transport="tls", ca_bundle=str(pki.ca.cert),
                          certificate=str(client.cert), private_key=str(client.key))
    sender = forwarder(store, good)
    sender.start()
    try:
        store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
        store.record(AuditRecord(AuditEvent.SIGNED_IN, actor="alice", detail={"user": "alice"}))
        wait_for(lambda: len(rsyslog.lines()) == 2, timeout=20, message="2 messages over TLS")
    finally:
        sender.stop()
    for record in rsyslog.records():
        check_header(record)
        check_message(record.xml())
    # without our certificate the collector closes the connection: nothing is marked sent, nothing lost
    caplog.set_level(logging.WARNING, logger="appliance.atna_sender")
    anonymous = forwarder(store, good.model_copy(update={"certificate": None, "private_key": None}))
    anonymous.start()
    try:
        store.record(AuditRecord(AuditEvent.SIGNED_OUT, actor="alice", detail={"user": "alice"}))
        wait_for(lambda: "the collector closed the connection" in caplog.text, timeout=20,
                 message="the refusal noticed")
        assert atna_outbox.counts(store).get("pending") == 1
    finally:
        anonymous.stop(flush_seconds=1.0)
    assert len(rsyslog.lines()) == 2


def test_tls_refuses_a_collector_we_do_not_trust(tmp_path: Path, store: Store, collectors: list[Rsyslog],
                                                 pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    if gtls_missing():
        pytest.fail(str(gtls_missing()))
    rsyslog = collector(collectors, tmp_path / "rsyslog", "tls", server=pki.wrong_ca_server, ca=pki.ca,
                        auth_mode="anon")
    caplog.set_level(logging.WARNING, logger="appliance.atna_sender")
    sender = forwarder(store, SyslogSettings(host="localhost", port=rsyslog.port, transport="tls",
                                             ca_bundle=str(pki.ca.cert)))
    sender.start()
    try:
        store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
        wait_for(lambda: "certificate verify failed" in caplog.text, timeout=20, message="the refusal logged")
    finally:
        sender.stop(flush_seconds=1.0)
    assert rsyslog.lines() == [] and atna_outbox.counts(store) == {"pending": 1}


def test_udp(tmp_path: Path, store: Store, collectors: list[Rsyslog]) -> None:
    rsyslog = collector(collectors, tmp_path / "rsyslog", "udp")
    sender = forwarder(store, SyslogSettings(host="127.0.0.1", port=rsyslog.port, transport="udp"))
    sender.start()
    try:
        store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
        for n in range(3):
            store.store(instance(STUDY_A, n, CT, "CT01"))
        store.record(AuditRecord(AuditEvent.SIGNED_IN, actor="alice", detail={"user": "alice"}))

        def received() -> int:
            return sum(check_message(r.xml())["studies"].get(STUDY_A, {}).get(CT, 0) for r in rsyslog.records())

        wait_for(lambda: received() == 3 and len(rsyslog.lines()) >= 3, timeout=20,
                 message="start, 3 instances and a sign-in at the collector")
    finally:
        sender.stop()
    for record in rsyslog.records():
        check_header(record)
        assert not record.message[:1].isdigit()  # one datagram, one message: no octet count (RFC 5426)
    assert atna_outbox.counts(store) == {"sent": 5}  # UDP: sent when written


def test_a_full_queue_drops_the_oldest_with_one_counted_alert(tmp_path: Path, store: Store,
                                                              collectors: list[Rsyslog]) -> None:
    port = free_port()  # nobody listens yet
    sender = forwarder(store, SyslogSettings(host="127.0.0.1", port=port, transport="tcp", queue_max=10))
    atna_outbox.set_enabled(store, True)
    for i in range(25):
        store.record(AuditRecord(AuditEvent.CONNECTIONS_REFUSED, actor="10.9.9.9", detail={"n": i}))
    sender.start()
    try:
        wait_for(lambda: atna_outbox.counts(store).get("dropped") == 16, timeout=20, message="16 dropped")
        drops = [e for e in store.audit_events() if e["event"] == "atna_dropped"]
        assert len(drops) == 1
        assert drops[0]["detail"] == {"dropped": 16, "first_audit_id": 1, "last_audit_id": 16, "queue_max": 10}
        rsyslog = collector(collectors, tmp_path / "rsyslog", port=port)
        wait_for(lambda: len(rsyslog.lines()) == 10, timeout=30, message="the 9 kept and the alert")
    finally:
        sender.stop()
    facts = [check_message(r.xml()) for r in rsyslog.records()]
    assert [f["event"] for f in facts].count(("110113", "110133")) == 1
    assert next(f for f in facts if f["event"] == ("110113", "110133"))["outcome"] == 8
    assert len([e for e in store.audit_events() if e["event"] == "atna_dropped"]) == 1


def test_portico_serve_sends_its_audit_over_tls(tmp_path: Path, collectors: list[Rsyslog], pki: Pki) -> None:
    """The whole service: start, three instances by C-STORE, stop; no patient data at the collector."""
    if gtls_missing():
        pytest.fail(str(gtls_missing()))
    from appliance.demo_study import write_ct_series
    from inference.phantom import make_phantom

    rsyslog = collector(collectors, tmp_path / "rsyslog", "tls", server=pki.server, ca=pki.ca)
    client = pki.client("portico")
    port = free_port()
    config = portico_config(tmp_path / "portico", port=port, orthanc_dicom_port=free_port(),
                            models_dir=REPO / "models", rules_file=REPO / "config" / "rules.yaml",
                            quiet_seconds=600, extra={"audit": {"syslog": {
                                "host": "localhost", "port": rsyslog.port, "transport": "tls",
                                "ca_bundle": str(pki.ca.cert), "certificate": str(client.cert),
                                "private_key": str(client.key)}, "site_id": "RXX"}})
    phantom = make_phantom((3, 32, 32), (2.5, 4.0, 4.0), seed=3)
    study = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "study", patient_name="ATNA^SECRET^NAME",
                            patient_id="ATNA-SECRET-ID")
    serve = PorticoProcess(config, port, tmp_path / "serve.log")
    serve.start()
    try:
        sent = subprocess.run(["storescu", "-aet", "ORTHANC", "-aec", "PORTICO", "127.0.0.1", str(port),
                               *map(str, study.paths)], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: any("110104" in line for line in rsyslog.lines()), timeout=30,
                 message="instances transferred at the collector")
    finally:
        serve.stop()
    wait_for(lambda: any('csd-code="110121"' in line for line in rsyslog.lines()), timeout=30,
             message="application stop at the collector")
    facts = [check_message(r.xml()) for r in rsyslog.records()]
    events = Counter(f["event"] for f in facts)
    assert events[("110100", "110120")] == 1 and events[("110100", "110121")] == 1
    received = sum(f["studies"][study.study_instance_uid][CT] for f in facts if f["event"] == ("110104", None))
    assert received == 3
    text = rsyslog.out.read_text(encoding="utf-8") + (tmp_path / "serve.log").read_text(errors="replace")
    assert "ATNA^SECRET" not in text and "ATNA-SECRET" not in text
    assert "audit chain anchor" in (tmp_path / "serve.log").read_text(errors="replace")
