"""ATNA pieces without a collector: the mapping table, the XML, the syslog framing, the queue, the settings."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance import atna_outbox
from appliance.atna_events import EVENTS, atna_event, outcome
from appliance.atna_message import AuditRow, Source, build, group_key
from appliance.audit import AuditEvent, AuditRecord
from appliance.settings import PATH_SETTINGS, Settings, SyslogSettings, load_settings
from appliance.store import Store
from appliance.syslog_client import format_message, octet_counted

SOURCE = Source("PORTICO@host", None, "portico", "PORTICO", "host", 42, "file://host/var/portico.sqlite3")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "var", fsync=False)
    yield s
    s.close()


def row(event: str, actor: str = "system", study: str | None = None, rid: int = 1, **detail: object) -> AuditRow:
    return AuditRow(rid, 1_764_000_000.25, event, study, None, actor, dict(detail))


def code_of(event: str, detail: dict[str, object] | None = None) -> tuple[str, str | None]:
    spec = atna_event(event)
    assert spec is not None, event
    kind = spec.event_type(detail or {})
    return spec.event_id.code, None if kind is None else kind.code


def test_the_events_the_issue_names_are_mapped() -> None:
    assert code_of("service", {"action": "start"}) == ("110100", "110120")
    assert code_of("service", {"action": "stop"}) == ("110100", "110121")
    assert code_of("received") == code_of("dispatched") == ("110104", None)
    assert code_of("signed_in") == ("110114", "110122") and code_of("signed_out") == ("110114", "110123")
    for alert in ("connections_refused", "quarantine_budget_spent", "quarantined"):
        assert code_of(alert)[0] == "110113"
    assert code_of("purged") == ("110105", None)
    assert code_of("audit_exported") == ("110101", None)
    assert code_of("atna_dropped") == ("110113", "110133")
    assert atna_event("job_state") is None and atna_event("routed") is None
    assert all(str(event) in {e.value for e in AuditEvent} for event in EVENTS)


def test_names_like_sign_ins_and_deletions_map_until_they_get_a_line() -> None:
    assert code_of("login_failed") == ("110114", "110122")
    assert outcome(atna_event("login_failed"), "login_failed", {}) == 4  # type: ignore[arg-type]
    assert code_of("logout") == ("110114", "110123") and code_of("sign_out_all") == ("110114", "110123")
    assert code_of("deleted_study") == ("110105", None)
    assert atna_event("signature_checked") is None


def test_outcome_rules() -> None:
    failed = atna_event("dispatch_failed")
    assert failed is not None
    assert outcome(failed, "dispatch_failed", {"permanent": False}) == 4
    assert outcome(failed, "dispatch_failed", {"permanent": True}) == 8
    locked = atna_event("sign_in_locked")
    assert locked is not None and outcome(locked, "sign_in_locked", {}) == 8


def test_received_rows_of_one_study_and_sender_aggregate() -> None:
    spec = atna_event("received")
    assert spec is not None
    rows = [row("received", "CT01", "1.2.3", rid=i, sop_class_uid=cls)
            for i, cls in enumerate(["1.2.840.10008.5.1.4.1.1.2"] * 2 + ["1.2.840.10008.5.1.4.1.1.4"])]
    assert len({group_key(spec, r) for r in rows}) == 1
    assert group_key(spec, row("received", "PACS", "1.2.3")) != group_key(spec, rows[0])
    root = ET.fromstring(build(spec, rows, SOURCE))
    counts = {c.get("UID"): c.get("NumberOfInstances") for c in root.iter("SOPClass")}
    assert counts == {"1.2.840.10008.5.1.4.1.1.2": "2", "1.2.840.10008.5.1.4.1.1.4": "1"}
    study = root.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == "1.2.3"
    assert [c.tag for c in root] == ["EventIdentification", "ActiveParticipant", "ActiveParticipant",
                                     "AuditSourceIdentification", "ParticipantObjectIdentification"]
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventDateTime") == "2025-11-24T16:00:00.250Z"


def test_hostile_text_cannot_break_the_xml() -> None:
    spec = atna_event("sign_in_failed")
    assert spec is not None
    nasty = 'x"/><Injected a="\x00\n'
    xml = build(spec, [row("sign_in_failed", nasty, reason="bad\npassword\x07", user=nasty)], SOURCE)
    root = ET.fromstring(xml)
    assert root.find(".//Injected") is None and b"\n" not in xml
    participant = root.find("ActiveParticipant")
    assert participant is not None and participant.get("UserID") == 'x"/><Injected a="\ufffd\ufffd'
    description = root.find(".//EventOutcomeDescription")
    assert description is not None and description.text == "bad password\ufffd"


def test_syslog_message_and_octet_counting() -> None:
    message = format_message(severity=5, timestamp=0.5, hostname="my host", app_name="portico", procid="7",
                             structured_data='[meta sequenceId="3"]', message="<a>é</a>".encode())
    assert message == ('<85>1 1970-01-01T00:00:00.500000Z myhost portico 7 IHE+RFC-3881 [meta sequenceId="3"] '
                       "\ufeff<a>é</a>").encode()
    assert octet_counted(b"abc") == b"3 abc"
    assert octet_counted(message).startswith(str(len(message)).encode() + b" <85>")


def test_queue_only_when_enabled_in_the_same_transaction(store: Store) -> None:
    store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
    assert atna_outbox.counts(store) == {}
    atna_outbox.set_enabled(store, True)
    store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "stop"}))
    assert atna_outbox.counts(store) == {"pending": 1}
    assert [r.id for r in atna_outbox.due(store, 10)] == [2]
    atna_outbox.mark(store, [2], atna_outbox.AtnaState.WRITTEN)
    assert atna_outbox.due(store, 10) == [] and atna_outbox.requeue_written(store) == 1
    atna_outbox.mark(store, [2], atna_outbox.AtnaState.WRITTEN)
    assert atna_outbox.confirm(store, written_before=0.0) == 0
    assert atna_outbox.confirm(store, written_before=2e9) == 1 and atna_outbox.counts(store) == {"sent": 1}


def test_a_failed_transaction_queues_nothing(store: Store) -> None:
    atna_outbox.set_enabled(store, True)
    with pytest.raises(RuntimeError), store.transaction() as db:
        Store.audit_in(db, AuditRecord(AuditEvent.SERVICE))
        raise RuntimeError("rolled back")
    assert atna_outbox.counts(store) == {} and store.audit_events() == []


def test_the_bound_drops_the_oldest_with_one_counted_row(store: Store) -> None:
    atna_outbox.set_enabled(store, True)
    for i in range(30):
        store.record(AuditRecord(AuditEvent.CONNECTIONS_REFUSED, actor="10.0.0.1", detail={"n": i}))
    assert atna_outbox.enforce_bound(store, 20) == 12  # down to 18, then the alert: 19
    assert atna_outbox.enforce_bound(store, 20) == 0
    drops = [e for e in store.audit_events() if e["event"] == "atna_dropped"]
    assert len(drops) == 1 and drops[0]["detail"]["dropped"] == 12
    assert atna_outbox.counts(store) == {"dropped": 12, "pending": 19}
    assert [r.id for r in atna_outbox.due(store, 1)] == [13]


def test_audit_settings(tmp_path: Path) -> None:
    assert Settings().audit.syslog is None
    assert SyslogSettings(host="collector").effective_port == 6514
    assert SyslogSettings(host="collector", transport="udp").effective_port == 514
    with pytest.raises(ValidationError, match="go together"):
        SyslogSettings(host="c", certificate="a.pem")
    with pytest.raises(ValidationError, match="need transport: tls"):
        SyslogSettings(host="c", transport="tcp", ca_bundle="ca.pem")
    with pytest.raises(ValidationError):
        SyslogSettings(host="c", app_name="has space")
    with pytest.raises(ValidationError):
        SyslogSettings(host="c", queue_max=1)
    assert ("audit", "syslog", "ca_bundle") in PATH_SETTINGS
    cfg = tmp_path / "portico.yaml"
    cfg.write_text("audit:\n  site_id: RXX\n  syslog:\n    host: audit.nhs.example\n    ca_bundle: tls/ca.pem\n"
                   "    certificate: tls/me.pem\n    private_key: tls/me.key\n", encoding="utf-8")
    syslog = load_settings(cfg).audit.syslog
    assert syslog is not None and syslog.ca_bundle == str(tmp_path / "tls" / "ca.pem")
    assert syslog.private_key == str(tmp_path / "tls" / "me.key")


def test_written_but_unconfirmed_rows_are_sent_again_after_a_restart(store: Store) -> None:
    """A crash (kill -9) between the write and its confirmation: the next start queues the row again."""
    from appliance.atna_sender import AuditForwarder
    from appliance.settings import AuditSettings
    from tests.support.net import free_port

    atna_outbox.set_enabled(store, True)
    store.record(AuditRecord(AuditEvent.SERVICE, detail={"action": "start"}))
    atna_outbox.mark(store, [1], atna_outbox.AtnaState.WRITTEN)
    sender = AuditForwarder(store, AuditSettings(syslog=SyslogSettings(host="127.0.0.1", port=free_port(),
                                                                       transport="tcp")), "PORTICO")
    sender.start()
    try:
        assert atna_outbox.counts(store) == {"pending": 1}
    finally:
        sender.stop(flush_seconds=0.2)
    assert atna_outbox.counts(store) == {"pending": 1}  # the collector never answered: still queued


def test_a_completeness_query_is_an_atna_query() -> None:
    spec = atna_event("queried")
    assert spec is not None and spec.event_id.code == "110112"
    answered = row("queried", study="1.2.3", peer="ORTHANC", answered=True, count=300,
                   sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1")
    root = ET.fromstring(build(spec, [answered], SOURCE))
    participants = root.findall("ActiveParticipant")
    assert [p.get("UserIsRequestor") for p in participants] == ["true", "false"]
    assert participants[1].get("UserID") == "ORTHANC"
    queried = root.find("ParticipantObjectIdentification")
    assert queried is not None and queried.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"
    query = queried.find("ParticipantObjectQuery")
    assert query is not None and "1.2.3" in base64.b64decode(query.text or "").decode()
    assert outcome(spec, "queried", {"answered": False}) == 4 and outcome(spec, "queried", {"answered": True}) == 0
