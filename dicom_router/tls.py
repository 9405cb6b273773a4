"""DICOM TLS (PS3.15 Annex B) building blocks: BCP 195 contexts, peer identities, readable reasons.

Contexts follow the non-downgrading BCP 195 profile (PS3.15 B.13): TLS 1.2 or later (1.3 when the
settings ask for it), forward-secret AEAD cipher suites only for TLS 1.2 (OpenSSL's defaults for
TLS 1.3, which are all AEAD), no compression, no renegotiation. Files are read when a context is
built; any problem with them is a :class:`~dicom_router.errors.TlsConfigError` naming the file and
what is wrong with it.

A TLS failure inside pynetdicom ends as "association failed" with the reason only in pynetdicom's
log. Client contexts built here therefore make sockets that remember their first TLS error for the
thread doing the I/O (pynetdicom's DUL thread of that association); :func:`tls_failure` reads it.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import socket
import ssl
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pynetdicom.association import Association

from dicom_router.errors import TlsConfigError
from dicom_router.settings import DicomTlsSettings, Peer

LOGGER = logging.getLogger(__name__)

#: TLS 1.2 suites of BCP 195 (RFC 9325 4.2) / PS3.15 B.13: ephemeral key exchange, AEAD only
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
))

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class CertificateIdentity:
    """Who a TLS peer's certificate says it is."""

    #: RFC 4514 string, as cryptography writes it (``CN=modality-1,O=Trust``)
    subject: str
    #: SHA-256 of the DER certificate, 64 lower-case hex digits
    fingerprint: str


# --- contexts ---------------------------------------------------------------------------------

def server_context(tls: DicomTlsSettings) -> ssl.SSLContext:
    """The TLS listener's context: our certificate; peers verified against ``tls.ca_bundle``.

    ``verify_mode`` is ``CERT_REQUIRED`` with ``require_client_certificate``, else ``CERT_OPTIONAL``
    when a CA bundle is set (a certificate, if sent, must verify) and ``CERT_NONE`` without one.

    Raises
    ------
    TlsConfigError
        A file is missing, unreadable or not PEM, or the key does not fit the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.minimum_version)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # no session resumption is used; tickets only add post-handshake records the client must read
    context.num_tickets = 0
    _load_identity(context, tls)
    if tls.ca_bundle:
        _load_ca(context, tls.ca_bundle, "router.tls.ca_bundle")
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DicomTlsSettings | None, ca_bundle: str | None = None) -> ssl.SSLContext:
    """A context for our outgoing TLS associations (destinations, C-FIND to peers).

    The server's certificate must verify against ``ca_bundle``, else ``tls.ca_bundle``, else the
    system's default store, and carry the name we connect to (hostname check on). Our certificate is
    presented as the client certificate when ``tls`` is given.

    Raises
    ------
    TlsConfigError
        A file is missing, unreadable or not PEM, or the key does not fit the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls.minimum_version if tls is not None else "1.2")
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if tls is not None:
        _load_identity(context, tls)
    bundle = ca_bundle or (tls.ca_bundle if tls is not None else None)
    if bundle:
        _load_ca(context, bundle, "ca_bundle" if ca_bundle else "router.tls.ca_bundle")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.sslsocket_class = _RecordingSSLSocket
    return context


def _harden(context: ssl.SSLContext, minimum: str) -> None:
    context.minimum_version = _VERSIONS[minimum]
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{what} {path}: is a folder, not a PEM file") from None
    except PermissionError:
        raise TlsConfigError(f"{what} {path}: not readable by this process") from None
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def _load_identity(context: ssl.SSLContext, tls: DicomTlsSettings) -> None:
    """Our certificate and key, checked with cryptography first for clear messages."""
    try:
        certs = x509.load_pem_x509_certificates(_read(tls.certificate, "router.tls.certificate"))
    except ValueError:
        raise TlsConfigError(f"router.tls.certificate {tls.certificate}: no PEM certificate in it") from None
    key: PrivateKeyTypes
    try:
        key = serialization.load_pem_private_key(_read(tls.private_key, "router.tls.private_key"), password=None)
    except TypeError:
        raise TlsConfigError(f"router.tls.private_key {tls.private_key}: the key is encrypted; "
                             "DICOM TLS needs it unencrypted (protect the file instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsConfigError(f"router.tls.private_key {tls.private_key}: not a PEM private key") from None
    if _public_der(key.public_key()) != _public_der(certs[0].public_key()):
        raise TlsConfigError(f"router.tls.private_key {tls.private_key} does not match "
                             f"router.tls.certificate {tls.certificate}")
    now = dt.datetime.now(dt.UTC)
    if certs[0].not_valid_after_utc < now:
        LOGGER.warning("router.tls.certificate %s expired on %s: peers will refuse it", tls.certificate,
                       f"{certs[0].not_valid_after_utc:%Y-%m-%d}")
    elif certs[0].not_valid_before_utc > now:
        LOGGER.warning("router.tls.certificate %s is not valid before %s", tls.certificate,
                       f"{certs[0].not_valid_before_utc:%Y-%m-%d}")
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (ssl.SSLError, OSError) as exc:
        reason = describe_tls_error(exc)
        raise TlsConfigError(f"router.tls.certificate/private_key cannot be loaded: {reason}") from None


def _public_der(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def _load_ca(context: ssl.SSLContext, path: str, what: str) -> None:
    data = _read(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"{what} {path}: no PEM certificate in it") from None
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{what} {path} cannot be loaded: {describe_tls_error(exc)}") from None


# --- identities -------------------------------------------------------------------------------

def identity_of(sock: ssl.SSLSocket) -> CertificateIdentity | None:
    """The certificate the peer presented on ``sock``, or ``None`` when it presented none."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    return CertificateIdentity(subject=cert.subject.rfc4514_string(),
                               fingerprint=cert.fingerprint(hashes.SHA256()).hex())


def identity_matches(peer: Peer, identity: CertificateIdentity | None) -> bool:
    """Whether ``identity`` satisfies what ``peer`` binds (true when it binds nothing).

    Fingerprints compare as lower-case hex (the settings normalise theirs). Subjects compare as
    canonical RFC 4514 strings: both sides are parsed by cryptography and written back, so attribute
    type spelling (``CN`` or ``2.5.4.3``) and escaping do not matter, while attribute order and
    values (case included) must be the same.
    """
    if not peer.binds_certificate:
        return True
    if identity is None:
        return False
    if peer.certificate_fingerprint and identity.fingerprint.lower() != peer.certificate_fingerprint:
        return False
    return not (peer.certificate_subject and _canonical(identity.subject) != _canonical(peer.certificate_subject))


def _canonical(subject: str) -> str | None:
    try:
        return x509.Name.from_rfc4514_string(subject).rfc4514_string()
    except ValueError:
        return None


# --- reasons ----------------------------------------------------------------------------------

#: OpenSSL reason codes → what they mean for a DICOM link
_REASONS = {
    "WRONG_VERSION_NUMBER": "wrong version number (plain DICOM to the TLS port, or TLS to a plain one?)",
    "HTTP_REQUEST": "an HTTP request on the DICOM TLS port",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the TLS handshake (not a DICOM TLS port?)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate (set router.tls)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate: certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the handshake (no common cipher suite or protocol?)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version (the peer is older than our minimum?)",
    "UNSUPPORTED_PROTOCOL": "no common TLS version (the peer is older than our minimum?)",
    "NO_PROTOCOLS_AVAILABLE": "no common TLS version",
    "NO_SHARED_CIPHER": "no common cipher suite",
    "KEY_VALUES_MISMATCH": "private key does not match the certificate",
    "NO_CERTIFICATE_OR_CRL_FOUND": "no certificate in the CA file",
    "CA_MD_TOO_WEAK": "a certificate is signed with a weak digest",
    "EE_KEY_TOO_SMALL": "a certificate's key is too small",
}


def describe_tls_error(exc: BaseException) -> str:
    """A short reason for a TLS (or connection) failure, fit for a log line and the outbox.

    Certificate verification failures say what failed ("certificate verify failed: certificate has
    expired"); OpenSSL alerts and errors are named by what they usually mean for a DICOM link.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = str(exc.verify_message or exc.reason or "unknown reason").rstrip(".")
        return f"certificate verify failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return "certificate verify failed"
        if reason in _REASONS:
            return _REASONS[reason]
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "the peer closed the connection during the TLS handshake (not a DICOM TLS port?)"
        if reason:
            return f"TLS error: {reason.lower().replace('_', ' ')}"
        return f"TLS error: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out" if "handshake" in str(exc) else "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "the peer closed the connection (it may not accept our TLS settings or certificate)"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


# --- remembering why a TLS link failed --------------------------------------------------------

_FAILURES: weakref.WeakKeyDictionary[threading.Thread, tuple[bool, str]] = weakref.WeakKeyDictionary()
_FAILURES_LOCK = threading.Lock()


#: a peer that closes right after the handshake has usually refused our certificate (TLS 1.3 sends
#: that verdict after the client's handshake is done; the alert is lost when the close races it)
_CLOSED_AFTER_HANDSHAKE = ("the peer closed the TLS connection right after the handshake "
                           "(did it refuse our client certificate, or want one?)")

_CLOSED_IN_HANDSHAKE = "the peer closed the connection during the TLS handshake (not a DICOM TLS port?)"


def _remember(exc: OSError, *, after_handshake: bool) -> None:
    if (isinstance(exc, BlockingIOError | ssl.SSLWantReadError | ssl.SSLWantWriteError)
            or exc.errno in (errno.ENOTCONN, errno.EINVAL)):
        return  # not a failure: the ssl module probes unconnected sockets this way
    is_tls = isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError)
    closed = isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError)
    if closed:
        reason = _CLOSED_AFTER_HANDSHAKE if after_handshake else _CLOSED_IN_HANDSHAKE
    else:
        reason = describe_tls_error(exc)
    thread = threading.current_thread()
    with _FAILURES_LOCK:
        previous = _FAILURES.get(thread)
        # the first TLS alert explains the rest; anything else only when nothing better is known
        if previous is None or (is_tls and not previous[0]):
            _FAILURES[thread] = (is_tls, reason)


def association_failure(assoc: Association, *, over_tls: bool) -> str:
    """Why a requested association was not established: rejected, the TLS reason, closed or unreachable."""
    if assoc.is_rejected:
        return "association rejected"
    failure = tls_failure(assoc.dul) if over_tls else None
    if failure:
        return f"association failed over TLS: {failure}"
    # pynetdicom marks every failed request aborted, so is_aborted tells nothing here; a local port
    # is recorded once the TCP connection is made
    if getattr(getattr(assoc.requestor, "address_info", None), "port", 0):
        if over_tls:
            return "association failed over TLS: the peer closed the connection or did not answer"
        return "association failed: the peer closed the connection or did not answer (a DICOM TLS port?)"
    return "association failed (peer unreachable?)"


def tls_failure(thread: threading.Thread | None) -> str | None:
    """Why the TLS link whose I/O ran in ``thread`` failed, when a client context's socket saw it.

    For a pynetdicom association pass ``assoc.dul``: its DUL thread connects and does the I/O.
    """
    if thread is None:
        return None
    with _FAILURES_LOCK:
        failure = _FAILURES.get(thread)
    return None if failure is None else failure[1]


class _RecordingSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that remembers its first error for :func:`tls_failure`."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            _remember(exc, after_handshake=False)
            raise

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            return super().recv(*args, **kwargs)
        except OSError as exc:
            _remember(exc, after_handshake=True)
            raise

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        try:
            return super().recv_into(*args, **kwargs)
        except OSError as exc:
            _remember(exc, after_handshake=True)
            raise

    def send(self, *args: Any, **kwargs: Any) -> int:
        try:
            return super().send(*args, **kwargs)
        except OSError as exc:
            _remember(exc, after_handshake=True)
            raise

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().sendall(*args, **kwargs)
        except OSError as exc:
            _remember(exc, after_handshake=True)
            raise
