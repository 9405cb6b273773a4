"""HTTPS and credentials for the DICOMweb requests we make (STOW-RS to a destination).

TLS 1.2 at least, and the server's certificate and host name always verified: against the
destination's ``ca_bundle``, or the system's store. The ``Authorization`` header is built from a
secret read when a request is made; it is never logged, and errors name the setting at fault, never
the secret. Redirects are not followed: a STOW-RS answer is the server's, and a token must not
travel to wherever a redirect points.
"""

from __future__ import annotations

import base64
import os
import ssl
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import IO

from dicom_router.errors import DestinationConfigError
from dicom_router.settings import StowAuth, StowAuthKind

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2


def client_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A TLS client context: verification on, TLS 1.2 or later, ``ca_bundle`` or the system's CAs.

    Raises
    ------
    DestinationConfigError
        When ``ca_bundle`` cannot be read as PEM certificates.
    """
    try:
        context = ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise DestinationConfigError(f"ca_bundle {ca_bundle} cannot be loaded ({reason})") from None
    context.minimum_version = MINIMUM_TLS
    return context


def authorization(auth: StowAuth) -> str:
    """The ``Authorization`` header value for ``auth``, with its secret read now.

    Raises
    ------
    DestinationConfigError
        When the secret file cannot be read, the variable is not set, or the secret is empty or
        spans lines. The message names the file or variable, never its contents.
    """
    secret = _secret(auth)
    if auth.kind is StowAuthKind.BEARER:
        return f"Bearer {secret}"
    pair = f"{auth.username}:{secret}".encode()
    return f"Basic {base64.b64encode(pair).decode('ascii')}"


def _secret(auth: StowAuth) -> str:
    if auth.secret_file is not None:
        where = f"auth.secret_file {auth.secret_file}"
        try:
            raw = Path(auth.secret_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DestinationConfigError(f"{where} is not UTF-8 text") from None
        except OSError as exc:
            raise DestinationConfigError(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    else:
        where = f"auth.secret_env {auth.secret_env}"
        value = os.environ.get(auth.secret_env or "")
        if value is None:
            raise DestinationConfigError(f"{where}: the environment variable is not set")
        raw = value
    secret = raw.strip()
    if not secret:
        raise DestinationConfigError(f"{where}: the secret is empty")
    if any(c in secret for c in "\r\n\0"):
        raise DestinationConfigError(f"{where}: the secret must be one line")
    return secret


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Answer a redirect as the error it is for a POST, instead of following it."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> None:
        return None


def opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """An opener that follows no redirects and uses ``context`` for ``https`` (none: plain HTTP only)."""
    if context is None:
        return urllib.request.build_opener(_NoRedirect())
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())


def describe_failure(exc: OSError) -> str:
    """Why a request got no HTTP answer, in words: the TLS reason when TLS was the cause."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate failed verification ({reason.verify_message})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS handshake failed ({reason.reason or reason})"
    return str(reason)
