"""A throw-away PKI for DICOM TLS tests, made in code with ``cryptography`` (nothing committed).

All keys are EC P-256 (fast to make). Every leaf certificate carries both serverAuth and clientAuth,
so one certificate can be an SCP's and an SCU's, as ``router.tls.certificate`` is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANISATION = "Portico Test"
SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class CertFiles:
    """One certificate and its key, as PEM files."""

    cert: Path
    key: Path
    subject: str
    #: SHA-256 of the DER certificate, lower-case hex
    fingerprint: str


@dataclass(frozen=True)
class Pki:
    """Every certificate a TLS test needs; ``ca.cert`` is the CA bundle to trust."""

    folder: Path
    ca: CertFiles
    #: an unrelated CA: nothing it signs is trusted by ``ca.cert``
    other_ca: CertFiles
    #: CN=localhost, SANs localhost and 127.0.0.1, signed by ``ca``
    server: CertFiles
    expired_server: CertFiles
    #: like ``server`` but signed by ``other_ca``
    wrong_ca_server: CertFiles
    #: per name: CN=<name>,O=Portico Test, signed by ``ca``
    clients: dict[str, CertFiles]
    expired_client: CertFiles
    #: a client certificate signed by ``other_ca``
    wrong_ca_client: CertFiles

    def client(self, name: str) -> CertFiles:
        return self.clients[name]


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertFiles:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path, cert.subject.rfc4514_string(), cert.fingerprint(hashes.SHA256()).hex())


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: _Issuer | None, *,
                 is_ca: bool, valid: tuple[dt.datetime, dt.datetime],
                 names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> x509.Certificate:
    signer_key = key if issuer is None else issuer.key
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(subject if issuer is None else issuer.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(valid[0])
               .not_valid_after(valid[1])
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    if names or ips:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def make_pki(folder: Path, clients: tuple[str, ...] = ("portico", "modality-1")) -> Pki:
    """Write a CA, an unrelated CA, server and client certificates (good, expired, wrong CA) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    current = (now - dt.timedelta(days=1), now + dt.timedelta(days=30))
    expired = (now - dt.timedelta(days=30), now - dt.timedelta(days=1))

    def new_ca(stem: str, common_name: str) -> tuple[_Issuer, CertFiles]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(_name(common_name), key, None, is_ca=True,
                            valid=(now - dt.timedelta(days=1), now + dt.timedelta(days=365)))
        return _Issuer(cert, key), _write(folder, stem, cert, key)

    def leaf(stem: str, common_name: str, issuer: _Issuer, valid: tuple[dt.datetime, dt.datetime], *,
             server: bool) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(_name(common_name), key, issuer, is_ca=False, valid=valid,
                            names=SERVER_NAMES if server else (), ips=SERVER_IPS if server else ())
        return _write(folder, stem, cert, key)

    ca, ca_files = new_ca("ca", "Portico Test CA")
    other, other_files = new_ca("other-ca", "Unrelated Test CA")
    return Pki(
        folder=folder,
        ca=ca_files,
        other_ca=other_files,
        server=leaf("server", "localhost", ca, current, server=True),
        expired_server=leaf("expired-server", "localhost", ca, expired, server=True),
        wrong_ca_server=leaf("wrong-ca-server", "localhost", other, current, server=True),
        clients={name: leaf(f"client-{name}", name, ca, current, server=False) for name in clients},
        expired_client=leaf("expired-client", "expired-client", ca, expired, server=False),
        wrong_ca_client=leaf("wrong-ca-client", "wrong-ca-client", other, current, server=False),
    )
