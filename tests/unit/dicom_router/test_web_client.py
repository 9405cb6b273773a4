"""Outgoing STOW-RS over HTTPS with credentials: settings, secrets, TLS context, and a small in-process
HTTPS receiver (tests/integration/test_api_tls.py sends to a real ``portico serve``)."""

from __future__ import annotations

import base64
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from dicom_router.dispatch import send_files
from dicom_router.errors import DestinationConfigError
from dicom_router.settings import StowAuth, StowAuthKind, StowDestination
from dicom_router.web_client import authorization, client_context, describe_failure
from tests.support.certs import Pki, make_pki
from tests.support.stow import ct_instance

SECRET = "stow-s3cret-never-logged"
ENV = "PORTICO_TEST_STOW_SECRET"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=())


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "stow-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("auth", "message"), [
    ({"kind": "bearer"}, "exactly one of secret_file and secret_env"),
    ({"kind": "bearer", "secret_file": "a", "secret_env": "B"}, "exactly one of secret_file and secret_env"),
    ({"kind": "basic", "secret_env": "B"}, "needs a username"),
    ({"kind": "bearer", "username": "u", "secret_env": "B"}, "with kind basic only"),
    ({"kind": "basic", "username": "a:b", "secret_env": "B"}, "username"),
    ({"kind": "bearer", "secret_env": "NOT-A-NAME"}, "secret_env"),
    ({"kind": "digest", "secret_env": "B"}, "kind"),
    ({"kind": "bearer", "secret": SECRET}, "extra"),
])
def test_auth_settings_refused(auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StowAuth.model_validate(auth)


def test_ca_bundle_needs_https() -> None:
    with pytest.raises(ValidationError, match="not https"):
        StowDestination(name="web", url="http://pacs.example.org/dicom-web", ca_bundle="ca.pem")
    assert StowDestination(name="web", url="https://pacs.example.org/dicom-web", ca_bundle="ca.pem").ca_bundle


# --- secrets and the TLS context ------------------------------------------------------------------

def test_bearer_from_a_file_and_basic_from_the_environment(secret_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert authorization(StowAuth(kind=StowAuthKind.BEARER, secret_file=str(secret_file))) == f"Bearer {SECRET}"
    monkeypatch.setenv(ENV, f"  {SECRET}  ")
    header = authorization(StowAuth(kind=StowAuthKind.BASIC, username="portico", secret_env=ENV))
    assert header == "Basic " + base64.b64encode(f"portico:{SECRET}".encode()).decode()


def test_unusable_secrets_name_the_setting_never_the_secret(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    unset = re.escape(f"auth.secret_env {ENV}: the environment variable is not set")
    with pytest.raises(DestinationConfigError, match=unset):
        authorization(StowAuth(kind=StowAuthKind.BEARER, secret_env=ENV))
    missing = tmp_path / "nope"
    with pytest.raises(DestinationConfigError, match=re.escape(f"auth.secret_file {missing} cannot be read")):
        authorization(StowAuth(kind=StowAuthKind.BEARER, secret_file=str(missing)))
    two_lines = tmp_path / "two-lines"
    two_lines.write_text(f"{SECRET}\nsecond-line-{SECRET}\n")
    with pytest.raises(DestinationConfigError, match="must be one line") as caught:
        authorization(StowAuth(kind=StowAuthKind.BEARER, secret_file=str(two_lines)))
    assert SECRET not in str(caught.value)
    monkeypatch.setenv(ENV, "   ")
    with pytest.raises(DestinationConfigError, match="empty"):
        authorization(StowAuth(kind=StowAuthKind.BEARER, secret_env=ENV))


def test_client_context_verifies_with_tls12_or_later(pki: Pki, tmp_path: Path) -> None:
    for context in (client_context(None), client_context(str(pki.ca.cert))):
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises(DestinationConfigError, match=re.escape(f"ca_bundle {tmp_path / 'nope.pem'} cannot be loaded")):
        client_context(str(tmp_path / "nope.pem"))


def test_describe_failure_names_the_tls_reason() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    assert describe_failure(error) == ("TLS: the server's certificate failed verification "
                                       "(unable to get local issuer certificate)")
    assert describe_failure(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection refused"


# --- an in-process HTTPS receiver ------------------------------------------------------------------

@dataclass
class Receiver:
    url: str
    status: int = 200
    location: str | None = None
    authorizations: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def receiver(pki: Pki) -> Iterator[Receiver]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    state: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            r = state[0]
            r.paths.append(f"{self.command} {self.path}")
            r.authorizations.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(r.status)
            if r.location:
                self.send_header("Location", r.location)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.append(Receiver(f"https://127.0.0.1:{server.server_address[1]}/dicom-web"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state[0]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    path = tmp_path / "ct.dcm"
    path.write_bytes(ct_instance(generate_uid(), generate_uid(), 1))
    return path


def test_https_with_basic_auth_and_a_refusal_logged_as_such(
        receiver: Receiver, pki: Pki, instance: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    monkeypatch.setenv(ENV, SECRET)
    web = StowDestination(name="web", url=receiver.url, ca_bundle=str(pki.ca.cert),
                          auth=StowAuth(kind=StowAuthKind.BASIC, username="portico", secret_env=ENV))
    (ok,) = send_files(web, [instance], "PORTICO")
    assert ok.ok, ok.error
    assert receiver.authorizations == ["Basic " + base64.b64encode(f"portico:{SECRET}".encode()).decode()]

    receiver.status = 401
    (refused,) = send_files(web, [instance], "PORTICO")
    assert not refused.ok and not refused.permanent
    assert refused.error == "STOW-RS HTTP 401: the server refused our credentials"
    assert "STOW-RS to web: HTTP 401, the server refused our credentials" in caplog.text
    assert SECRET not in caplog.text and base64.b64encode(SECRET.encode()).decode()[:12] not in caplog.text


def test_a_redirect_is_not_followed_and_takes_no_credentials_along(
        receiver: Receiver, pki: Pki, instance: Path, secret_file: Path) -> None:
    receiver.status, receiver.location = 302, "https://127.0.0.1:1/elsewhere"
    web = StowDestination(name="web", url=receiver.url, ca_bundle=str(pki.ca.cert),
                          auth=StowAuth(kind=StowAuthKind.BEARER, secret_file=str(secret_file)))
    (result,) = send_files(web, [instance], "PORTICO")
    assert not result.ok and result.error == "STOW-RS HTTP 302" and not result.permanent
    assert receiver.paths == ["POST /dicom-web/studies"]


def test_wrong_ca_or_missing_secret_fail_retryably_with_the_reason(
        receiver: Receiver, pki: Pki, instance: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    wrong_ca = StowDestination(name="web", url=receiver.url, ca_bundle=str(pki.other_ca.cert))
    (result,) = send_files(wrong_ca, [instance], "PORTICO")
    assert not result.ok and not result.permanent
    assert result.error is not None and "certificate failed verification" in result.error
    # the system store does not know the test CA either
    (result,) = send_files(StowDestination(name="web", url=receiver.url), [instance], "PORTICO")
    assert result.error is not None and "certificate failed verification" in result.error
    assert receiver.paths == []

    no_secret = StowDestination(name="web", url=receiver.url, ca_bundle=str(pki.ca.cert),
                                auth=StowAuth(kind=StowAuthKind.BEARER, secret_file=str(tmp_path / "absent")))
    (result,) = send_files(no_secret, [instance], "PORTICO")
    assert not result.ok and not result.permanent
    assert result.error == (f"STOW-RS not sent: configuration error: auth.secret_file {tmp_path / 'absent'} "
                            "cannot be read (No such file or directory)")
    assert "STOW-RS to web not sent, configuration error" in caplog.text
    assert receiver.paths == []
