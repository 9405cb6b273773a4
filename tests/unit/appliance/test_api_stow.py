"""``POST /dicom-web/studies``: STOW-RS into the real store, with the senders' own credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.uid import generate_uid

from appliance.api.app import create_app
from appliance.settings import Settings
from appliance.store import Store
from tests.support.stow import CONTENT_TYPE, PATIENT_NAME, ct_instance, multipart

ADMIN = "admin-t0ken-for-tests"
SENDER = "sender-t0ken-for-tests"
STOW_HEADERS = {"Authorization": f"Bearer {SENDER}", "Content-Type": CONTENT_TYPE}


def _settings(tmp_path: Path, hosts: tuple[str, ...] = ("testclient",), **router: object) -> Settings:
    return Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(tmp_path / "models")},
        "router": {"stow_senders": [{"name": "PACSWEB", "token": SENDER, "hosts": list(hosts)}], **router},
        "api": {"enabled": True, "token": ADMIN}})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(_settings(tmp_path).data_dir, fsync=False)
    yield store
    store.close()


@pytest.fixture
def client(tmp_path: Path, store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path), store), raise_server_exceptions=False) as client:
        yield client


def test_a_study_is_stored_indexed_and_audited(client: TestClient, store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    body = multipart(*(ct_instance(study, series, n) for n in range(4)))
    response = client.post(f"/dicom-web/studies/{study}", content=body, headers=STOW_HEADERS)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert len(response.json()["00081199"]["Value"]) == 4
    assert store.instance_count(study) == 4
    received = [e for e in store.audit_events(study) if e["event"] == "received"]
    assert len(received) == 4 and {e["actor"] for e in received} == {"PACSWEB"}
    assert PATIENT_NAME not in response.text


def test_partial_failure_is_202_with_the_failed_part_quarantined(client: TestClient, store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    body = multipart(ct_instance(study, series, 1), b"\0" * 128 + b"DICM" + b"\x02\x00")
    response = client.post("/dicom-web/studies", content=body, headers=STOW_HEADERS)
    assert response.status_code == 202
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert store.instance_count(study) == 1 and len(store.quarantined()) == 1


def test_credentials_are_kept_apart(client: TestClient) -> None:
    body = multipart(ct_instance(generate_uid(), generate_uid(), 1))
    no_token = client.post("/dicom-web/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    admin = client.post("/dicom-web/studies", content=body,
                        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": CONTENT_TYPE})
    assert no_token.status_code == admin.status_code == 401
    assert admin.json()["code"] == "unauthorized"
    assert client.get("/status", headers={"Authorization": f"Bearer {SENDER}"}).status_code == 401
    assert client.get("/status", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_a_sender_only_from_its_own_addresses(tmp_path: Path, store: Store) -> None:
    app = create_app(_settings(tmp_path, hosts=("10.1.2.3",)), store)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/dicom-web/studies", content=multipart(ct_instance(generate_uid(), generate_uid(), 1)),
                               headers=STOW_HEADERS)
    assert response.status_code == 401 and store.instance_count() == 0


def test_bad_requests_are_4xx_with_a_reason(tmp_path: Path, store: Store) -> None:
    with TestClient(create_app(_settings(tmp_path, stow_max_request_mb=1), store),
                    raise_server_exceptions=False) as client:
        wrong_type = client.post("/dicom-web/studies", content=b"x",
                                 headers={**STOW_HEADERS, "Content-Type": "application/dicom"})
        assert wrong_type.status_code == 415 and "multipart/related" in wrong_type.json()["message"]
        too_big = client.post("/dicom-web/studies", content=b"x" * (2**20 + 1), headers=STOW_HEADERS)
        assert too_big.status_code == 413 and too_big.json()["code"] == "too_large"
        framing = client.post("/dicom-web/studies", content=b"--nothing", headers=STOW_HEADERS)
        assert framing.status_code == 400
        bad_uid = client.post("/dicom-web/studies/not-a-uid", content=b"", headers=STOW_HEADERS)
        assert bad_uid.status_code == 422
    assert store.instance_count() == 0


def test_sender_tokens_must_be_real_and_distinct() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        Settings.model_validate({"router": {"stow_senders": [{"name": "A", "token": "change-me"}]}})
    with pytest.raises(ValidationError, match="its own token"):
        Settings.model_validate({"mode": "dev", "router": {"stow_senders": [{"name": "A", "token": "same-secret"},
                                                                            {"name": "B", "token": "same-secret"}]}})
    with pytest.raises(ValidationError, match=r"differ from api\.token"):
        Settings.model_validate({"mode": "dev", "api": {"token": "same-secret"},
                                 "router": {"stow_senders": [{"name": "A", "token": "same-secret"}]}})


def _chunks(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """The body as a chunked upload (no Content-Length): the size cap is met while reading."""
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_over_the_request_cap_mid_stream_reports_what_was_stored(tmp_path: Path, store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    body = multipart(ct_instance(study, series, 1), b"x" * (2 * 2**20))
    with TestClient(create_app(_settings(tmp_path, stow_max_request_mb=1), store),
                    raise_server_exceptions=False) as client:
        response = client.post("/dicom-web/studies", content=_chunks(body), headers=STOW_HEADERS)
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert len(response.json()["00081199"]["Value"]) == 1 and store.instance_count(study) == 1
    assert "stow_max_request_mb" in response.headers["warning"] and response.headers["connection"] == "close"


def test_too_many_parts_answer_413_with_the_stored_ones(tmp_path: Path, store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    body = multipart(*(ct_instance(study, series, n) for n in range(4)))
    with TestClient(create_app(_settings(tmp_path, stow_max_parts=2), store),
                    raise_server_exceptions=False) as client:
        response = client.post("/dicom-web/studies", content=body, headers=STOW_HEADERS)
    assert response.status_code == 413
    assert len(response.json()["00081199"]["Value"]) == 2 and store.instance_count(study) == 2
    assert response.headers["warning"].startswith('299 portico "the request has more than 2 parts')


def test_a_spent_quarantine_budget_is_audited_once(tmp_path: Path, store: Store) -> None:
    junk = multipart(*[b"junk"] * 30)
    with TestClient(create_app(_settings(tmp_path, stow_quarantine_parts_per_hour=10), store),
                    raise_server_exceptions=False) as client:
        for _ in range(3):
            response = client.post("/dicom-web/studies", content=junk, headers=STOW_HEADERS)
            assert response.status_code == 409 and "quarantine budget" in response.headers["warning"]
    assert len(store.quarantined()) == 10
    events = [e["event"] for e in store.audit_events()]
    assert events.count("quarantined") == 10 and events.count("quarantine_budget_spent") == 1
    spent = next(e for e in store.audit_events() if e["event"] == "quarantine_budget_spent")
    assert spent["actor"] == "PACSWEB" and spent["detail"]["parts_per_hour"] == 10


def test_a_big_instance_is_spooled_and_moved_into_the_store(client: TestClient, store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    big = ct_instance(study, series, 1, rows=1500)  # 4.5 MB: over the in-memory size
    response = client.post("/dicom-web/studies", content=_chunks(multipart(big, ct_instance(study, series, 2))),
                           headers=STOW_HEADERS)
    assert response.status_code == 200, response.text
    assert store.instance_count(study) == 2 and not list(store.spool_dir.iterdir())
    row = next(r for r in store.instance_index() if r["path"].endswith(".dcm") and Path(r["path"]).stat().st_size
               > 4 * 2**20)
    assert dcmread(row["path"]).file_meta.SourceApplicationEntityTitle == "PACSWEB"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_study_uid_that_is_not_a_uid(client: TestClient, store: Store) -> None:
    assert client.post("/dicom-web/studies/1..2", content=b"", headers=STOW_HEADERS).status_code == 422
    series = generate_uid()
    response = client.post("/dicom-web/studies", content=multipart(ct_instance("1..2", series, 1)),
                           headers=STOW_HEADERS)
    assert response.status_code == 409  # refused and quarantined, not a 500
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert len(store.quarantined()) == 1 and "StudyInstanceUID" in store.quarantined()[0]["reason"]
    assert store.instance_count() == 0
