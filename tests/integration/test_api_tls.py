"""``portico serve`` with HTTPS (``api.tls``), client certificates, forwarded headers and the production
refusal of plain HTTP beyond loopback; and STOW-RS from our dispatcher to it over HTTPS with a token.

Real processes on free loopback ports, certificates made in code (tests/support/certs.py), clients
that verify against the test CA.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom.uid import generate_uid

from appliance.demo import PorticoProcess, portico_config
from appliance.settings import load_settings
from appliance.store import Store
from dicom_router.dispatch import Dispatcher
from dicom_router.settings import DispatchSettings, StowAuth, StowAuthKind, StowDestination
from tests.conftest import REPO
from tests.integration.test_dispatch import MemoryOutbox
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for_api
from tests.support.stow import CONTENT_TYPE, PATIENT_NAME, ct_instance, multipart

pytestmark = pytest.mark.slow

ADMIN = "admin-t0ken-tls-test"
#: allowed from 10.1.2.3 only: the address a forged X-Forwarded-For claims
REMOTE_SENDER, REMOTE_TOKEN = "REMOTEPACS", "remote-pacs-t0ken"
#: allowed from 127.0.0.1: our own dispatcher, sending to the served API
LOCAL_SENDER, LOCAL_TOKEN = "LOCALSENDER", "local-sender-t0ken-never-logged"
SENDERS = [{"name": REMOTE_SENDER, "token": REMOTE_TOKEN, "hosts": ["10.1.2.3"]},
           {"name": LOCAL_SENDER, "token": LOCAL_TOKEN, "hosts": ["127.0.0.1"]}]


@dataclass
class Served:
    process: PorticoProcess
    config: Path
    api_port: int
    scheme: str

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.api_port}"

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def store(self) -> Store:
        return Store(load_settings(self.config).data_dir, fsync=False)


def _config(workdir: Path, api: dict[str, Any]) -> tuple[Path, int, int]:
    """A production ``portico.yaml`` with the API on a free port; returns (path, DICOM port, API port)."""
    port, api_port = free_port(), free_port()
    path = portico_config(workdir, port=port, orthanc_dicom_port=free_port(), models_dir=REPO / "models",
                          rules_file=REPO / "config" / "rules.yaml", quiet_seconds=600, extra={
                              "router": {"stow_senders": SENDERS},
                              "api": {"enabled": True, "port": api_port, "token": ADMIN, **api}})
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "mode": "production"}, sort_keys=False))
    return path, port, api_port


def _serve(workdir: Path, api: dict[str, Any], client: httpx.Client) -> Served:
    config, port, api_port = _config(workdir, api)
    served = Served(PorticoProcess(config, port, workdir / "serve.log"), config, api_port,
                    "https" if "tls" in api else "http")
    served.process.start()

    try:
        wait_for_api(served.base, client)
    except AssertionError:
        served.process.stop()
        raise
    return served


def _tls(pki: Pki, client_ca: bool = False) -> dict[str, str]:
    tls = {"certificate": str(pki.server.cert), "private_key": str(pki.server.key)}
    return {**tls, "client_ca": str(pki.ca.cert)} if client_ca else tls


def _trusting(pki: Pki, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        files = pki.client(client) if client in pki.clients else pki.wrong_ca_client
        context.load_cert_chain(files.cert, files.key)
    return context


def _stow_request(client: httpx.Client, base: str, token: str, headers: dict[str, str] | None = None) -> int:
    body = multipart(ct_instance(generate_uid(), generate_uid(), 1))
    response = client.post(f"{base}/dicom-web/studies", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE, **(headers or {})})
    return response.status_code


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("portico",))


@pytest.fixture(scope="module")
def https_portico(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Served]:
    with httpx.Client(verify=_trusting(pki)) as client:
        served = _serve(tmp_path_factory.mktemp("https"), {"tls": _tls(pki)}, client)
    yield served
    served.process.stop()


# --- HTTPS in -------------------------------------------------------------------------------------

def test_https_answers_clients_that_trust_its_ca_and_nothing_in_clear(https_portico: Served, pki: Pki) -> None:
    with httpx.Client(verify=_trusting(pki)) as client:
        assert client.get(f"{https_portico.base}/health").json() == {"status": "ok"}
        status = client.get(f"{https_portico.base}/status", headers={"Authorization": f"Bearer {ADMIN}"})
        assert status.status_code == 200, status.text
    # a client that does not trust the test CA (httpx's own CA bundle) stops at the handshake
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_portico.base}/health")
    # plain HTTP to the TLS port gets no answer
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_portico.api_port}/health", timeout=5.0)

    def handshake(version: ssl.TLSVersion) -> str | None:
        context = _trusting(pki)
        # a client willing to speak TLS 1.1 (OpenSSL's default security level would not even offer it)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        with socket.create_connection(("127.0.0.1", https_portico.api_port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    # refused (asyncio closes without sending the alert); the unit tests in
    # tests/unit/appliance/test_api_tls_settings.py pin the minimum_version of the context uvicorn serves
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_1)

    log = https_portico.log_text()
    assert f"API listening on https://127.0.0.1:{https_portico.api_port}" in log
    assert "refused an HTTPS connection: plain HTTP sent to the HTTPS port" in log
    assert "refused an HTTPS connection: the client does not trust our certificate" in log
    assert "the client offered only TLS versions below 1.2" in log
    assert ADMIN not in log and "over plain HTTP" not in log


def test_a_forged_x_forwarded_for_does_not_open_the_sender_allow_list(https_portico: Served, pki: Pki) -> None:
    with httpx.Client(verify=_trusting(pki)) as client:
        # the sender is allowed from 10.1.2.3 only; we are 127.0.0.1, whatever the header claims
        assert _stow_request(client, https_portico.base, REMOTE_TOKEN, {"X-Forwarded-For": "10.1.2.3"}) == 401
        assert _stow_request(client, https_portico.base, REMOTE_TOKEN,
                             {"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3",
                              "Forwarded": "for=10.1.2.3"}) == 401
    assert f"refused DICOMweb POST request from 127.0.0.1: {REMOTE_SENDER} not allowed from there" in \
        https_portico.log_text()


def test_client_certificates_required_with_client_ca(tmp_path: Path, pki: Pki) -> None:
    with httpx.Client(verify=_trusting(pki, client="portico")) as client:
        served = _serve(tmp_path / "mtls", {"tls": _tls(pki, client_ca=True)}, client)
        try:
            assert client.get(f"{served.base}/health").status_code == 200
            # a client without a certificate, or with one from another CA, gets no answer
            for context in (_trusting(pki), _trusting(pki, client="wrong-ca")):
                with httpx.Client(verify=context) as stranger, pytest.raises(httpx.TransportError):
                    stranger.get(f"{served.base}/health", timeout=5.0)
            log = served.log_text()
            assert "(client certificates required)" in log
            assert "refused an HTTPS connection: the client sent no certificate" in log
            assert "refused an HTTPS connection: the client's certificate failed verification" in log
        finally:
            served.process.stop()


# --- behind a TLS proxy -----------------------------------------------------------------------------

def test_behind_a_tls_proxy_x_forwarded_for_is_believed_from_the_proxy_addresses(tmp_path: Path) -> None:
    with httpx.Client() as client:
        served = _serve(tmp_path / "proxied", {"behind_tls_proxy": True, "proxy_addresses": ["127.0.0.1"]},
                        client)
        try:
            # we are the proxy (127.0.0.1) here: the client it names is the one the allow-list sees
            assert _stow_request(client, served.base, REMOTE_TOKEN, {"X-Forwarded-For": "10.1.2.3"}) == 200
            assert _stow_request(client, served.base, REMOTE_TOKEN) == 401
            assert _stow_request(client, served.base, LOCAL_TOKEN, {"X-Forwarded-For": "10.1.2.3"}) == 401
        finally:
            served.process.stop()
    store = served.store()
    try:
        assert store.instance_count() == 1
        assert {e["actor"] for e in store.audit_events() if e["event"] == "received"} == {REMOTE_SENDER}
    finally:
        store.close()
    log = served.log_text()
    assert "X-Forwarded-For believed from 127.0.0.1 only" in log
    assert PATIENT_NAME not in log


# --- refusals at start --------------------------------------------------------------------------------

def _serve_exits(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "serve", "-c", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_production_refuses_plain_http_beyond_loopback_and_unloadable_certificates(tmp_path: Path,
                                                                                   pki: Pki) -> None:
    config, port, api_port = _config(tmp_path / "exposed", {"host": "0.0.0.0"})
    result = _serve_exits(config)
    assert result.returncode == 1
    assert "api.host 0.0.0.0 is beyond this machine and the API would speak plain HTTP" in result.stderr
    assert "set api.tls (certificate, private_key)" in result.stderr
    assert "api.behind_tls_proxy: true with api.proxy_addresses" in result.stderr
    assert "Traceback" not in result.stderr and ADMIN not in result.stderr + result.stdout
    assert not port_open(port) and not port_open(api_port)

    broken = {"certificate": str(pki.server.cert), "private_key": str(pki.other_ca.key)}
    config, port, _ = _config(tmp_path / "broken", {"host": "0.0.0.0", "tls": broken})
    result = _serve_exits(config)
    assert result.returncode == 1
    assert f"not starting: api.tls: cannot load certificate {pki.server.cert}" in result.stderr + result.stdout
    assert "BEGIN" not in result.stderr + result.stdout
    assert not port_open(port)


# --- STOW-RS out, over HTTPS ----------------------------------------------------------------------------

def test_dispatch_stows_over_https_with_a_bearer_token_and_never_logs_it(
        https_portico: Served, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level("DEBUG")
    study = generate_uid()
    paths = []
    for number in (1, 2):
        path = tmp_path / f"ct{number}.dcm"
        path.write_bytes(ct_instance(study, generate_uid(), number))
        paths.append(path)
    secret = tmp_path / "portico-token"
    secret.write_text(LOCAL_TOKEN + "\n")
    secret.chmod(0o600)
    url = f"{https_portico.base}/dicom-web"

    def dispatch(destination: StowDestination) -> MemoryOutbox:
        outbox = MemoryOutbox()
        for path in paths:
            outbox.add(destination.name, path)
        Dispatcher(DispatchSettings(destinations=(destination,)), outbox, "PORTICO").run_once()
        return outbox

    def errors(outbox: MemoryOutbox) -> set[str]:
        assert all(e.state == "pending" for e in outbox.entries.values())  # retryable, every one
        return {e.failures[-1][0] for e in outbox.entries.values()}

    good = dispatch(StowDestination(name="portico", url=url, ca_bundle=str(pki.ca.cert),
                                    auth=StowAuth(kind=StowAuthKind.BEARER, secret_file=str(secret))))
    assert [e.state for e in good.entries.values()] == ["sent", "sent"]
    store = https_portico.store()
    try:
        # stored under the sender whose token it was: the bearer token arrived
        received = [e for e in store.audit_events() if e["event"] == "received" and e["actor"] == LOCAL_SENDER]
        assert len(received) == 2
    finally:
        store.close()

    wrong_ca = dispatch(StowDestination(name="portico", url=url, ca_bundle=str(pki.other_ca.cert),
                                        auth=StowAuth(kind=StowAuthKind.BEARER, secret_file=str(secret))))
    assert errors(wrong_ca) == {"STOW-RS unreachable: TLS: the server's certificate failed verification "
                                "(unable to get local issuer certificate)"}

    monkeypatch.setenv("PORTICO_TEST_WRONG_TOKEN", REMOTE_TOKEN)
    refused = dispatch(StowDestination(name="portico", url=url, ca_bundle=str(pki.ca.cert),
                                       auth=StowAuth(kind=StowAuthKind.BEARER, secret_env="PORTICO_TEST_WRONG_TOKEN")))
    assert errors(refused) == {"STOW-RS HTTP 401: the server refused our credentials"}
    assert "STOW-RS to portico: HTTP 401, the server refused our credentials" in caplog.text

    monkeypatch.delenv("PORTICO_TEST_UNSET_TOKEN", raising=False)
    unset = dispatch(StowDestination(name="portico", url=url, ca_bundle=str(pki.ca.cert),
                                     auth=StowAuth(kind=StowAuthKind.BEARER, secret_env="PORTICO_TEST_UNSET_TOKEN")))
    assert errors(unset) == {"STOW-RS not sent: configuration error: auth.secret_env PORTICO_TEST_UNSET_TOKEN: "
                             "the environment variable is not set"}

    for text in (caplog.text, https_portico.log_text()):
        assert LOCAL_TOKEN not in text and REMOTE_TOKEN not in text
    assert PATIENT_NAME not in https_portico.log_text()
