"""Settings owned by the DICOM router: our listener, the peers we trust, where results go."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[^\\]*[^\\ ][^\\]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class TlsMode(StrEnum):
    """Whether a DICOM link runs over TLS (PS3.15 Annex B): ``required`` or ``off``."""

    REQUIRED = "required"
    OFF = "off"


class DicomTlsSettings(BaseModel):
    """Our DICOM TLS identity and policy (PS3.15 Annex B, BCP 195); see :mod:`dicom_router.tls`.

    The files are checked when the TLS contexts are built, not here: settings are also loaded on
    machines where the paths do not exist (they resolve against the config file's folder).
    """

    model_config = ConfigDict(extra="forbid")

    #: PEM file of our certificate (and chain): the TLS listener's and our client certificate
    certificate: str = Field(min_length=1)
    #: PEM file of its private key (unencrypted)
    private_key: str = Field(min_length=1)
    #: PEM file of the CAs trusted for peers' and destinations' certificates; None: the system's
    #: default store for outgoing links, and no client-certificate verification incoming
    ca_bundle: str | None = Field(default=None, min_length=1)
    #: the TLS listener's port (2762 is registered for DICOM over TLS)
    port: Port = 2762
    #: keep the plain ``router.port`` listener open beside the TLS one
    plain: bool = True
    #: incoming: mutual TLS, a peer without a certificate from ``ca_bundle`` is refused
    require_client_certificate: bool = True
    minimum_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> DicomTlsSettings:
        if self.require_client_certificate and not self.ca_bundle:
            raise ValueError("router.tls.require_client_certificate needs router.tls.ca_bundle "
                             "(the CAs that sign the peers' certificates)")
        return self


def normalise_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons, spaces and case ignored)."""
    digits = value.replace(":", "").replace(" ", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("certificate_fingerprint must be a SHA-256 fingerprint: 64 hex digits, colons allowed")
    return digits


def normalise_subject(value: str) -> str:
    """An RFC 4514 subject in its canonical form (cryptography's), e.g. ``CN=modality-1,O=Trust``.

    Attribute types may be names or dotted OIDs (``2.5.4.3=…`` becomes ``CN=…``); values are kept
    exactly, case included.
    """
    try:
        name = x509.Name.from_rfc4514_string(value)
    except ValueError:
        name = None
    if name is None or not len(name):
        raise ValueError("certificate_subject must be an RFC 4514 name like 'CN=modality-1,O=Hospital' "
                         "(attribute types in capitals, no spaces around ',' and '=')")
    return name.rfc4514_string()


class Peer(BaseModel):
    """A DICOM node allowed to send to us (and, when ``query`` is set, to answer our C-FIND)."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle
    #: addresses the peer may connect from; exact IPs
    hosts: tuple[str, ...] = ("127.0.0.1",)
    #: where the peer's own SCP listens, for C-FIND of NumberOfStudyRelatedInstances
    query_host: str | None = None
    query_port: Port | None = None
    query_ae_title: AETitle | None = None
    #: ``required``: plain associations from this peer are refused and our C-FIND to it uses TLS
    tls: TlsMode = TlsMode.OFF
    #: SHA-256 of the DER certificate this peer must present (hex; colons and case ignored)
    certificate_fingerprint: str | None = None
    #: RFC 4514 subject this peer's certificate must have, e.g. ``CN=modality-1,O=Trust``
    certificate_subject: str | None = None

    @field_validator("certificate_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        return None if value is None else normalise_fingerprint(value)

    @field_validator("certificate_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else normalise_subject(value)

    @model_validator(mode="after")
    def _binding_needs_tls(self) -> Peer:
        """A certificate binding with ``tls: off`` is refused rather than taken to imply TLS.

        A binding on a peer that may still associate in plain would bind nothing: anyone using the
        AE title from an allowed address would skip it by not using TLS. Turning TLS on silently
        would instead close the peer's plain path as a side effect of adding a fingerprint, a
        surprise during a migration; so the configuration must say ``tls: required`` itself.
        """
        if self.binds_certificate and self.tls is not TlsMode.REQUIRED:
            raise ValueError(f"peer {self.ae_title}: certificate_fingerprint/certificate_subject need "
                             "tls: required (a plain association carries no certificate)")
        return self

    @property
    def binds_certificate(self) -> bool:
        """Whether a TLS association from this peer must present a particular certificate."""
        return bool(self.certificate_fingerprint or self.certificate_subject)


class StowSender(BaseModel):
    """A DICOMweb client allowed to send studies to us by STOW-RS (``POST /dicom-web/studies``)."""

    model_config = ConfigDict(extra="forbid")

    #: recorded like a calling AE title; use the PACS's AE title, so that a ``peers`` entry of that
    #: name can answer the completeness C-FIND for studies it sent this way
    name: AETitle
    #: its bearer token (``Authorization: Bearer …``); separate from the API's admin token
    token: SecretStr
    #: addresses it may connect from; exact IPs
    hosts: tuple[str, ...] = ("127.0.0.1",)


class EdgeSettings(BaseModel):
    """What the listener gives a connection before it is an association, and how many it allows.

    A connection from an address on no peer's ``hosts`` is closed at accept. Until its
    A-ASSOCIATE-RQ has arrived in full a connection is *pending*: it has ``associate_timeout``
    seconds for that, and the pending ones are capped per address and in total, so slow or silent
    sockets (port scans, health checks, a flood) cannot take the slots of real senders.
    Associations are capped too; beyond a cap the peer gets an A-ASSOCIATE-RJ (transient, local
    limit exceeded). Refusals are logged with their reason and audited as counts per
    ``report_seconds``, not one row per connection.
    """

    model_config = ConfigDict(extra="forbid")

    #: seconds from accept to a complete A-ASSOCIATE-RQ (and the TLS handshake before it)
    associate_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0
    #: seconds a started PDU may take to arrive in full; idle time between PDUs is the DIMSE timeout's
    pdu_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    max_associations_per_address: Annotated[int, Field(ge=1, le=1000)] = 8
    max_pending: Annotated[int, Field(ge=1, le=10000)] = 64
    max_pending_per_address: Annotated[int, Field(ge=1, le=10000)] = 8
    #: how often refusals are summed up into one audit row per (reason, address)
    report_seconds: Annotated[float, Field(gt=0)] = 60.0


#: the maximum PDU length we accept and offer: pynetdicom's 0 (unlimited) is not allowed
MaxPdu = Annotated[int, Field(ge=4096, le=16 * 2**20)]


class RouterSettings(BaseModel):
    """The C-STORE/C-ECHO listener and study assembly."""

    model_config = ConfigDict(extra="forbid")

    ae_title: AETitle = "PORTICO"
    bind_host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu: MaxPdu = 262144
    #: the event-driven reactor (:mod:`dicom_router.reactor`); false falls back to pynetdicom's own,
    #: for receiving, sending and C-FIND alike (the edge's protections hold on both)
    event_driven: bool = True
    #: several receiver processes on this machine share the port (SO_REUSEPORT; the kernel spreads new
    #: connections over them); the edge's per-address limits then hold per process
    reuse_port: bool = False
    edge: EdgeSettings = EdgeSettings()
    #: calling AE titles + addresses allowed to associate; empty means nobody
    peers: tuple[Peer, ...] = ()
    #: a study is complete after this many seconds without a new instance
    quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: how often the assembler looks at open studies
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5
    rules_file: str = "rules.yaml"
    #: DICOMweb senders (STOW-RS, served by the HTTP API when ``api.enabled``); empty means nobody
    stow_senders: tuple[StowSender, ...] = ()
    #: largest STOW-RS request body accepted, MB (a bigger one is answered 413)
    stow_max_request_mb: Annotated[int, Field(ge=1)] = 2048
    #: largest STOW-RS part (one instance), MB: a bigger one is refused (0xA700) and not kept, the rest go on
    stow_max_part_mb: Annotated[int, Field(ge=1, le=65536)] = 1024
    #: most parts in one STOW-RS request: at the next one the request stops, answered 413 with what was stored
    stow_max_parts: Annotated[int, Field(ge=1, le=1_000_000)] = 10000
    #: STOW-RS requests handled at once; one more is answered 503 with Retry-After before its body is read
    stow_max_concurrent: Annotated[int, Field(ge=1, le=256)] = 4
    #: seconds a STOW-RS request body may stall (no bytes at all) before it is cut short with 408: a slow
    #: sender holds one of the ``stow_max_concurrent`` slots no longer than this at a time
    stow_idle_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    #: quarantined STOW-RS bytes per sender over the last hour, MB; beyond it bad parts are refused, not kept
    stow_quarantine_mb_per_hour: Annotated[int, Field(ge=0, le=1_048_576)] = 256
    #: quarantined STOW-RS parts per sender over the last hour (each is a file and an audit row)
    stow_quarantine_parts_per_hour: Annotated[int, Field(ge=0, le=1_000_000)] = 100
    #: raise glibc's malloc thresholds when the listener starts (see dicom_router.scp.tune_allocator):
    #: PDU-sized buffers are reused instead of page-faulted anew; process-wide
    tune_allocator: bool = True
    #: DICOM TLS: our certificate, the TLS listener, trusted CAs; None: no TLS listener
    tls: DicomTlsSettings | None = None

    @model_validator(mode="after")
    def _tls_peers_need_tls(self) -> RouterSettings:
        for peer in self.peers:
            if peer.tls is TlsMode.REQUIRED and self.tls is None:
                raise ValueError(f"peer {peer.ae_title} has tls: required but router.tls is not set "
                                 "(no TLS listener to accept it)")
            if peer.binds_certificate and self.tls is not None and not self.tls.ca_bundle:
                raise ValueError(f"peer {peer.ae_title} binds a certificate but router.tls.ca_bundle is not "
                                 "set (client certificates are only asked for and verified with a CA)")
        return self


class Compression(StrEnum):
    """Lossless compression of results on the way to a destination.

    ``none`` sends every file as stored (uncompressed); safe for any receiver. ``jpeg-ls`` and
    ``rle`` send 8/16-bit SEGs (FRACTIONAL, not the 1-bit BINARY ones) in JPEG-LS Lossless or RLE
    Lossless when the destination accepts that transfer syntax, and the stored file when it does
    not. Only lossless: the pixels and the SOP Instance UID stay the same.
    """

    NONE = "none"
    JPEG_LS = "jpeg-ls"
    RLE = "rle"


class DimseDestination(BaseModel):
    """A C-STORE SCP that receives our results."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dimse"] = "dimse"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = None
    max_pdu: MaxPdu = 262144
    #: also send Secondary Capture key images, for a PACS or viewer that cannot display a SEG
    secondary_capture: bool = False
    #: lossless compression of SEGs offered to it, with the stored (uncompressed) file as fallback
    compression: Compression = Compression.NONE
    #: ``required``: associate over TLS, presenting ``router.tls``'s certificate when it is set
    tls: TlsMode = TlsMode.OFF
    #: PEM file of the CAs trusted for this destination's certificate (instead of router.tls.ca_bundle)
    ca_bundle: str | None = Field(default=None, min_length=1)
    #: the name its certificate must carry (DNS or IP subjectAltName); default ``host``
    server_hostname: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _tls_options_need_tls(self) -> DimseDestination:
        if (self.ca_bundle or self.server_hostname) and self.tls is not TlsMode.REQUIRED:
            raise ValueError(f"destination {self.name}: ca_bundle/server_hostname apply only with tls: required")
        return self


class StowAuthKind(StrEnum):
    """How a STOW-RS request carries our credentials: ``Authorization: Bearer`` or ``Basic``."""

    BEARER = "bearer"
    BASIC = "basic"


class StowAuth(BaseModel):
    """Our credentials towards a STOW-RS destination; the secret itself is never in the settings.

    The secret (a bearer token, or the basic-auth password) is read from ``secret_file`` (its
    contents, without surrounding whitespace) or from the environment variable ``secret_env``, at
    every send, so a rotated secret is used without a restart.
    """

    model_config = ConfigDict(extra="forbid")

    kind: StowAuthKind
    #: the user name, for ``basic`` only
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:\r\n]+$")
    #: a file holding the secret (readable by the appliance only)
    secret_file: str | None = Field(default=None, min_length=1)
    #: the name of an environment variable holding the secret
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _consistent(self) -> StowAuth:
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("exactly one of secret_file and secret_env is needed")
        if self.kind is StowAuthKind.BASIC and self.username is None:
            raise ValueError("kind basic needs a username")
        if self.kind is StowAuthKind.BEARER and self.username is not None:
            raise ValueError("a username goes with kind basic only")
        return self


class StowDestination(BaseModel):
    """A DICOMweb STOW-RS endpoint that receives our results."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stow"] = "stow"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://")
    #: also send Secondary Capture key images, for a PACS or viewer that cannot display a SEG
    secondary_capture: bool = False
    #: lossless compression of SEGs offered to it, with the stored (uncompressed) file as fallback
    compression: Compression = Compression.NONE
    #: PEM file of the CA certificate(s) that verify an ``https`` server, instead of the system's
    #: store; verification itself is never off
    ca_bundle: str | None = Field(default=None, min_length=1)
    #: credentials sent with every request; none: no ``Authorization`` header
    auth: StowAuth | None = None

    @model_validator(mode="after")
    def _ca_bundle_needs_https(self) -> StowDestination:
        if self.ca_bundle is not None and not self.url.startswith("https://"):
            raise ValueError(f"destination {self.name}: ca_bundle is set but the url is not https://")
        return self


Destination = Annotated[DimseDestination | StowDestination, Field(discriminator="kind")]


class DispatchSettings(BaseModel):
    """Where results go and how hard we try."""

    model_config = ConfigDict(extra="forbid")

    destinations: tuple[Destination, ...] = ()
    retry_initial_seconds: Annotated[float, Field(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5

    @field_validator("destinations")
    @classmethod
    def _unique(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return value
