"""``api.tls``, ``api.behind_tls_proxy``, the production refusal of plain HTTP beyond loopback, and the
uvicorn configuration they make (no socket is opened here; tests/integration/test_api_tls.py does)."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from pydantic import ValidationError

from appliance.api_server import ApiServer, ApiTlsError, server_context
from appliance.cli.common import config_problems
from appliance.settings import ApiTlsSettings, Settings, is_loopback, load_settings
from tests.support.certs import Pki, make_pki

TOKEN = "a-real-t0ken-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("portico",))


def _tls(pki: Pki, client_ca: bool = False) -> dict[str, str]:
    tls = {"certificate": str(pki.server.cert), "private_key": str(pki.server.key)}
    return {**tls, "client_ca": str(pki.ca.cert)} if client_ca else tls


def _api(**api: Any) -> Settings:
    return Settings.model_validate({"api": {"enabled": True, "token": TOKEN, **api}})


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "portico.example.org"])
def test_production_refuses_plain_http_beyond_loopback_naming_the_fix(host: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _api(host=host)
    text = config_problems(caught.value)
    assert f"api.host {host} is beyond this machine" in text
    assert "api.tls" in text and "api.behind_tls_proxy" in text
    assert TOKEN not in text


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_tls(host: str) -> None:
    assert _api(host=host).api.tls is None
    assert is_loopback(host)


def test_beyond_loopback_is_allowed_with_tls_behind_a_proxy_in_dev_or_with_the_api_off(pki: Pki) -> None:
    assert _api(host="0.0.0.0", tls=_tls(pki)).api.scheme == "https"
    proxied = _api(host="0.0.0.0", behind_tls_proxy=True, proxy_addresses=["10.0.0.5", "fd00::/64"])
    assert proxied.api.scheme == "http" and proxied.api.proxy_addresses == ("10.0.0.5", "fd00::/64")
    assert Settings.model_validate({"mode": "dev", "api": {"enabled": True, "host": "0.0.0.0"}}).api.tls is None
    assert not Settings.model_validate({"api": {"enabled": False, "host": "0.0.0.0"}}).api.enabled


@pytest.mark.parametrize(("api", "message"), [
    ({"behind_tls_proxy": True}, "needs api.proxy_addresses"),
    ({"proxy_addresses": ["10.0.0.5"]}, "api.behind_tls_proxy is false"),
    ({"behind_tls_proxy": True, "proxy_addresses": ["*"]}, "not an IP address or network"),
    ({"behind_tls_proxy": True, "proxy_addresses": ["proxy.example.org"]}, "not an IP address or network"),
    ({"behind_tls_proxy": True, "proxy_addresses": ["10.0.0.5/8"]}, "not an IP address or network"),
    ({"tls": {"certificate": "server.pem"}}, "private_key"),
    ({"tls": {"certificate": "server.pem", "private_key": "server.key", "ciphers": "NULL"}}, "extra"),
])
def test_inconsistent_api_settings_refused(api: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _api(**api)


def test_production_refuses_stow_credentials_over_plain_http_beyond_loopback() -> None:
    def settings(url: str, mode: str = "production") -> Settings:
        return Settings.model_validate({"mode": mode, "dispatch": {"destinations": [
            {"kind": "stow", "name": "web", "url": url, "auth": {"kind": "bearer", "secret_env": "X"}}]}})

    with pytest.raises(ValidationError, match="web would send its credentials over plain HTTP"):
        settings("http://pacs.example.org/dicom-web")
    assert settings("http://pacs.example.org/dicom-web", mode="dev").dispatch.destinations
    assert settings("http://127.0.0.1:8042/dicom-web").dispatch.destinations
    assert settings("https://pacs.example.org/dicom-web").dispatch.destinations


def test_tls_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "portico.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "api": {"enabled": True, "token": TOKEN, "host": "0.0.0.0",
                "tls": {"certificate": "tls/api.pem", "private_key": "/abs/api.key", "client_ca": "tls/ca.pem"}},
        "dispatch": {"destinations": [{"kind": "stow", "name": "web", "url": "https://pacs.example.org/dicom-web",
                                       "ca_bundle": "tls/pacs-ca.pem",
                                       "auth": {"kind": "bearer", "secret_file": "secrets/pacs-token"}}]},
    }))
    tls = load_settings(config).api.tls
    assert tls == ApiTlsSettings(certificate=str(config.parent / "tls/api.pem"), private_key="/abs/api.key",
                                 client_ca=str(config.parent / "tls/ca.pem"))
    (web,) = load_settings(config).dispatch.destinations
    assert web.ca_bundle == str(config.parent / "tls/pacs-ca.pem")
    assert web.kind == "stow" and web.auth is not None
    assert web.auth.secret_file == str(config.parent / "secrets/pacs-token")


def test_config_problems_never_quote_the_values() -> None:
    secret = "sender-secret-never-printed"
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({
            "router": {"stow_senders": [{"name": "A", "token": secret}, {"name": "B", "token": secret}]},
            "api": {"enabled": True, "token": "change-me"}})
    text = config_problems(caught.value)
    assert "placeholder" in text
    assert secret not in text and "change-me" not in text


# --- the TLS context and the uvicorn configuration ------------------------------------------------

def test_server_context_is_tls12_or_later_and_asks_client_certificates_only_with_client_ca(pki: Pki) -> None:
    plain = server_context(ApiTlsSettings(**_tls(pki)))
    assert plain.minimum_version is ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode is ssl.CERT_NONE
    mutual = server_context(ApiTlsSettings(**_tls(pki, client_ca=True)))
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    assert mutual.minimum_version is ssl.TLSVersion.TLSv1_2


def test_unloadable_tls_files_name_the_file_not_its_contents(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ApiTlsError, match=re.escape(f"cannot load certificate {missing}")):
        server_context(ApiTlsSettings(certificate=str(missing), private_key=str(pki.server.key)))
    # a key that is not the certificate's
    with pytest.raises(ApiTlsError, match=r"api\.tls: cannot load") as caught:
        server_context(ApiTlsSettings(certificate=str(pki.server.cert), private_key=str(pki.ca.key)))
    key_text = pki.ca.key.read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert body[:40] not in str(caught.value)
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ApiTlsError, match=r"api\.tls\.client_ca"):
        server_context(ApiTlsSettings(**{**_tls(pki), "client_ca": str(garbage)}))


def test_world_readable_private_key_is_warned_about(pki: Pki, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0o644)
    server_context(ApiTlsSettings(certificate=str(pki.server.cert), private_key=str(key)))
    assert "readable by every user" in caplog.text
    caplog.clear()
    key.chmod(0o600)
    server_context(ApiTlsSettings(certificate=str(pki.server.cert), private_key=str(key)))
    assert "readable by every user" not in caplog.text


def test_forwarded_headers_are_ignored_unless_behind_a_proxy_and_then_only_from_it(pki: Pki) -> None:
    direct = ApiServer(_api(tls=_tls(pki)), FastAPI())._config
    assert direct.proxy_headers is False and direct.forwarded_allow_ips == []
    proxied = ApiServer(_api(behind_tls_proxy=True, proxy_addresses=["10.0.0.5", "10.9.0.0/16"]), FastAPI())._config
    assert proxied.proxy_headers is True and proxied.forwarded_allow_ips == ["10.0.0.5", "10.9.0.0/16"]


def test_uvicorn_serves_our_context(pki: Pki) -> None:
    server = ApiServer(_api(tls=_tls(pki, client_ca=True)), FastAPI())
    assert server.scheme == "https"
    server._config.load()
    context = server._config.ssl
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2 and context.verify_mode is ssl.CERT_REQUIRED
    plain = ApiServer(_api(), FastAPI())
    plain._config.load()
    assert plain.scheme == "http" and plain._config.ssl is None


def test_the_access_log_shortens_uids_in_paths() -> None:
    import logging

    from appliance.api_server import ShortUidsInAccessLog

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', (
        "127.0.0.1:5000", "POST", "/dicom-web/studies/1.2.826.0.1.3680043.8.498.12345678901234567890", "1.1", 200),
        None)
    assert ShortUidsInAccessLog().filter(record)
    message = record.getMessage()
    assert "1.2.826.0.1.3680043" not in message
    assert "/dicom-web/studies/…901234567890" in message
    assert message.startswith("127.0.0.1:5000")  # an address is not a UID
