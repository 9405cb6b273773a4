"""One Settings object, composed of each package's own section, from ``portico.yaml`` + ``PORTICO_…`` env.

Environment variables override the file; nested keys use ``__`` (``PORTICO_ROUTER__PORT=11113``).
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_router.settings import DispatchSettings, RouterSettings, StowDestination
from fl_client.settings import FLSettings
from inference.settings import InferenceSettings

CONFIG_ENV = "PORTICO_CONFIG"
PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "secret", "password", "admin"}


class Mode(StrEnum):
    PRODUCTION = "production"
    DEV = "dev"


class RetentionSettings(BaseModel):
    """How long the data folder keeps what it holds (:mod:`appliance.retention`); ``0`` days: for ever.

    Days count from the moment a study's work was finished (last instance received, last job
    finished, last result delivered, review decided); a study with work still to do is never purged.
    """

    model_config = ConfigDict(extra="forbid")

    #: days to keep a study's received instances once every job of it is finished and delivered
    instances_days: Annotated[int, Field(ge=0)] = 30
    #: days to keep the result files (SEG, SR, SC and their compressed copies) once delivered
    results_days: Annotated[int, Field(ge=0)] = 90
    #: days to keep a quarantined file
    quarantine_days: Annotated[int, Field(ge=0)] = 30
    #: the quarantine's quota, MB: beyond it the oldest quarantined files go first (0: no quota)
    quarantine_max_mb: Annotated[int, Field(ge=0)] = 1024
    #: minutes between purges in ``portico serve`` (0: never in the service; ``portico purge`` only)
    interval_minutes: Annotated[float, Field(ge=0)] = 60.0


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: everything the appliance writes lives here: instances, results, database, quarantine
    data_dir: str = "var"
    #: refuse new instances (0xA700) when less than this many MB are free
    min_free_mb: Annotated[int, Field(ge=0)] = 512
    #: fsync every received instance before acknowledging it
    fsync: bool = True
    #: the index: ``sqlite`` (a file in data_dir, the default), ``sqlite:///PATH``, or a PostgreSQL URL
    #: (``postgresql://portico@db.example/portico``, psycopg 3; the password from ``~/.pgpass`` or
    #: ``PGPASSWORD``, not in this file) shared by several machines running Portico's roles
    database: Annotated[str, Field(pattern=r"^(sqlite|sqlite:///.+|postgres(ql)?://.+)$")] = "sqlite"
    #: what is purged, and when
    retention: RetentionSettings = RetentionSettings()


class ApiTlsSettings(BaseModel):
    """HTTPS for the API, the dashboard and STOW-RS ingest (TLS 1.2 or later)."""

    model_config = ConfigDict(extra="forbid")

    #: PEM file: our certificate, then any intermediate CA certificates
    certificate: str = Field(min_length=1)
    #: PEM file: its private key, unencrypted (keep it readable by the appliance only)
    private_key: str = Field(min_length=1)
    #: PEM file of the CA(s) that issue client certificates; when set, every client needs one
    client_ca: str | None = Field(default=None, min_length=1)


class SessionSettings(BaseModel):
    """Dashboard sessions (a cookie after ``POST /auth/login``): they end at whichever limit comes first."""

    model_config = ConfigDict(extra="forbid")

    #: a session ends this long after sign-in, however busy
    absolute_hours: Annotated[float, Field(gt=0, le=24)] = 8.0
    #: a session ends after this long without a request
    idle_minutes: Annotated[float, Field(gt=0, le=24 * 60)] = 30.0


class LockoutSettings(BaseModel):
    """Failed sign-ins (passwords and bearer tokens) slow down, per user name and per client address.

    After ``user_failures`` failures for one user name (``address_failures`` from one address) the next
    attempt is refused (429, ``Retry-After``) for ``first_seconds``; each further failure doubles the wait,
    up to ``max_seconds``. Failures are forgotten after ``forget_after_seconds`` without one, and a user's
    on a successful sign-in.
    """

    model_config = ConfigDict(extra="forbid")

    user_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    address_failures: Annotated[int, Field(ge=1, le=10000)] = 10
    first_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_seconds: Annotated[float, Field(gt=0)] = 900.0
    forget_after_seconds: Annotated[float, Field(gt=0)] = 3600.0

    @model_validator(mode="after")
    def _ordered(self) -> LockoutSettings:
        if self.max_seconds < self.first_seconds:
            raise ValueError("api.lockout.max_seconds must be at least first_seconds")
        return self


class MetricsSettings(BaseModel):
    """Who may scrape ``GET /metrics`` (Prometheus): counts, timings and destination names, never patient data.

    A scrape is answered when it comes from one of ``hosts`` and, when ``token`` is set, carries it as
    ``Authorization: Bearer`` (Prometheus: ``authorization: {credentials_file: …}``). By default only
    this machine may scrape, without a token. A scraper beyond this machine needs a token.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: client addresses or networks allowed to scrape (as the API sees them: behind a declared TLS proxy, the
    #: forwarded address)
    hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    #: the bearer token a scrape must carry; none: the address alone decides (loopback only in production)
    token: SecretStr | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or network") from None
        return value

    def allows(self, address: str) -> bool:
        """Whether a scrape from ``address`` may be answered (the token is checked apart)."""
        try:
            client = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        return any(client in ipaddress.ip_network(host, strict=False) for host in self.hosts)

    @property
    def beyond_loopback(self) -> bool:
        """Whether any of ``hosts`` is beyond this machine."""
        return any(not ipaddress.ip_network(host, strict=False).is_loopback for host in self.hosts)


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8042
    #: deprecated: one shared admin bearer token. Accounts (``portico users``) replace it; when set (not a
    #: placeholder) it still opens everything as the admin ``api`` and the start-up log says it is deprecated
    token: SecretStr | None = None
    sessions: SessionSettings = SessionSettings()
    lockout: LockoutSettings = LockoutSettings()
    #: serve HTTPS; none: plain HTTP
    tls: ApiTlsSettings | None = None
    #: plain HTTP from a reverse proxy that terminates TLS: its ``X-Forwarded-For`` and
    #: ``X-Forwarded-Proto`` are believed, from ``proxy_addresses`` only
    behind_tls_proxy: bool = False
    #: the proxy's addresses (IPs or networks); required with ``behind_tls_proxy``
    proxy_addresses: tuple[str, ...] = ()
    #: ``GET /metrics`` for Prometheus
    metrics: MetricsSettings = MetricsSettings()

    @field_validator("proxy_addresses")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            try:
                ipaddress.ip_network(address)
            except ValueError:
                raise ValueError(f"{address!r} is not an IP address or network") from None
        return value

    @model_validator(mode="after")
    def _proxy(self) -> ApiSettings:
        if self.behind_tls_proxy and not self.proxy_addresses:
            raise ValueError("api.behind_tls_proxy needs api.proxy_addresses: the proxy's IP addresses")
        if self.proxy_addresses and not self.behind_tls_proxy:
            raise ValueError("api.proxy_addresses is set but api.behind_tls_proxy is false")
        return self

    @property
    def scheme(self) -> str:
        """``https`` when we serve TLS ourselves, else ``http``."""
        return "http" if self.tls is None else "https"

    @property
    def legacy_token(self) -> SecretStr | None:
        """The deprecated ``api.token`` when it is set to a real secret (a placeholder opens nothing)."""
        return self.token if self.token is not None and not is_placeholder(self.token) else None


class JobSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: a claimed job is its worker's for this long without a heartbeat (renewed every third of it); a
    #: worker that dies loses its jobs to the others after at most this, or at once when it ran on this host
    lease_seconds: Annotated[float, Field(ge=3)] = 60.0


class ReviewSettings(BaseModel):
    """Which models' results wait for a reviewer before they go to the destinations."""

    model_config = ConfigDict(extra="forbid")

    #: hold every model's results until a reviewer approves them
    required: bool = False
    #: hold only these models' results (model names, as in the rules); used when ``required`` is false
    models: tuple[str, ...] = ()
    #: the dashboard's "Open in viewer" link: ``{study_uid}`` and ``{series_uid}`` (the source series) are
    #: filled in; OHIF v3 style by default; empty: no link
    viewer_url: str = "http://localhost:3000/viewer?StudyInstanceUIDs={study_uid}"

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://", "/")):
            raise ValueError("viewer_url must be an http(s) URL or a path")
        try:
            value.format(study_uid="", series_uid="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("viewer_url may use only {study_uid} and {series_uid}") from exc
        return value

    def viewer_link(self, study_uid: str, series_uid: str) -> str | None:
        """The viewer URL for a study, or ``None`` when none is configured."""
        if not self.viewer_url:
            return None
        return self.viewer_url.format(study_uid=quote(study_uid, safe=""), series_uid=quote(series_uid, safe=""))

    def holds(self, model: str) -> bool:
        """Whether a job of ``model`` is held for review."""
        return self.required or model in self.models


class SyslogTransport(StrEnum):
    """How audit messages travel to the collector (IHE ATNA, ITI-20)."""

    #: RFC 5425: TLS, octet-counted frames
    TLS = "tls"
    #: RFC 6587: plain TCP, octet-counted frames
    TCP = "tcp"
    #: RFC 5426: one datagram per message; nothing confirms delivery
    UDP = "udp"


#: a syslog APP-NAME (RFC 5424): 1 to 48 printable US-ASCII characters, no space
_APP_NAME = r"^[!-~]{1,48}$"


class SyslogSettings(BaseModel):
    """The ATNA audit record repository: a syslog collector (see :mod:`appliance.atna_sender`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    #: default: 6514 for ``tls`` (RFC 5425), 514 for ``tcp`` and ``udp``
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    transport: SyslogTransport = SyslogTransport.TLS
    #: PEM file of the CAs that verify the collector's certificate (``tls``); none: the system's store
    ca_bundle: str | None = Field(default=None, min_length=1)
    #: PEM files of our client certificate and its key, for a collector that asks for one (``tls``)
    certificate: str | None = Field(default=None, min_length=1)
    private_key: str | None = Field(default=None, min_length=1)
    #: the syslog header's APP-NAME and our processes' UserID in the messages
    app_name: Annotated[str, Field(pattern=_APP_NAME)] = "portico"
    #: unsent messages kept while the collector is away; beyond, the oldest are dropped (and that is audited)
    queue_max: Annotated[int, Field(ge=10)] = 100_000

    @model_validator(mode="after")
    def _tls_files(self) -> SyslogSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("audit.syslog.certificate and private_key go together")
        if self.transport is not SyslogTransport.TLS and (self.ca_bundle or self.certificate):
            raise ValueError("audit.syslog.ca_bundle, certificate and private_key need transport: tls")
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 6514 if self.transport is SyslogTransport.TLS else 514


class AuditSettings(BaseModel):
    """The audit trail's copies beyond this machine (:mod:`appliance.atna_sender`)."""

    model_config = ConfigDict(extra="forbid")

    #: send every audit event that has an ATNA mapping to this collector; none: the local trail only
    syslog: SyslogSettings | None = None
    #: AuditSourceID in the messages; default ``<router.ae_title>@<host name>``
    source_id: str | None = Field(default=None, min_length=1)
    #: AuditEnterpriseSiteID in the messages (e.g. the trust's ODS code)
    site_id: str | None = Field(default=None, min_length=1)
    #: minutes between log lines that anchor the chain's head (id and hash), when it moved
    anchor_minutes: Annotated[float, Field(gt=0)] = 60.0


class Settings(BaseSettings):
    """The appliance's whole configuration."""

    model_config = SettingsConfigDict(env_prefix="PORTICO_", env_nested_delimiter="__", extra="forbid")

    mode: Mode = Mode.PRODUCTION
    storage: StorageSettings = StorageSettings()
    router: RouterSettings = RouterSettings()
    dispatch: DispatchSettings = DispatchSettings()
    inference: InferenceSettings = InferenceSettings()
    jobs: JobSettings = JobSettings()
    review: ReviewSettings = ReviewSettings()
    api: ApiSettings = ApiSettings()
    fl: FLSettings = FLSettings()
    audit: AuditSettings = AuditSettings()

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.mode is Mode.PRODUCTION and self.api.enabled and self.api.token is not None \
                and is_placeholder(self.api.token):
            raise ValueError("api.token is a placeholder; remove it (accounts: portico users) or set a real secret")
        for sender in self.router.stow_senders:
            if (self.mode is Mode.PRODUCTION
                    and sender.token.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS):
                raise ValueError(f"router.stow_senders: {sender.name}'s token is a placeholder; set a real secret")
        names = [s.name for s in self.router.stow_senders]
        tokens = [s.token.get_secret_value() for s in self.router.stow_senders]
        if len(set(names)) != len(names) or len(set(tokens)) != len(tokens):
            raise ValueError("router.stow_senders: every sender needs its own name and its own token")
        if self.api.token is not None and self.api.token.get_secret_value() in tokens:
            raise ValueError("router.stow_senders: a sender's token must differ from api.token")
        metrics = self.api.metrics
        if self.mode is Mode.PRODUCTION and metrics.enabled:
            if metrics.token is not None and is_placeholder(metrics.token):
                raise ValueError("api.metrics.token is a placeholder; set a real secret")
            if metrics.token is None and metrics.beyond_loopback:
                raise ValueError("api.metrics.hosts reaches beyond this machine: set api.metrics.token too")
        if metrics.token is not None and metrics.token.get_secret_value() in tokens:
            raise ValueError("api.metrics.token must differ from every STOW-RS sender's token")
        return self

    @model_validator(mode="after")
    def _no_clear_text_beyond_loopback(self) -> Settings:
        if self.mode is not Mode.PRODUCTION:
            return self
        api = self.api
        if api.enabled and api.tls is None and not api.behind_tls_proxy and not is_loopback(api.host):
            raise ValueError(f"api.host {api.host} is beyond this machine and the API would speak plain HTTP: "
                             "set api.tls (certificate, private_key), or, behind a reverse proxy that terminates "
                             "TLS, api.behind_tls_proxy: true with api.proxy_addresses")
        for destination in self.dispatch.destinations:
            if not isinstance(destination, StowDestination) or destination.auth is None:
                continue
            if destination.url.startswith("http://") and not is_loopback(urlsplit(destination.url).hostname or ""):
                raise ValueError(f"dispatch.destinations: {destination.name} would send its credentials over "
                                 "plain HTTP; use an https:// url")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env wins over the YAML file, which arrives as init kwargs
        return env_settings, init_settings

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).resolve()

    @property
    def rules_path(self) -> Path:
        return Path(self.router.rules_file).resolve()

    @property
    def models_dir(self) -> Path:
        return Path(self.inference.models_dir).resolve()


def is_placeholder(secret: SecretStr) -> bool:
    """Whether ``secret`` is empty or one of the well-known placeholders (``change-me``…)."""
    return secret.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only; ``0.0.0.0`` is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_path(path: Path | None = None) -> Path | None:
    """The configuration file :func:`load_settings` reads: ``path``, ``$PORTICO_CONFIG`` or ``./portico.yaml``."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is None and Path("portico.yaml").is_file():
        path = Path("portico.yaml")
    return path


def load_settings(path: Path | None = None) -> Settings:
    """Load ``path`` (or ``$PORTICO_CONFIG``, or ``./portico.yaml`` when present) plus environment.

    Relative paths inside the file are taken relative to the file's folder.
    """
    path = config_path(path)
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = _resolve_paths(loaded, path.resolve().parent)
    return Settings(**data)


#: path settings taken relative to the config file; ``*`` is every item of a list
PATH_SETTINGS: tuple[tuple[str, ...], ...] = (
    ("storage", "data_dir"),
    ("router", "rules_file"),
    ("inference", "models_dir"),
    ("router", "tls", "certificate"),
    ("router", "tls", "private_key"),
    ("router", "tls", "ca_bundle"),
    ("dispatch", "destinations", "*", "ca_bundle"),
    ("dispatch", "destinations", "*", "auth", "secret_file"),
    ("api", "tls", "certificate"),
    ("api", "tls", "private_key"),
    ("api", "tls", "client_ca"),
    ("audit", "syslog", "ca_bundle"),
    ("audit", "syslog", "certificate"),
    ("audit", "syslog", "private_key"),
)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the known path settings absolute relative to the config file's folder."""
    for keys in PATH_SETTINGS:
        _resolve_path(data, keys, base)
    return data


def _resolve_path(node: Any, keys: tuple[str, ...], base: Path) -> None:
    # anything not shaped as expected is left alone for validation to report
    if not keys:
        return
    key, rest = keys[0], keys[1:]
    if key == "*":
        for item in node if isinstance(node, list) else ():
            _resolve_path(item, rest, base)
        return
    if not isinstance(node, dict) or key not in node:
        return
    if rest:
        _resolve_path(node[key], rest, base)
    elif isinstance(node[key], str) and node[key] and not Path(node[key]).is_absolute():
        node[key] = str(base / node[key])
