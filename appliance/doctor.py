"""``portico doctor``'s checks: is this site set up to run, and if not, what to fix.

Each check reads the settings (and the machine) and returns :class:`Finding` s: ``ok``, ``warn`` (it runs,
but look at this) or ``fail`` (it will not run, or not for long). Nothing here changes anything: ports
are bound and released at once, the database is not opened, no file is written.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.file_modes import secret_file_problems
from appliance.health import MIB, disk_check
from appliance.models import ModelRegistry
from appliance.settings import Mode, Settings
from dicom_router.settings import DicomTlsSettings, DimseDestination, Peer, StowDestination, TlsMode
from inference.errors import PackageError

#: a certificate expiring sooner than this is a warning
EXPIRY_WARNING_DAYS = 30

#: ``(destination, calling AE title, timeout, router.tls, event_driven)`` → answered with success
Echo = Callable[[DimseDestination, str, float, DicomTlsSettings | None, bool], bool]


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One thing checked: its area, how it stands, what was found and (unless ok) what to do."""

    check: str
    status: Status
    message: str
    fix: str = ""


def _ok(check: str, message: str) -> Finding:
    return Finding(check, Status.OK, message)


# ---- ports ---------------------------------------------------------------------------------------

def listen_addresses(settings: Settings) -> list[tuple[str, str, int]]:
    """``(what, host, port)`` of every socket ``portico serve`` will listen on."""
    router = settings.router
    found: list[tuple[str, str, int]] = []
    if router.tls is None or router.tls.plain:
        found.append(("DICOM listener (router.port)", router.bind_host, router.port))
    if router.tls is not None:
        found.append(("DICOM TLS listener (router.tls.port)", router.bind_host, router.tls.port))
    if settings.api.enabled:
        found.append(("API (api.port)", settings.api.host, settings.api.port))
    return found


def check_ports(settings: Settings) -> list[Finding]:
    """Every listening address can be bound now (nothing else holds it, and we may bind it)."""
    findings: list[Finding] = []
    seen: dict[int, str] = {}
    for what, host, port in listen_addresses(settings):
        if port in seen:
            findings.append(Finding("ports", Status.FAIL, f"{what}: port {port} is also the {seen[port]}",
                                    "give each listener its own port"))
            continue
        seen[port] = what
        findings.append(_bind(what, host, port))
    return findings


def _bind(what: str, host: str, port: int) -> Finding:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except socket.gaierror:
        return Finding("ports", Status.FAIL, f"{what}: {host} is not a name or address this machine knows",
                       "set the host to an address of this machine (or 0.0.0.0)")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return Finding("ports", Status.FAIL, f"{what}: {host}:{port} is in use",
                           f"stop what holds it (ss -ltnp 'sport = :{port}'; a portico serve already running?) "
                           "or choose another port")
        if exc.errno == errno.EACCES:
            return Finding("ports", Status.FAIL, f"{what}: not allowed to bind {host}:{port}",
                           "ports below 1024 need CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=) "
                           "or choose a port of 1024 or more")
        if exc.errno == errno.EADDRNOTAVAIL:
            return Finding("ports", Status.FAIL, f"{what}: {host} is not an address of this machine",
                           "set the host to one of this machine's addresses (or 0.0.0.0)")
        return Finding("ports", Status.FAIL, f"{what}: cannot bind {host}:{port} ({exc.strerror})",
                       "check the host and port")
    return _ok("ports", f"{what}: {host}:{port} can be bound")


# ---- certificates --------------------------------------------------------------------------------

def tls_files(settings: Settings) -> list[tuple[str, Path, Path | None]]:
    """``(setting, certificate, its private key or None)`` for every certificate or CA file configured."""
    found: list[tuple[str, Path, Path | None]] = []
    tls = settings.router.tls
    if tls is not None:
        found.append(("router.tls.certificate", Path(tls.certificate), Path(tls.private_key)))
        if tls.ca_bundle:
            found.append(("router.tls.ca_bundle", Path(tls.ca_bundle), None))
    api = settings.api.tls
    if settings.api.enabled and api is not None:
        found.append(("api.tls.certificate", Path(api.certificate), Path(api.private_key)))
        if api.client_ca:
            found.append(("api.tls.client_ca", Path(api.client_ca), None))
    syslog = settings.audit.syslog
    if syslog is not None:
        if syslog.certificate and syslog.private_key:
            found.append(("audit.syslog.certificate", Path(syslog.certificate), Path(syslog.private_key)))
        if syslog.ca_bundle:
            found.append(("audit.syslog.ca_bundle", Path(syslog.ca_bundle), None))
    for destination in settings.dispatch.destinations:
        if destination.ca_bundle:
            found.append((f"dispatch.destinations[{destination.name}].ca_bundle", Path(destination.ca_bundle), None))
    return found


def check_certificates(settings: Settings, now: dt.datetime | None = None,
                       warn_days: int = EXPIRY_WARNING_DAYS) -> list[Finding]:
    """Each certificate is present, readable PEM, valid now, not expiring soon, and matches its key."""
    now = now or dt.datetime.now(dt.UTC)
    return [finding for what, cert, key in tls_files(settings) for finding in _certificate(what, cert, key, now,
                                                                                            warn_days)]


def _certificate(what: str, path: Path, key_path: Path | None, now: dt.datetime, warn_days: int) -> list[Finding]:
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return [Finding("tls", Status.FAIL, f"{what} {path}: cannot read it ({exc.strerror})",
                        "put the PEM file there, readable by the appliance's user")]
    except ValueError:
        return [Finding("tls", Status.FAIL, f"{what} {path}: not a PEM certificate",
                        "convert it to PEM (openssl x509 -inform der -in FILE -out FILE.pem)")]
    # a server certificate's file starts with its own certificate; a CA bundle: every one counts
    findings = [_validity(what, path, c, now, warn_days) for c in (certificates[:1] if key_path else certificates)]
    if key_path is not None:
        findings.append(_key_matches(what, certificates[0], key_path))
    return findings


def _validity(what: str, path: Path, cert: x509.Certificate, now: dt.datetime, warn_days: int) -> Finding:
    subject = cert.subject.rfc4514_string() or "(no subject)"
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now > after:
        return Finding("tls", Status.FAIL, f"{what} {path} ({subject}) expired on {after:%Y-%m-%d}",
                       "issue a new certificate and restart portico serve")
    if now < before:
        return Finding("tls", Status.FAIL, f"{what} {path} ({subject}) is not valid before {before:%Y-%m-%d}",
                       "check this machine's clock, or the certificate's dates")
    days = (after - now).days
    if days < warn_days:
        return Finding("tls", Status.WARN, f"{what} {path} ({subject}) expires in {days} day(s), on {after:%Y-%m-%d}",
                       "renew it before then")
    return _ok("tls", f"{what} {path} ({subject}) valid until {after:%Y-%m-%d}")


def _key_matches(what: str, cert: x509.Certificate, key_path: Path) -> Finding:
    key_setting = what.rsplit(".", 1)[0] + ".private_key"
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        return Finding("tls", Status.FAIL, f"{key_setting} {key_path}: cannot read it ({exc.strerror})",
                       "put the key there, readable by the appliance's user only (chmod 600)")
    except (ValueError, TypeError):  # TypeError: encrypted
        return Finding("tls", Status.FAIL, f"{key_setting} {key_path}: not an unencrypted PEM private key",
                       "store the key unencrypted (openssl pkey -in KEY -out KEY.pem), readable by the "
                       "appliance's user only")
    ours = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        return Finding("tls", Status.FAIL, f"{key_setting} {key_path} is not the key of {what}",
                       "point the setting at the certificate's own key (or the key's certificate)")
    return _ok("tls", f"{key_setting} {key_path} matches its certificate")


# ---- peers and destinations ----------------------------------------------------------------------

def peer_endpoint(peer: Peer) -> DimseDestination:
    """A peer's query (C-FIND) service as a destination to C-ECHO."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"peer-{peer.ae_title.strip()}")[:64]
    if peer.query_port is None:
        raise ValueError(f"peer {peer.ae_title} has no query_port")
    return DimseDestination(name=name, ae_title=peer.query_ae_title or peer.ae_title,
                            host=peer.query_host or peer.hosts[0], port=peer.query_port, tls=peer.tls)


def check_peers(settings: Settings, echo: Echo, timeout: float = 5.0) -> list[Finding]:
    """Each DIMSE destination and each peer we query answers C-ECHO; each STOW-RS server accepts TCP."""
    router = settings.router
    findings: list[Finding] = []
    targets: list[tuple[str, DimseDestination]] = [
        (f"destination {d.name}", d) for d in settings.dispatch.destinations if isinstance(d, DimseDestination)]
    targets += [(f"peer {p.ae_title} (C-FIND)", peer_endpoint(p)) for p in router.peers if p.query_port is not None]
    for what, target in targets:
        calling = target.calling_ae_title or router.ae_title
        where = f"{target.ae_title}@{target.host}:{target.port}{' over TLS' if target.tls is TlsMode.REQUIRED else ''}"
        if echo(target, calling, timeout, router.tls, router.event_driven):
            findings.append(_ok("peers", f"{what} ({where}) answers C-ECHO"))
        else:
            findings.append(Finding("peers", Status.FAIL, f"{what} ({where}) does not answer C-ECHO",
                                    f"check that it runs and knows us as {calling} from this machine's address "
                                    "(its allow-list), and the host, port, AE title and TLS settings; "
                                    "the log above names the reason"))
    for destination in settings.dispatch.destinations:
        if isinstance(destination, StowDestination):
            findings.append(stow_reachable(destination, timeout))
    return findings


def stow_reachable(destination: StowDestination, timeout: float) -> Finding:
    """Whether a STOW-RS destination's server accepts a TCP connection (no request is sent)."""
    parts = urlsplit(destination.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    what = f"destination {destination.name} (STOW-RS {host}:{port})"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return Finding("peers", Status.FAIL, f"{what} cannot be reached ({exc.strerror or type(exc).__name__})",
                       "check that the server runs, the url, and any firewall between")
    return _ok("peers", f"{what} accepts connections")


# ---- disk and permissions ------------------------------------------------------------------------

def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_disk(settings: Settings) -> list[Finding]:
    """The data folder's file system has more than ``storage.min_free_mb`` free (a warning below twice that)."""
    watermark = settings.storage.min_free_mb * MIB
    folder = _existing(settings.data_dir)
    found = disk_check(folder, watermark)
    if not found.ok:
        return [Finding("disk", Status.FAIL, f"data folder {settings.data_dir}: {found.detail}",
                        "free space there (portico purge; storage.retention), or move storage.data_dir to a larger "
                        "disk; until then new instances are refused with 0xA700")]
    st = os.statvfs(folder)
    if watermark and st.f_bavail * st.f_frsize < 2 * watermark:
        return [Finding("disk", Status.WARN, f"data folder {settings.data_dir}: {found.detail}",
                        "less than twice the watermark: free space soon (portico purge; storage.retention)")]
    return [_ok("disk", f"data folder {settings.data_dir}: {found.detail}")]


def check_permissions(settings: Settings, config: Path | None) -> list[Finding]:
    """The data folder is ours, writable and owner-only; secret files are readable by us alone."""
    findings: list[Finding] = []
    data = settings.data_dir
    if not data.exists():
        parent = _existing(data)
        if os.access(parent, os.W_OK | os.X_OK):
            findings.append(_ok("permissions", f"data folder {data} does not exist yet; portico serve creates it"))
        else:
            findings.append(Finding("permissions", Status.FAIL, f"data folder {data} does not exist and {parent} "
                                    "is not writable by this user",
                                    f"create it for the appliance's user: install -d -m 700 -o USER {data}"))
    elif not data.is_dir():
        findings.append(Finding("permissions", Status.FAIL, f"data folder {data} is not a folder",
                                "point storage.data_dir at a folder"))
    else:
        findings.extend(_data_folder(data))
    for problem in secret_file_problems(settings, config):
        status = Status.FAIL if settings.mode is Mode.PRODUCTION else Status.WARN
        findings.append(Finding("permissions", status, f"{problem.what} {problem.path} can be read by group/others "
                                f"(mode {problem.mode:04o}); portico serve refuses to start in production",
                                f"chmod 600 {problem.path}"))
    models = settings.models_dir
    if models.exists() and not os.access(models, os.R_OK | os.X_OK):
        findings.append(Finding("permissions", Status.FAIL, f"models folder {models} is not readable by this user",
                                f"chmod u+rx {models} (or chown it to the appliance's user)"))
    return findings


def _data_folder(data: Path) -> list[Finding]:
    st = data.stat()
    if st.st_uid != os.geteuid():
        return [Finding("permissions", Status.FAIL, f"data folder {data} belongs to uid {st.st_uid}, not to this "
                        f"user (uid {os.geteuid()})",
                        f"run the appliance as its owner, or chown -R the appliance's user {data}")]
    if not os.access(data, os.R_OK | os.W_OK | os.X_OK):
        return [Finding("permissions", Status.FAIL, f"data folder {data} is not writable by its owner",
                        f"chmod u+rwx {data}")]
    found: list[Finding] = []
    database = data / "portico.sqlite3"
    if database.exists() and not os.access(database, os.R_OK | os.W_OK):
        found.append(Finding("permissions", Status.FAIL, f"database {database} is not writable by this user",
                             f"chmod u+rw {database}"))
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        found.append(Finding("permissions", Status.WARN, f"data folder {data} is open to others (mode {mode:04o})",
                             f"chmod -R o-rwx {data} (portico serve tightens it at start)"))
    else:
        found.append(_ok("permissions", f"data folder {data} is this user's and closed to others (mode {mode:04o})"))
    return found


# ---- models --------------------------------------------------------------------------------------

def check_models(settings: Settings) -> list[Finding]:
    """Every installed model package verifies (hashes, manifest, signature policy)."""
    registry = ModelRegistry(settings.models_dir, None, trusted_keys=settings.inference.trusted_keys,
                             require_signature=settings.inference.require_signatures)
    folders = registry.folders()
    if not folders:
        return [Finding("models", Status.WARN, f"no model package installed in {settings.models_dir}",
                        "install one: portico models add PATH")]
    findings: list[Finding] = []
    for folder in folders:
        try:
            package = registry.load(folder)
        except PackageError as exc:
            findings.append(Finding("models", Status.FAIL, f"{folder}: {exc}",
                                    "reinstall the package (portico models add PATH) or remove the folder"))
            continue
        findings.append(_ok("models", f"{package.ref} verifies ({len(package.manifest.files)} files)"))
    return findings


# ---- all of them ---------------------------------------------------------------------------------

def run_checks(settings: Settings, config: Path | None, echo: Echo, *, network: bool = True,
               timeout: float = 5.0) -> list[Finding]:
    """Every check, in the order a site fixes things: ports, certificates, disk, permissions, models, peers."""
    findings = [*check_ports(settings), *check_certificates(settings), *check_disk(settings),
                *check_permissions(settings, config), *check_models(settings)]
    if network:
        findings.extend(check_peers(settings, echo, timeout))
    return findings


def failed(findings: Iterable[Finding], *, strict: bool = False) -> bool:
    """Whether anything failed (with ``strict``, warned too)."""
    worst = {Status.FAIL, Status.WARN} if strict else {Status.FAIL}
    return any(f.status in worst for f in findings)
