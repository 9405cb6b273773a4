"""Detached ed25519 signatures over a model package's manifest.

The manifest lists the sha256 of every other file in the package, so one signature over the
manifest's exact bytes covers the whole package. The signature lives next to it in
:data:`SIGNATURE_NAME`, as 64 raw bytes or as their base64 text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.errors import PackageError

SIGNATURE_NAME = "signature.ed25519"
_SIGNATURE_BYTES = 64


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 key pair as ``(private PEM, public PEM)``; the private key is unencrypted PKCS#8."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def public_key(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM public key, refusing anything that is not ed25519.

    Raises
    ------
    ValueError
        When ``pem`` is not an ed25519 public key.
    """
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an ed25519 public key ({type(key).__name__})")
    return key


def private_key(pem: str | bytes) -> Ed25519PrivateKey:
    """Parse an unencrypted PEM private key, refusing anything that is not ed25519."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an ed25519 private key ({type(key).__name__})")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short, stable identity of a public key: sha256 of its raw 32 bytes, first 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest: bytes, private_key_pem: str | bytes) -> bytes:
    """The base64 ed25519 signature of ``manifest``, as written to :data:`SIGNATURE_NAME`."""
    return base64.b64encode(private_key(private_key_pem).sign(manifest)) + b"\n"


def decode_signature(data: bytes) -> bytes:
    """The 64 signature bytes from a signature file's contents (raw or base64).

    Raises
    ------
    PackageError
        When the contents are neither.
    """
    if len(data) == _SIGNATURE_BYTES:
        return data
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _SIGNATURE_BYTES:
        raise PackageError(f"{SIGNATURE_NAME} is not a 64-byte ed25519 signature (raw or base64)")
    return raw


def verify_manifest(manifest: bytes, signature: bytes, trusted_keys: Sequence[str | bytes]) -> str:
    """Fingerprint of the first trusted key whose signature over ``manifest`` verifies.

    Raises
    ------
    PackageError
        When no trusted key is given or none of them verifies the signature.
    """
    if not trusted_keys:
        raise PackageError("the package is signed but no trusted keys are configured to check it")
    raw = decode_signature(signature)
    for pem in trusted_keys:
        key = public_key(pem)
        try:
            key.verify(raw, manifest)
        except InvalidSignature:
            continue
        return fingerprint(key)
    raise PackageError("the signature does not verify with any trusted key "
                       "(wrong key, or the manifest changed after signing)")
