"""Enrolment: check an NVFlare client startup kit and install it in the appliance's data folder.

Two ways in:

- a kit provisioned centrally by the project admin (``nvflare provision``), as a zip or a folder;
- distributed provisioning (``nvflare cert``): the appliance makes its own private key and a
  certificate request (:func:`make_request`), the project admin approves it, and the signed zip that
  comes back is packaged here (:func:`package_signed`) after checking the root CA's fingerprint,
  which travels out of band. The private key never leaves the appliance.

A kit is trusted only if its client certificate is signed by the kit's root CA, is valid now, names
the site, and matches the private key. The installed ``startup/`` is read-only; Portico manages
``local/`` (see :mod:`fl_client.policy`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from fl_client.errors import KitError
from fl_client.layout import SiteLayout, read_json, write_json

log = logging.getLogger(__name__)

CLIENT_CONFIG = "fed_client.json"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$"
#: what NVFlare's provisioning puts in a client kit's ``local/``: accepted, and not installed (Portico
#: writes its own policy files there; nothing from a kit's ``local/`` is ever loaded)
KIT_LOCAL_KNOWN = frozenset({"authorization.json.default", "resources.json.default", "privacy.json.sample",
                             "log_config.json.default"})
#: code-bearing files refused anywhere in a kit (NVFlare imports ``local/custom`` in every process)
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyd", ".so", ".pth", ".egg", ".whl", ".zip"})
FINGERPRINT_WAIVER_FLAG = "--i-checked-the-server-fingerprint-otherwise"


@dataclass(frozen=True)
class KitInfo:
    """What a valid client kit says about the federation and this site."""

    site: str
    org: str
    project: str
    server_target: str
    scheme: str
    connection_security: str
    root_ca_fingerprint: str
    certificate_not_after: str
    mode: str = "kit"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(cert: x509.Certificate) -> str:
    """``SHA256:AA:BB:…``, the form ``nvflare package --fingerprint`` expects."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return "SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _extract(zip_path: Path, dest: Path) -> None:
    """Unzip refusing absolute names, ``..`` and links."""
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            name = Path(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise KitError(f"{zip_path.name}: member {info.filename!r} leaves the archive")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise KitError(f"{zip_path.name}: member {info.filename!r} is a symbolic link")
        zf.extractall(dest)


def find_kit_root(folder: Path) -> Path:
    """The folder holding ``startup/fed_client.json``: ``folder`` itself or one below it."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []
    for candidate in candidates:
        if (candidate / "startup" / CLIENT_CONFIG).is_file():
            return candidate
    raise KitError(f"{folder}: no startup/{CLIENT_CONFIG} (not an NVFlare client startup kit)")


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KitError(f"{path.name}: not a PEM certificate") from exc


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    if cert.issuer != issuer.subject:
        raise KitError("the client certificate was not issued by the kit's root CA")
    key = issuer.public_key()
    hash_alg = cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and hash_alg is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        else:
            raise KitError("unsupported root CA key type")
    except KitError:
        raise
    except Exception as exc:  # cryptography raises InvalidSignature
        raise KitError("the client certificate's signature does not verify against the root CA") from exc


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def validate_kit(kit: Path, *, require_key: bool = True) -> KitInfo:
    """Check a client kit folder (see the module docstring) and say what it is.

    Raises
    ------
    KitError
        Naming the first problem found.
    """
    startup = kit / "startup"
    try:
        config = json.loads((startup / CLIENT_CONFIG).read_text(encoding="utf-8"))
        client = config["client"]
        server = config["servers"][0]
        site = str(client["fqsn"])
        target = str(server["service"]["target"])
        scheme = str(server["service"].get("scheme", "grpc"))
        project = str(server.get("name", ""))
        security = str(client.get("connection_security", "mtls"))
        cert_name = str(client.get("ssl_cert", "client.crt"))
        key_name = str(client.get("ssl_private_key", "client.key"))
        root_name = str(client.get("ssl_root_cert", "rootCA.pem"))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise KitError(f"startup/{CLIENT_CONFIG} is unreadable or incomplete: {exc}") from exc
    if not re.match(NAME_RE, site):
        raise KitError(f"site name {site!r} is not a valid participant name")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KitError(f"server address {target!r} is not host:port")
    for name in (cert_name, root_name) + ((key_name,) if require_key else ()):
        if not (startup / name).is_file():
            raise KitError(f"startup/{name} is missing")
    cert = _load_cert(startup / cert_name)
    root = _load_cert(startup / root_name)
    _verify_signed_by(cert, root)
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KitError(f"the client certificate is not valid now (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    common_name = _attr(cert.subject, NameOID.COMMON_NAME)
    if common_name != site:
        raise KitError(f"the client certificate names {common_name!r}, the kit names site {site!r}")
    if require_key:
        try:
            key = serialization.load_pem_private_key((startup / key_name).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KitError(f"startup/{key_name} is not an unencrypted PEM private key") from exc
        if key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo) != \
                cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo):
            raise KitError("the private key does not belong to the client certificate")
    return KitInfo(site=site, org=_attr(cert.subject, NameOID.ORGANIZATION_NAME) or "portico",
                   project=project, server_target=target, scheme=scheme, connection_security=security,
                   root_ca_fingerprint=fingerprint(root),
                   certificate_not_after=cert.not_valid_after_utc.isoformat())


def check_contents(kit: Path) -> None:
    """Refuse a kit that carries code or anything unknown in ``local/`` (it would run at this site).

    Raises
    ------
    KitError
        Naming the offending paths.
    """
    offending: list[str] = []
    for path in sorted(kit.rglob("*")):
        rel = path.relative_to(kit).as_posix()
        if path.is_dir() and path.name == "custom":
            offending.append(f"{rel}/ (custom code folder)")
        elif path.is_file() and path.suffix.lower() in CODE_SUFFIXES:
            offending.append(f"{rel} (code)")
    local = kit / "local"
    if local.is_dir():
        for path in sorted(local.iterdir()):
            rel = path.relative_to(kit).as_posix()
            if path.name not in KIT_LOCAL_KNOWN and not any(o.startswith(rel) for o in offending):
                offending.append(f"{rel} (not a file NVFlare's provisioning writes)")
    if offending:
        raise KitError("the kit carries files that would run or configure this site, refused: "
                       + "; ".join(offending[:10]) + ". Ask the project admin for a plain provisioned kit; "
                       "Portico writes local/ itself")
    config = read_json(kit / "startup" / CLIENT_CONFIG, {}) or {}
    if isinstance(config, dict) and config.get("require_signed_jobs") is False:
        raise KitError("the kit turns off NVFlare's signed-job checking (require_signed_jobs: false), refused")


def _verify_signature_json(kit: Path, python: str) -> None:
    """Centrally provisioned kits carry ``signature.json``; check it with NVFlare's own tool."""
    if not (kit / "startup" / "signature.json").is_file():
        return
    proc = subprocess.run(
        [python, "-m", "nvflare.tool.verify_startup_kits", "-f", str(kit), "-c",
         str(kit / "startup" / "rootCA.pem")], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise KitError(f"the kit's signatures do not verify (edited after provisioning?): "
                       f"{(proc.stdout + proc.stderr).strip()[-300:]}")


def same_fingerprint(a: str, b: str) -> bool:
    return a.replace(":", "").replace(" ", "").upper() == b.replace(":", "").replace(" ", "").upper()


def install_kit(source: Path, layout: SiteLayout, *, python: str | None = None, mode: str = "kit",
                expected_fingerprint: str | None = None, fingerprint_waived: bool = False) -> KitInfo:
    """Validate ``source`` (zip or folder) and install it as ``layout.site``, replacing any earlier kit.

    The kit's root CA must match ``expected_fingerprint`` (received out of band) unless the
    administrator waived that check (``fingerprint_waived``; the caller audits it). Only ``startup/`` is
    installed; ``local/`` starts empty and Portico's policy files are written afterwards by
    :func:`fl_client.policy.write_policy`.
    """
    layout.ensure()
    python = python or sys.executable
    with tempfile.TemporaryDirectory(dir=layout.root, prefix=".enrol-") as tmp:
        staging = Path(tmp) / "unpacked"
        if source.is_file() and zipfile.is_zipfile(source):
            staging.mkdir()
            _extract(source, staging)
        elif source.is_dir():
            shutil.copytree(source, staging, symlinks=False)
        else:
            raise KitError(f"{source}: neither a zip file nor a folder")
        kit = find_kit_root(staging)
        check_contents(kit)
        info = validate_kit(kit)
        if expected_fingerprint is not None:
            if not same_fingerprint(info.root_ca_fingerprint, expected_fingerprint):
                raise KitError(f"the kit's root CA is {info.root_ca_fingerprint}, not the fingerprint given: "
                               "this is not the project's server")
        elif not fingerprint_waived:
            raise KitError("give the project's root CA fingerprint, received out of band (--fingerprint SHA256:…), "
                           f"or {FINGERPRINT_WAIVER_FLAG} (audited)")
        _verify_signature_json(kit, python)
        info = KitInfo(**{**info.to_json(), "mode": mode})
        target = Path(tmp) / "site"
        target.mkdir()
        shutil.copytree(kit / "startup", target / "startup")
        (target / "local").mkdir()  # nothing from the kit's local/: Portico writes its own policy there
        (target / "transfer").mkdir()
        # read-only and owner-only, like everything in the appliance's data folder
        for path in (target / "startup").iterdir():
            path.chmod(0o500 if path.suffix == ".sh" else 0o400)
        (target / "startup").chmod(0o500)
        old = layout.root / ".site-old"
        if layout.site.exists():
            _make_writable(layout.site)
            layout.site.rename(old)
        target.rename(layout.site)
        if old.exists():
            shutil.rmtree(old)
    layout.site.chmod(0o700)
    write_json(layout.enrolment_file, {**info.to_json(),
                                       "enrolled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    log.info("enrolled as site %s of project %s (server %s)", info.site, info.project, info.server_target)
    return info


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o700 if path.is_dir() else path.stat().st_mode | 0o600)


def enrolment(layout: SiteLayout) -> KitInfo | None:
    """The installed kit's description, or None when not enrolled."""
    data = read_json(layout.enrolment_file)
    if not isinstance(data, dict) or not (layout.site / "startup" / CLIENT_CONFIG).is_file():
        return None
    fields = set(KitInfo.__dataclass_fields__)
    return KitInfo(**{k: v for k, v in data.items() if k in fields})


def _run_nvflare(python: str, args: list[str], layout: SiteLayout, cwd: Path) -> str:
    from fl_client.supervisor import nvflare_env  # the same HOME/TMPDIR redirection as the client

    proc = subprocess.run([python, "-m", "nvflare.cli", *args], cwd=cwd, env=nvflare_env(layout),
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise KitError(f"nvflare {args[0]} {args[1] if len(args) > 1 else ''} failed: "
                       f"{(proc.stdout + proc.stderr).strip()[-500:]}")
    return proc.stdout


def make_request(layout: SiteLayout, *, project: str, site: str, org: str, python: str | None = None) -> Path:
    """Distributed provisioning, step 1: a private key and CSR kept here; returns the request zip to send."""
    for what, value in (("project", project), ("site", site), ("org", org)):
        if not re.match(NAME_RE, value):
            raise KitError(f"{what} name {value!r} is not valid")
    layout.ensure()
    layout.request.mkdir(parents=True, exist_ok=True)
    layout.request.chmod(0o700)
    participant = layout.request / "participant.yaml"
    participant.write_text(yaml.safe_dump({"name": project, "participants": [
        {"name": site, "org": org, "type": "client"}]}, sort_keys=False))
    _run_nvflare(python or sys.executable, ["cert", "request", "-p", str(participant), "--out",
                                            str(layout.request / site), "--force"], layout, layout.request)
    request_zip = layout.request / site / f"{site}.request.zip"
    if not request_zip.is_file():
        raise KitError(f"nvflare cert request wrote no {request_zip.name}")
    log.info("certificate request for site %s ready; the private key stays in %s", site, layout.request)
    return request_zip


def is_signed_zip(path: Path) -> bool:
    """A signed zip of distributed provisioning (no ``startup/fed_client.json`` in it), not a kit."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as zf:
        return not any(n.endswith(f"startup/{CLIENT_CONFIG}") for n in zf.namelist())


def package_signed(signed_zip: Path, layout: SiteLayout, *, expected_fingerprint: str,
                   python: str | None = None) -> KitInfo:
    """Distributed provisioning, step 2: the approved signed zip + our private key → installed kit."""
    requests = sorted(p for p in layout.request.glob("*") if p.is_dir()) if layout.request.is_dir() else []
    if not requests:
        raise KitError("no certificate request was made on this appliance (portico fl request first)")
    if not expected_fingerprint.upper().startswith("SHA256:"):
        raise KitError("the root CA fingerprint must look like SHA256:AA:BB:… (from the project admin)")
    request_dir = requests[-1]
    with tempfile.TemporaryDirectory(dir=layout.root, prefix=".package-") as tmp:
        _run_nvflare(python or sys.executable,
                     ["package", str(signed_zip.resolve()), "--request-dir", str(request_dir), "--fingerprint",
                      expected_fingerprint, "-w", tmp], layout, Path(tmp))
        kits = [p.parent.parent for p in Path(tmp).rglob(f"startup/{CLIENT_CONFIG}")]
        if len(kits) != 1:
            raise KitError(f"nvflare package produced {len(kits)} client kits, expected one")
        info = install_kit(kits[0], layout, python=python, mode="csr", expected_fingerprint=expected_fingerprint)
    return info
