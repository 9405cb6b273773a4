"""DICOM PS3.15 A.5 audit messages (the successor of RFC 3881, as IHE ATNA sends them) from audit rows.

One message per audit row, or per group of rows for events the table aggregates (instances received
from one sender for one study, or sent to one destination, drained together). Studies are named by
their Study Instance UID only: no patient name or ID is held here, so none is sent.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.atna_events import AtnaEvent, Code, Shape, Subject, outcome

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
#: PS3.15 A.5.3 role and object codes
APPLICATION = Code("110150", "Application")
APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
NODE_ID = Code("110182", "Node ID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
#: Study Root Query/Retrieve Information Model - FIND
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
USER_IDENTIFIER = Code("11", "User Identifier", "RFC-3881")
URI = Code("12", "URI", "RFC-3881")
#: AuditSourceTypeCode 4: application server process
APPLICATION_SERVER = "4"
#: longest EventOutcomeDescription we write
_DESCRIPTION_MAX = 256
#: what XML 1.0 cannot carry, and line breaks (a collector may store one message per line)
_NOT_XML = re.compile("[^\t\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class AuditRow:
    """One audit row as the sender reads it."""

    id: int
    ts: float
    event: str
    study_uid: str | None
    job_id: int | None
    actor: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Source:
    """This appliance, as the messages name it."""

    #: AuditSourceID
    source_id: str
    #: AuditEnterpriseSiteID, when configured
    site_id: str | None
    #: our processes' UserID
    app_name: str
    ae_title: str
    hostname: str
    pid: int
    #: ParticipantObjectID of the audit trail itself
    audit_log_uri: str


def group_key(spec: AtnaEvent, row: AuditRow) -> tuple[Any, ...]:
    """Rows with equal keys, drained together, become one message (each row alone unless aggregated)."""
    if not spec.aggregate:
        return ("row", row.id)
    return ("group", row.event, row.study_uid, row.actor, row.detail.get("destination"))


def build(spec: AtnaEvent, rows: Sequence[AuditRow], source: Source) -> bytes:
    """The AuditMessage for ``rows`` (one row, or an aggregated group), UTF-8 XML with its declaration."""
    first = rows[0]
    root = ET.Element("AuditMessage")
    _event(root, spec, first, rows)
    for participant in _participants(spec, first, source):
        root.append(participant)
    audit_source = ET.SubElement(root, "AuditSourceIdentification",
                                 _attrs(AuditEnterpriseSiteID=source.site_id, AuditSourceID=source.source_id))
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for obj in _objects(spec, first, rows, source):
        root.append(obj)
    return (XML_DECLARATION + ET.tostring(root, encoding="unicode")).encode("utf-8")


def event_time(ts: float) -> str:
    """xsd:dateTime in UTC, milliseconds: ``2026-11-29T18:21:03.123Z``."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- parts -------------------------------------------------------------------------------------

def clean(text: str) -> str:
    """``text`` as XML can carry it on one line: other characters become U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


def _attrs(**values: str | None) -> dict[str, str]:
    return {k: clean(v) for k, v in values.items() if v is not None}


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _event(root: ET.Element, spec: AtnaEvent, first: AuditRow, rows: Sequence[AuditRow]) -> None:
    result = max(outcome(spec, r.event, r.detail) for r in rows)
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": spec.action, "EventDateTime": event_time(min(r.ts for r in rows)),
        "EventOutcomeIndicator": str(result)})
    _code(ident, "EventID", spec.event_id)
    event_type = spec.event_type(first.detail)
    if event_type is not None:
        _code(ident, "EventTypeCode", event_type)
    if result:
        said = first.detail.get("error") or first.detail.get("reason")
        if said:
            ET.SubElement(ident, "EventOutcomeDescription").text = clean(" ".join(str(said).split()))[
                :_DESCRIPTION_MAX]


def _participant(user_id: str, requestor: bool, role: Code | None = None, *, alternative: str | None = None,
                 access_point: str | None = None, access_point_type: str = "1") -> ET.Element:
    element = ET.Element("ActiveParticipant", _attrs(
        UserID=user_id, AlternativeUserID=alternative, UserIsRequestor="true" if requestor else "false",
        NetworkAccessPointID=access_point, NetworkAccessPointTypeCode=access_point_type if access_point else None))
    if role is not None:
        _code(element, "RoleIDCode", role)
    return element


def _us(source: Source, requestor: bool, role: Code | None, *, process: bool = False) -> ET.Element:
    alternative = str(source.pid) if process else f"AETITLES={source.ae_title}"
    return _participant(source.app_name, requestor, role, alternative=alternative, access_point=source.hostname)


def _address(detail: dict[str, Any]) -> str | None:
    value = detail.get("address")
    return str(value) if value else None


def _participants(spec: AtnaEvent, row: AuditRow, source: Source) -> list[ET.Element]:
    actor, by_us = row.actor, row.actor in ("", "system")
    shape = spec.shape
    if shape is Shape.APPLICATION:
        out = [_us(source, False, APPLICATION, process=True)]
        if not by_us:
            out.append(_participant(actor, True, APPLICATION_LAUNCHER))
        return out
    if shape is Shape.RECEIVED:
        return [_participant(actor, True, SOURCE, alternative=f"AETITLES={actor}"), _us(source, False, DESTINATION)]
    if shape is Shape.SENT:
        destination = str(row.detail.get("destination") or "unknown")
        return [_us(source, True, SOURCE), _participant(destination, False, DESTINATION)]
    if shape is Shape.QUERY:
        peer = str(row.detail.get("peer") or "unknown")
        return [_us(source, True, SOURCE), _participant(peer, False, DESTINATION, alternative=f"AETITLES={peer}")]
    if shape is Shape.AUTHENTICATION:
        address = _address(row.detail)
        return [_participant(actor, True, access_point=address, access_point_type="2"),
                _us(source, False, APPLICATION)]
    if shape is Shape.ALERT:
        out = [_us(source, False, APPLICATION)]
        if not by_us:
            address = _address(row.detail) or (actor if spec.subject is Subject.NODE and _is_address(actor)
                                                else None)
            out.append(_participant(actor, True, access_point=address, access_point_type="2"))
        return out
    # accessed, deleted, audit log and audit alerts: the actor (or we) did it
    if by_us:
        return [_us(source, True, APPLICATION)]
    return [_participant(actor, True, access_point=_address(row.detail), access_point_type="2"),
            _us(source, False, APPLICATION)]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _object(object_id: str, id_type: Code, *, type_code: str, role: str | None = None,
            name: str | None = None) -> ET.Element:
    element = ET.Element("ParticipantObjectIdentification", _attrs(
        ParticipantObjectID=object_id, ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role))
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    if name is not None:
        ET.SubElement(element, "ParticipantObjectName").text = clean(name)
    return element


def _detail(element: ET.Element, kind: str, value: str) -> None:
    ET.SubElement(element, "ParticipantObjectDetail",
                  {"type": kind, "value": base64.b64encode(value.encode("utf-8")).decode("ascii")})


def _study(row: AuditRow, rows: Sequence[AuditRow], counted: bool) -> ET.Element:
    study = _object(str(row.study_uid), STUDY_INSTANCE_UID, type_code="2", role="3")
    if counted:
        description = ET.SubElement(study, "ParticipantObjectDescription")
        classes = Counter(str(r.detail["sop_class_uid"]) if r.detail.get("sop_class_uid") else "" for r in rows)
        for sop_class, count in sorted(classes.items()):
            ET.SubElement(description, "SOPClass", _attrs(UID=sop_class or None, NumberOfInstances=str(count)))
    return study


def _objects(spec: AtnaEvent, row: AuditRow, rows: Sequence[AuditRow], source: Source) -> list[ET.Element]:
    shape = spec.shape
    if shape in (Shape.RECEIVED, Shape.SENT, Shape.ACCESSED, Shape.DELETED):
        if row.study_uid is None:
            return []
        return [_study(row, rows, counted=shape in (Shape.RECEIVED, Shape.SENT))]
    if shape is Shape.QUERY:
        # PS3.15 A.5.3.10: the SOP class queried, with the query's keys (a study UID and the count asked for)
        queried = _object(str(row.detail.get("sop_class_uid") or STUDY_ROOT_FIND), SOP_CLASS_UID, type_code="2",
                          role="3")
        ET.SubElement(queried, "ParticipantObjectQuery").text = base64.b64encode(json.dumps(
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": row.study_uid,
             "NumberOfStudyRelatedInstances": None}, sort_keys=True).encode("utf-8")).decode("ascii")
        _detail(queried, "TransferSyntax", "1.2.840.10008.1.2")
        return [queried] + ([_study(row, rows, counted=False)] if row.study_uid else [])
    if shape in (Shape.AUDIT_LOG, Shape.AUDIT_ALERT):
        log_object = _object(source.audit_log_uri, URI, type_code="2", role="13", name="Security Audit Log")
        if shape is Shape.AUDIT_ALERT:
            _detail(log_object, "Alert Description", json.dumps(row.detail, sort_keys=True))
        return [log_object]
    if shape is Shape.ALERT:
        subject = _subject(spec.subject, row)
        if subject is not None:
            _detail(subject, "Alert Description", json.dumps(row.detail, sort_keys=True))
            return [subject]
    return []


def _subject(subject: Subject, row: AuditRow) -> ET.Element | None:
    detail = row.detail
    if subject is Subject.NODE and row.actor:
        return _object(row.actor, NODE_ID, type_code="2")
    if subject is Subject.USER and detail.get("user"):
        return _object(str(detail["user"]), USER_IDENTIFIER, type_code="1", role="11")
    if subject is Subject.MODEL:
        named = (f"{detail['model']}@{detail.get('version', '')}" if detail.get("model")
                 else str(detail.get("source") or detail.get("folder") or "unknown"))
        return _object(f"model:{named}", URI, type_code="2")
    return None
