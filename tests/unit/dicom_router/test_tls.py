"""DICOM TLS building blocks: BCP 195 contexts, clear configuration errors, identities, reasons.

Handshakes run over real loopback sockets between the contexts built here, with certificates made
in code (:mod:`tests.support.certs`).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from dicom_router.errors import RouterError, TlsConfigError
from dicom_router.settings import (
    DicomTlsSettings,
    DimseDestination,
    Peer,
    RouterSettings,
    TlsMode,
    normalise_fingerprint,
)
from dicom_router.tls import (
    BCP195_CIPHERS,
    CertificateIdentity,
    client_context,
    describe_tls_error,
    identity_matches,
    identity_of,
    server_context,
    tls_failure,
)
from tests.support.certs import CertFiles, Pki, make_pki

JOIN_SECONDS = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def ours(files: CertFiles, pki: Pki, **options: object) -> DicomTlsSettings:
    values: dict[str, object] = {"certificate": str(files.cert), "private_key": str(files.key),
                                 "ca_bundle": str(pki.ca.cert), **options}
    return DicomTlsSettings.model_validate(values)


@dataclass
class Handshake:
    """What each side of one loopback handshake saw."""

    server_identity: CertificateIdentity | None = None
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    client_thread_failure: str | None = None


def handshake(server: ssl.SSLContext | None, client: Callable[[int], None]) -> Handshake:
    """One connection: ``server`` (None: a plain socket that answers garbage) against ``client``."""
    result = Handshake()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(JOIN_SECONDS)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            if server is None:
                conn.recv(1024)
                conn.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT
                return
            with server.wrap_socket(conn, server_side=True) as tls:
                result.server_identity = identity_of(tls)
                tls.sendall(b"ok")
                tls.recv(16)
        except (OSError, ssl.SSLError) as exc:
            result.server_error = exc
        finally:
            conn.close()

    def connect() -> None:
        try:
            client(port)
        except OSError as exc:
            result.client_error = exc
        result.client_thread_failure = tls_failure(threading.current_thread())

    threads = [threading.Thread(target=serve), threading.Thread(target=connect)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), "handshake thread hung"
    listener.close()
    return result


def tls_client(context: ssl.SSLContext, hostname: str = "127.0.0.1") -> Callable[[int], None]:
    """A client as pynetdicom's: wrap the unconnected socket, handshake in ``connect``."""
    def run(port: int) -> None:
        with context.wrap_socket(socket.socket(), server_hostname=hostname) as tls:
            tls.settimeout(5)
            tls.connect(("127.0.0.1", port))
            if tls.recv(16) != b"ok":
                raise ConnectionResetError("no answer")
            tls.sendall(b"hello")
    return run


# --- contexts --------------------------------------------------------------------------------------

def test_contexts_are_bcp195(pki: Pki) -> None:
    settings = ours(pki.server, pki)
    for context in (server_context(settings), client_context(settings)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.options & ssl.OP_NO_COMPRESSION
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12, "no TLS 1.2 suites left"
        for cipher in tls12:
            assert cipher["aead"] and cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]
            assert "CBC" not in cipher["description"]
    assert "CBC" not in BCP195_CIPHERS and "SHA1" not in BCP195_CIPHERS
    assert all(name.startswith(("ECDHE-", "DHE-")) for name in BCP195_CIPHERS.split(":"))
    assert server_context(settings).options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert server_context(ours(pki.server, pki, minimum_version="1.3")).minimum_version == ssl.TLSVersion.TLSv1_3


def test_verify_modes(pki: Pki) -> None:
    assert server_context(ours(pki.server, pki)).verify_mode == ssl.CERT_REQUIRED
    assert server_context(ours(pki.server, pki, require_client_certificate=False)).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(ours(pki.server, pki, require_client_certificate=False,
                               ca_bundle=None)).verify_mode == ssl.CERT_NONE
    client = client_context(None)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_tls_1_1_is_refused(pki: Pki) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    seen = handshake(server_context(ours(pki.server, pki, require_client_certificate=False)), tls_client(old))
    assert seen.server_error is not None and seen.client_error is not None


def test_minimum_version_1_3_refuses_1_2(pki: Pki) -> None:
    tls12 = client_context(ours(pki.clients["portico"], pki))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    seen = handshake(server_context(ours(pki.server, pki, minimum_version="1.3")), tls_client(tls12))
    assert seen.client_error is not None
    assert "TLS version" in describe_tls_error(seen.client_error)


def test_mutual_tls_and_identity(pki: Pki) -> None:
    modality = pki.clients["modality-1"]
    seen = handshake(server_context(ours(pki.server, pki)), tls_client(client_context(ours(modality, pki))))
    assert seen.server_error is None and seen.client_error is None
    assert seen.server_identity == CertificateIdentity(subject="CN=modality-1,O=Portico Test",
                                                       fingerprint=modality.fingerprint)
    assert seen.client_thread_failure is None


def test_no_client_certificate(pki: Pki) -> None:
    # optional: no certificate, no identity
    seen = handshake(server_context(ours(pki.server, pki, require_client_certificate=False)),
                     tls_client(client_context(None, str(pki.ca.cert))))
    assert seen.server_error is None and seen.server_identity is None
    # required: refused, and both sides say why
    seen = handshake(server_context(ours(pki.server, pki)), tls_client(client_context(None, str(pki.ca.cert))))
    assert seen.server_error is not None and describe_tls_error(seen.server_error) == "no client certificate"
    assert seen.client_error is not None and "client certificate" in describe_tls_error(seen.client_error)
    assert seen.client_thread_failure is not None and "client certificate" in seen.client_thread_failure


@pytest.mark.parametrize(("server", "expected"), [
    ("wrong_ca_server", "certificate verify failed: unable to get local issuer certificate"),
    ("expired_server", "certificate verify failed: certificate has expired"),
])
def test_bad_server_certificates(pki: Pki, server: str, expected: str) -> None:
    files: CertFiles = getattr(pki, server)
    seen = handshake(server_context(ours(files, pki, require_client_certificate=False, ca_bundle=None)),
                     tls_client(client_context(ours(pki.clients["portico"], pki))))
    assert seen.client_error is not None
    assert describe_tls_error(seen.client_error) == expected
    assert seen.client_thread_failure == expected  # what dispatch reads after pynetdicom swallowed it


@pytest.mark.parametrize(("client", "expected_server", "expected_client"), [
    ("wrong_ca_client", "unable to get local issuer certificate", "unknown CA"),
    ("expired_client", "certificate has expired", "expired"),
])
def test_bad_client_certificates(pki: Pki, client: str, expected_server: str, expected_client: str) -> None:
    files: CertFiles = getattr(pki, client)
    seen = handshake(server_context(ours(pki.server, pki)), tls_client(client_context(ours(files, pki))))
    assert seen.server_error is not None and expected_server in describe_tls_error(seen.server_error)
    assert seen.client_error is not None and expected_client in describe_tls_error(seen.client_error)


def test_hostname_is_checked(pki: Pki) -> None:
    seen = handshake(server_context(ours(pki.server, pki)),
                     tls_client(client_context(ours(pki.clients["portico"], pki)), hostname="pacs.example"))
    assert seen.client_error is not None
    assert "certificate verify failed: Hostname mismatch" in describe_tls_error(seen.client_error)
    # the name in the certificate (DNS SAN) is fine
    seen = handshake(server_context(ours(pki.server, pki)),
                     tls_client(client_context(ours(pki.clients["portico"], pki)), hostname="localhost"))
    assert seen.client_error is None


def test_plain_and_tls_crossed(pki: Pki) -> None:
    def plain(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"\x01\x00\x00\x00\x00\x04abcd")  # the start of an A-ASSOCIATE-RQ
            raw.recv(16)

    seen = handshake(server_context(ours(pki.server, pki)), plain)
    assert seen.server_error is not None
    assert describe_tls_error(seen.server_error).startswith("wrong version number (plain DICOM")
    seen = handshake(None, tls_client(client_context(ours(pki.clients["portico"], pki))))
    assert seen.client_error is not None
    assert describe_tls_error(seen.client_error).startswith("wrong version number")


def test_describe_plain_failures() -> None:
    assert describe_tls_error(TimeoutError("_ssl.c:990: The handshake operation timed out")) == \
        "TLS handshake timed out"
    assert describe_tls_error(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert describe_tls_error(ValueError("x")) == "ValueError"


# --- identities --------------------------------------------------------------------------------------

def test_identity_matches(pki: Pki) -> None:
    modality = pki.clients["modality-1"]
    identity = CertificateIdentity(subject=modality.subject, fingerprint=modality.fingerprint)
    free = Peer(ae_title="MOD1")
    assert identity_matches(free, identity) and identity_matches(free, None)

    by_print = Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_fingerprint=modality.fingerprint.upper())
    assert identity_matches(by_print, identity)
    assert not identity_matches(by_print, None)
    other = pki.clients["portico"]
    assert not identity_matches(by_print, CertificateIdentity(other.subject, other.fingerprint))

    by_subject = Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_subject="2.5.4.3=modality-1,O=Portico Test")
    assert by_subject.certificate_subject == "CN=modality-1,O=Portico Test"
    assert identity_matches(by_subject, identity)
    assert not identity_matches(by_subject, CertificateIdentity("CN=MODALITY-1,O=Portico Test", modality.fingerprint))
    assert not identity_matches(by_subject, CertificateIdentity(other.subject, other.fingerprint))

    both = Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_subject=modality.subject,
                certificate_fingerprint=other.fingerprint)
    assert not identity_matches(both, identity)


# --- settings ------------------------------------------------------------------------------------

def test_fingerprint_normalised() -> None:
    raw = "AB:" * 31 + "CD"
    assert normalise_fingerprint(raw) == "ab" * 31 + "cd"
    peer = Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_fingerprint=raw)
    assert peer.certificate_fingerprint == "ab" * 31 + "cd"
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ValidationError, match="64 hex digits"):
            Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_fingerprint=bad)


def test_settings_validation(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="need tls: required"):
        Peer(ae_title="MOD1", certificate_fingerprint="ab" * 32)
    with pytest.raises(ValidationError, match="RFC 4514"):
        Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_subject="cn=modality-1, o=x")
    with pytest.raises(ValidationError, match=r"needs router\.tls\.ca_bundle"):
        DicomTlsSettings(certificate="a.pem", private_key="a.key")
    assert DicomTlsSettings(certificate="a.pem", private_key="a.key", require_client_certificate=False).port == 2762
    with pytest.raises(ValidationError, match=r"router\.tls is not set"):
        RouterSettings(peers=(Peer(ae_title="MOD1", tls=TlsMode.REQUIRED),))
    with pytest.raises(ValidationError, match="ca_bundle is not set"):
        RouterSettings(tls=DicomTlsSettings(certificate="a", private_key="b", require_client_certificate=False),
                       peers=(Peer(ae_title="MOD1", tls=TlsMode.REQUIRED, certificate_subject="CN=x"),))
    with pytest.raises(ValidationError, match="only with tls: required"):
        DimseDestination(name="d", ae_title="D", host="127.0.0.1", port=104, ca_bundle="ca.pem")
    assert DimseDestination(name="d", ae_title="D", host="h", port=104).tls is TlsMode.OFF


def test_config_errors_are_clear(pki: Pki, tmp_path: Path) -> None:
    missing = ours(pki.server, pki, private_key=str(tmp_path / "nope.key"))
    with pytest.raises(TlsConfigError, match=r"router.tls.private_key .*nope.key: no such file") as caught:
        server_context(missing)
    assert caught.value.code == "tls_config" and isinstance(caught.value, RouterError)

    mismatched = ours(pki.server, pki, private_key=str(pki.clients["portico"].key))
    for build in (server_context, client_context):
        with pytest.raises(TlsConfigError, match=r"does not match router\.tls\.certificate"):
            build(mismatched)

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match=r"ca\.txt: no PEM certificate"):
        client_context(ours(pki.server, pki), str(not_pem))
    with pytest.raises(TlsConfigError, match="no such file"):
        client_context(None, str(tmp_path / "absent.pem"))
    with pytest.raises(TlsConfigError, match="no PEM certificate"):
        server_context(ours(pki.server, pki, certificate=str(pki.server.key)))

    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(TlsConfigError, match="encrypted"):
        server_context(ours(pki.server, pki, private_key=str(locked)))

    folder = tmp_path / "folder.pem"
    folder.mkdir()
    with pytest.raises(TlsConfigError, match="is a folder"):
        server_context(ours(pki.server, pki, certificate=str(folder)))


def test_chain_in_certificate_file(pki: Pki, tmp_path: Path) -> None:
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pki.server.cert.read_bytes() + pki.ca.cert.read_bytes())
    shutil.copy(pki.server.key, tmp_path / "chain.key")
    assert server_context(ours(pki.server, pki, certificate=str(chain), private_key=str(tmp_path / "chain.key")))
