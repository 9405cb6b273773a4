"""``portico doctor``'s checks, one by one: what each finds on a good set-up and what it says to fix on a bad one."""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from appliance.doctor import (
    Finding,
    Status,
    check_certificates,
    check_disk,
    check_models,
    check_peers,
    check_permissions,
    check_ports,
    failed,
)
from appliance.settings import Settings
from dicom_router.settings import DicomTlsSettings, DimseDestination
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port
from tests.support.packages import make_package


def settings_for(tmp: Path, **extra: Any) -> Settings:
    data: dict[str, Any] = {"storage": {"data_dir": str(tmp / "var"), "min_free_mb": 0},
                            "inference": {"models_dir": str(tmp / "models")},
                            "router": {"port": free_port()}}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return Settings.model_validate(data)


def statuses(findings: list[Finding]) -> list[Status]:
    return [f.status for f in findings]


def only(findings: list[Finding], status: Status) -> Finding:
    matching = [f for f in findings if f.status is status]
    assert len(matching) == 1, findings
    return matching[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---- ports ---------------------------------------------------------------------------------------

def test_free_ports_are_ok(tmp_path: Path) -> None:
    findings = check_ports(settings_for(tmp_path, api={"enabled": True, "port": free_port()}))
    assert statuses(findings) == [Status.OK, Status.OK]


@pytest.fixture
def held() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


def test_a_port_in_use_fails_and_says_how_to_find_its_holder(tmp_path: Path, held: int) -> None:
    bad = only(check_ports(settings_for(tmp_path, router={"port": held})), Status.FAIL)
    assert f"127.0.0.1:{held} is in use" in bad.message
    assert f"sport = :{held}" in bad.fix


def test_two_listeners_on_one_port_fail(tmp_path: Path) -> None:
    port = free_port()
    bad = only(check_ports(settings_for(tmp_path, router={"port": port}, api={"enabled": True, "port": port})),
               Status.FAIL)
    assert "also the DICOM listener" in bad.message


def test_an_address_of_another_machine_fails(tmp_path: Path) -> None:
    bad = only(check_ports(settings_for(tmp_path, router={"bind_host": "192.0.2.10"})), Status.FAIL)
    assert "not an address of this machine" in bad.message


# ---- certificates --------------------------------------------------------------------------------

def tls_settings(tmp: Path, cert: Path, key: Path, ca: Path) -> Settings:
    tls = DicomTlsSettings(certificate=str(cert), private_key=str(key), ca_bundle=str(ca))
    return settings_for(tmp, router={"tls": tls.model_dump()})


def test_a_good_certificate_its_key_and_its_ca_are_ok(tmp_path: Path, pki: Pki) -> None:
    # the test PKI's certificates live 30 days: warn only inside the last week here
    findings = check_certificates(tls_settings(tmp_path, pki.server.cert, pki.server.key, pki.ca.cert), warn_days=7)
    assert statuses(findings) == [Status.OK, Status.OK, Status.OK], findings
    assert "matches its certificate" in findings[1].message


def test_an_expired_certificate_fails(tmp_path: Path, pki: Pki) -> None:
    bad = only(check_certificates(tls_settings(tmp_path, pki.expired_server.cert, pki.expired_server.key,
                                               pki.ca.cert)), Status.FAIL)
    assert "expired on" in bad.message and "router.tls.certificate" in bad.message


def test_a_certificate_expiring_soon_is_a_warning(tmp_path: Path, pki: Pki) -> None:
    expires = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).not_valid_after_utc
    findings = check_certificates(tls_settings(tmp_path, pki.server.cert, pki.server.key, pki.ca.cert),
                                  now=expires - dt.timedelta(days=10))
    warning = only(findings, Status.WARN)
    assert "expires in 9 day(s)" in warning.message or "expires in 10 day(s)" in warning.message
    assert "renew" in warning.fix


def test_a_key_of_another_certificate_fails(tmp_path: Path, pki: Pki) -> None:
    bad = only(check_certificates(tls_settings(tmp_path, pki.server.cert, pki.client("portico").key, pki.ca.cert)),
               Status.FAIL)
    assert "router.tls.private_key" in bad.message and "is not the key of" in bad.message


def test_a_missing_or_unreadable_certificate_fails(tmp_path: Path, pki: Pki) -> None:
    missing = only(check_certificates(tls_settings(tmp_path, tmp_path / "nope.pem", pki.server.key, pki.ca.cert)),
                   Status.FAIL)
    assert "cannot read it" in missing.message
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad = only(check_certificates(tls_settings(tmp_path, garbage, pki.server.key, pki.ca.cert)), Status.FAIL)
    assert "not a PEM certificate" in bad.message


# ---- peers ---------------------------------------------------------------------------------------

class FakeEcho:
    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, int, str]] = []

    def __call__(self, destination: DimseDestination, calling_ae: str, timeout: float,
                 tls: DicomTlsSettings | None, event_driven: bool) -> bool:
        self.asked.append((destination.ae_title, destination.host, destination.port, calling_ae))
        return self.answers[destination.ae_title]


def test_destinations_and_queried_peers_are_echoed(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        dispatch={"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"kind": "dimse", "name": "viewer", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 4243,
             "calling_ae_title": "PORTICO_OUT"}]},
        router={"peers": [{"ae_title": "ORTHANC", "hosts": ["10.0.0.5"], "query_port": 4244},
                          {"ae_title": "MODALITY", "hosts": ["10.0.0.6"]}]})
    echo = FakeEcho({"PACS": True, "VIEWER": False, "ORTHANC": True})
    findings = check_peers(settings, echo)
    assert echo.asked == [("PACS", "127.0.0.1", 4242, "PORTICO"), ("VIEWER", "127.0.0.1", 4243, "PORTICO_OUT"),
                          ("ORTHANC", "10.0.0.5", 4244, "PORTICO")]
    assert statuses(findings) == [Status.OK, Status.FAIL, Status.OK]
    bad = only(findings, Status.FAIL)
    assert "destination viewer" in bad.message and "PORTICO_OUT" in bad.fix


def test_a_stow_destination_must_accept_connections(tmp_path: Path, held: int) -> None:
    closed = free_port()
    settings = settings_for(tmp_path, dispatch={"destinations": [
        {"kind": "stow", "name": "up", "url": f"http://127.0.0.1:{held}/dicom-web"},
        {"kind": "stow", "name": "down", "url": f"http://127.0.0.1:{closed}/dicom-web"}]})
    findings = check_peers(settings, FakeEcho({}), timeout=2.0)
    assert statuses(findings) == [Status.OK, Status.FAIL]
    assert "destination down" in findings[1].message


# ---- disk and permissions ------------------------------------------------------------------------

def test_disk_above_the_watermark_is_ok_and_below_fails(tmp_path: Path) -> None:
    assert statuses(check_disk(settings_for(tmp_path))) == [Status.OK]
    bad = check_disk(settings_for(tmp_path, storage={"min_free_mb": 1 << 40}))
    assert statuses(bad) == [Status.FAIL] and "0xA700" in bad[0].fix


def test_a_data_folder_not_made_yet_is_ok_and_an_owner_only_one_too(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert statuses(check_permissions(settings, None)) == [Status.OK]
    settings.data_dir.mkdir(mode=0o700)
    os.chmod(settings.data_dir, 0o700)
    findings = check_permissions(settings, None)
    assert statuses(findings) == [Status.OK] and "closed to others" in findings[0].message


def test_a_data_folder_open_to_others_is_a_warning(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    settings.data_dir.mkdir()
    os.chmod(settings.data_dir, 0o755)
    warning = only(check_permissions(settings, None), Status.WARN)
    assert "chmod -R o-rwx" in warning.fix


def test_a_readable_secret_fails_in_production_and_warns_in_dev(tmp_path: Path) -> None:
    config = tmp_path / "portico.yaml"
    config.write_text("mode: production\n")
    config.chmod(0o644)
    bad = only(check_permissions(settings_for(tmp_path), config), Status.FAIL)
    assert f"chmod 600 {config}" == bad.fix
    dev = settings_for(tmp_path).model_copy(update={"mode": "dev"})
    assert only(check_permissions(dev, config), Status.WARN)


# ---- models --------------------------------------------------------------------------------------

def test_models_verify_or_say_which_does_not(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert statuses(check_models(settings)) == [Status.WARN]  # none installed
    make_package(settings.models_dir / "tiny-1.0.0", "1.0.0")
    make_package(settings.models_dir / "tiny-1.1.0", "1.1.0")
    (settings.models_dir / "tiny-1.1.0" / "MODEL_CARD.md").write_text("# tampered\n")
    findings = check_models(settings)
    assert statuses(findings) == [Status.OK, Status.FAIL]
    assert "tiny@1.0.0 verifies" in findings[0].message
    assert "tiny-1.1.0" in findings[1].message and "portico models add" in findings[1].fix


def test_warnings_fail_only_when_strict() -> None:
    findings = [Finding("disk", Status.OK, "fine"), Finding("tls", Status.WARN, "soon", "renew")]
    assert not failed(findings)
    assert failed(findings, strict=True)
    assert failed([*findings, Finding("ports", Status.FAIL, "in use", "stop it")])
