"""STOW-RS (and C-STORE) against a hostile or broken sender, on a real ``portico serve``.

A flood of junk parts is bounded (quarantine files and audit rows capped, said once, service up);
a Study UID of digits and dots that is not a UID (``1..2``) is refused and quarantined by STOW-RS
and C-STORE alike; one request beyond ``router.stow_max_concurrent`` is answered 503 before its body.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from io import BytesIO
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.integration.conftest import Appliance
from tests.support.net import free_port
from tests.support.polling import wait_for, wait_for_api
from tests.support.stow import CONTENT_TYPE, PATIENT_NAME, ct_instance, multipart

SENDER_TOKEN = "hostile-test-sender-t0ken"
ADMIN_TOKEN = "hostile-test-admin-t0ken"
STOW_HEADERS = {"Authorization": f"Bearer {SENDER_TOKEN}", "Content-Type": CONTENT_TYPE}


def _serve(portico_factory: Callable[..., Appliance], **router: Any) -> tuple[Appliance, str]:
    api_port = free_port()
    app = portico_factory(free_port(), extra={
        "router": {"stow_senders": [{"name": "PACSWEB", "token": SENDER_TOKEN, "hosts": ["127.0.0.1"]}], **router},
        "api": {"enabled": True, "host": "127.0.0.1", "port": api_port, "token": ADMIN_TOKEN}})
    base = f"http://127.0.0.1:{api_port}"

    wait_for_api(base)
    return app, base


def _post(base: str, body: bytes, path: str = "/dicom-web/studies") -> httpx.Response:
    return httpx.post(f"{base}{path}", content=body, headers=STOW_HEADERS, timeout=120)


def test_a_flood_of_junk_parts_is_bounded(portico_factory: Callable[..., Appliance]) -> None:
    # defaults: 100 quarantined parts per sender and hour
    app, base = _serve(portico_factory)
    junk = multipart(*[b"junk %04d" % i for i in range(2000)])
    assert len(junk) < 150_000  # the reported attack: one ~92 KB request
    for _ in range(2):
        response = _post(base, junk)
        assert response.status_code == 409, response.text
        assert len(response.json()["00081198"]["Value"]) == 2000
        assert "quarantine budget" in response.headers["warning"]

    quarantine = app.process.config.parent / "var" / "quarantine"
    assert len(list(quarantine.iterdir())) == 100
    store = app.store()
    try:
        events = [e["event"] for e in store.audit_events()]
        assert events.count("quarantined") == 100 and events.count("quarantine_budget_spent") == 1
        assert len(events) < 110
    finally:
        store.close()

    # still up, and a good study still goes in
    study, series = generate_uid(), generate_uid()
    good = _post(base, multipart(*(ct_instance(study, series, n) for n in range(3))), f"/dicom-web/studies/{study}")
    assert good.status_code == 200, good.text
    log = app.log_text()
    assert log.count("quarantine budget spent") == 1
    assert log.count("part refused") <= 20  # ten per request, then only counted
    assert "Traceback" not in log and PATIENT_NAME not in log


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_study_uid_of_digits_and_dots_that_is_not_a_uid(portico_factory: Callable[..., Appliance]) -> None:
    app, base = _serve(portico_factory)
    series = generate_uid()
    good_study = generate_uid()
    response = _post(base, multipart(ct_instance("1..2", series, 1), ct_instance(good_study, series, 2)))
    assert response.status_code == 202, response.text  # not a 500 with half the request stored
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(response.json()["00081199"]["Value"]) == 1

    # the same instance by C-STORE: a failure status and a quarantined copy (it used to be 0xC211, nothing kept)
    ds = dcmread(BytesIO(ct_instance("1..2", series, 3)))
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="PORTICO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0xC210

    store = app.store()
    try:
        quarantined = store.quarantined()
        assert len(quarantined) == 2 and all("StudyInstanceUID" in q["reason"] for q in quarantined)
        assert {q["calling_ae"] for q in quarantined} == {"PACSWEB", "ORTHANC"}
        assert store.instance_count() == 1 and store.instance_count(good_study) == 1
    finally:
        store.close()
    assert "Traceback" not in app.log_text()


def test_one_request_beyond_the_concurrency_cap_is_503(portico_factory: Callable[..., Appliance]) -> None:
    app, base = _serve(portico_factory, stow_max_concurrent=1)
    study, series = generate_uid(), generate_uid()
    body = multipart(ct_instance(study, series, 1))
    port = int(base.rsplit(":", 1)[1])
    # the first request sends its headers and part of its body, then holds its slot
    held = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        held.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SENDER_TOKEN}"
                     f"\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        other = multipart(ct_instance(study, series, 2))

        def busy() -> httpx.Response | None:
            response = _post(base, other)
            return response if response.status_code == 503 else None

        refused = wait_for(busy, timeout=30, message="a second request refused while the first holds the only slot")
        assert refused is not None
        assert refused.headers["retry-after"].isdigit() and refused.json()["code"] == "busy"
        assert "stow_max_concurrent" in refused.json()["message"]
        held.sendall(body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = held.recv(65536)
            assert data, "the held request got no answer"
            answer += data
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    finally:
        held.close()
    # the slot is free again
    assert _post(base, multipart(ct_instance(study, series, 3))).status_code == 200
    assert "stow_max_concurrent" in app.log_text()


def test_a_stalled_body_is_cut_short_and_frees_its_slot(portico_factory: Callable[..., Appliance]) -> None:
    app, base = _serve(portico_factory, stow_max_concurrent=1, stow_idle_seconds=1)
    study, series = generate_uid(), generate_uid()
    first = ct_instance(study, series, 1)
    body = multipart(first, ct_instance(study, series, 2))
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        # the first part whole, then a few bytes of the second, then nothing
        cut = body.index(first) + len(first) + 50
        slow.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SENDER_TOKEN}"
                     f"\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:cut])
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = slow.recv(65536)
            assert data, "the stalled request got no answer"
            answer += data
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    # the part that arrived whole was stored; the slot is free for the next request
    assert _post(base, multipart(ct_instance(study, series, 3))).status_code == 200
    store = app.store()
    try:
        assert store.instance_count(study) == 2
    finally:
        store.close()
    assert "stalled" in app.log_text()
