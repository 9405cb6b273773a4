"""The model packages installed on this appliance, and which version of each may run.

Each package lives in its own folder under the models directory, several versions side by side.
Per version the appliance records (:mod:`appliance.model_state`):

- a **role**: ``active`` (the one version of a name that runs when a rule names no version) or
  ``candidate`` (installed, waiting; runs only where a rule pins its version);
- whether it is **enabled**: a disabled version never runs, pinned or not, active or not.

``add`` installs a new version as a candidate, except the first version of a name, which becomes
active; ``promote`` makes a version active (the previous one becomes a candidate). Adding never
changes which version runs. A name with no recorded state at all (a package copied in by hand, the
shipped demo model) runs its highest release version, so a fresh appliance works with no setup;
pre-releases (``1.0.1-fl.job``) and packages whose provenance says ``status: candidate`` (federated
exports) are never picked that way. The first state change for such a name records its installed
versions, that default active, the rest candidates.

Packages are verified (sha256 of every file, signature with the trusted keys) the first time the
process loads them, and again whenever their manifest changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.audit import AuditEvent, AuditRecord
from appliance.db.engine import Database
from appliance.model_state import ModelStates, Role, VersionState
from appliance.settings import Settings
from inference.errors import PackageError
from inference.packages import (
    MANIFEST_NAME,
    Manifest,
    ModelPackage,
    copy_package,
    load_package,
    read_manifest,
    sha256_file,
    version_key,
)
from inference.signing import SIGNATURE_NAME, verify_manifest

log = logging.getLogger(__name__)

AuditSink = Callable[[AuditRecord], None]


@dataclass(frozen=True)
class Installed:
    """A package folder whose manifest parses; not yet verified."""

    folder: Path
    manifest: Manifest
    #: sha256 of the manifest bytes, as :attr:`ModelPackage.package_hash`
    package_hash: str

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


@dataclass(frozen=True)
class VersionStatus:
    """One line of ``portico models list``."""

    name: str
    version: str
    role: Role
    enabled: bool
    #: ``False`` when no state was ever recorded for the name: ``role`` is what :meth:`get` would pick
    recorded: bool
    #: ``None`` when recorded but no longer installed
    installed: Installed | None


@dataclass(frozen=True)
class Signature:
    """Where a package's signature stands, from its manifest and signature alone (no file is hashed).

    ``state``: ``verified`` (by a trusted key, ``signed_by`` its fingerprint), ``invalid`` (it does not
    verify: the package is refused), ``unchecked`` (signed, but no trusted keys are configured), or
    ``unsigned`` (refused when signatures are required). The signature covers the manifest, which lists
    every file's sha256: those are checked whenever the package is loaded to run.
    """

    state: str
    signed_by: str | None
    detail: str


@dataclass(frozen=True)
class ModelCard:
    """A package's model card as text (Markdown, never rendered as HTML here)."""

    file: str
    text: str
    #: the file matches the sha256 the manifest lists for it
    intact: bool
    #: only the first :data:`MAX_CARD_BYTES` are given
    truncated: bool


#: the most of a model card that is read
MAX_CARD_BYTES = 256 * 1024


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION]`` → ``(name, version or None)``."""
    name, _, version = ref.partition("@")
    if not name or (_ and not version):
        raise ValueError(f"not NAME or NAME@VERSION: {ref!r}")
    return name, version or None


class ModelRegistry:
    """Installed packages under ``models_dir`` (one folder each) and their recorded states.

    Parameters
    ----------
    models_dir
        Folder holding one sub-folder per installed package.
    states
        Recorded roles and enabled flags; ``None``: nothing recorded, every name runs its highest
        version and the state-changing methods refuse.
    trusted_keys, require_signature
        Passed to :func:`inference.packages.load_package` for every verification.
    audit
        Where install, promote, enable/disable and refusals are recorded.
    """

    def __init__(self, models_dir: Path, states: ModelStates | None = None, *,
                 trusted_keys: Sequence[str] = (), require_signature: bool = False,
                 audit: AuditSink | None = None) -> None:
        self.models_dir = models_dir
        self.states = states
        self.trusted_keys = tuple(trusted_keys)
        self.require_signature = require_signature
        self._audit = audit
        self._verified: dict[Path, ModelPackage] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, audit: AuditSink | None = None,
                      database: Database | None = None) -> ModelRegistry:
        """The registry the appliance runs with: its models folder, database and signature policy.

        ``database``: the store's open database (one connection, migrated once); else it is opened here.
        """
        states = ModelStates(database) if database is not None else \
            ModelStates.in_data_dir(settings.data_dir, settings.storage.database)
        return cls(settings.models_dir, states,
                   trusted_keys=settings.inference.trusted_keys,
                   require_signature=settings.inference.require_signatures, audit=audit)

    # ---- what is installed -------------------------------------------------------------------

    def folders(self) -> list[Path]:
        """Package folders (holding a manifest), skipping hidden ones such as unfinished installs."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p.parent for p in self.models_dir.glob(f"*/{MANIFEST_NAME}")
                      if not p.parent.name.startswith("."))

    def scan(self) -> tuple[list[Installed], list[tuple[Path, PackageError]]]:
        """Installed packages whose manifest parses, and the folders whose manifest does not."""
        found: list[Installed] = []
        broken: list[tuple[Path, PackageError]] = []
        for folder in self.folders():
            try:
                manifest, raw = read_manifest(folder)
            except PackageError as exc:
                broken.append((folder, exc))
                continue
            found.append(Installed(folder, manifest, hashlib.sha256(raw).hexdigest()))
        return found, broken

    def installed(self, name: str | None = None) -> list[Installed]:
        """Installed versions (of ``name``), lowest version first."""
        found = [i for i in self.scan()[0] if name is None or i.manifest.name == name]
        return sorted(found, key=lambda i: (i.manifest.name, version_key(i.manifest.version)))

    def find(self, name: str, version: str) -> Installed:
        """The folder holding ``name@version``.

        Raises
        ------
        PackageError
            When it is not installed, or installed twice.
        """
        matches = [i for i in self.installed(name) if i.manifest.version == version]
        if not matches:
            raise PackageError(f"model package {name}@{version} is not installed")
        if len(matches) > 1:
            raise PackageError(f"{name}@{version} is installed twice: "
                               f"{', '.join(str(i.folder) for i in matches)}")
        return matches[0]

    def load(self, folder: Path) -> ModelPackage:
        """Fully verify the package in ``folder`` with this registry's signature policy (uncached)."""
        return load_package(folder, self.trusted_keys, self.require_signature)

    def signature(self, installed: Installed) -> Signature:
        """Whether ``installed``'s signature verifies with the trusted keys (cheap: the manifest's bytes only)."""
        path = installed.folder / SIGNATURE_NAME
        if not path.is_file() or path.is_symlink():
            required = " and signatures are required: it will not run" if self.require_signature else ""
            return Signature("unsigned", None, f"no {SIGNATURE_NAME}{required}")
        if not self.trusted_keys:
            return Signature("unchecked", None, "signed, but no trusted keys are configured to check it")
        try:
            signed_by = verify_manifest((installed.folder / MANIFEST_NAME).read_bytes(), path.read_bytes(),
                                        self.trusted_keys)
        except (PackageError, OSError, ValueError) as exc:
            return Signature("invalid", None, str(exc))
        return Signature("verified", signed_by, "signed by a trusted key")

    def model_card(self, installed: Installed) -> ModelCard:
        """The first :data:`MAX_CARD_BYTES` of the package's model card, and whether it is the file signed for.

        Raises
        ------
        PackageError
            When the card cannot be read.
        """
        name = installed.manifest.model_card
        path = installed.folder / name
        if path.is_symlink() or not path.is_file():
            raise PackageError(f"{installed.ref}: its model card {name} is missing")
        try:
            with path.open("rb") as f:
                data = f.read(MAX_CARD_BYTES + 1)
            intact = sha256_file(path) == installed.manifest.files.get(name)
        except OSError as exc:
            raise PackageError(f"{installed.ref}: cannot read its model card ({exc.strerror})") from exc
        return ModelCard(name, data[:MAX_CARD_BYTES].decode("utf-8", errors="replace"), intact,
                         len(data) > MAX_CARD_BYTES)

    # ---- what runs ---------------------------------------------------------------------------

    def resolve(self, name: str, version: str | None = None) -> str:
        """The version of ``name`` that runs for a request pinning ``version`` (or none).

        Raises
        ------
        PackageError
            When nothing is installed, no version is active, or the version is disabled.
        """
        states = self.states.versions(name) if self.states is not None else []
        if version is None:
            if states:
                active = [s for s in states if s.role is Role.ACTIVE]
                if not active:
                    raise PackageError(f"model {name} has no active version "
                                       f"(promote one: portico models promote {name}@VERSION)")
                version = active[0].version
            else:
                installed = self.installed(name)
                if not installed:
                    raise PackageError(f"no model package {name} installed")
                default = _default(installed)
                if default is None:
                    raise PackageError(f"model {name} has only candidate or pre-release versions installed "
                                       f"(promote one: portico models promote {name}@VERSION)")
                version = default.manifest.version
        state = next((s for s in states if s.version == version), None)
        if state is not None and not state.enabled:
            raise PackageError(f"model {name}@{version} is disabled "
                               f"(portico models enable {name}@{version})")
        return version

    def get(self, name: str, version: str | None = None) -> ModelPackage:
        """The verified package that runs for ``name`` (the active version when ``version`` is None).

        Raises
        ------
        PackageError
            When it is not installed, not active, disabled, or fails verification.
        """
        version = self.resolve(name, version)
        found = self.find(name, version)
        with self._lock:
            cached = self._verified.get(found.folder)
            if cached is not None and cached.package_hash == found.package_hash:
                return cached
            try:
                package = self.load(found.folder)
            except PackageError as exc:
                self._record(AuditEvent.MODEL_REFUSED, name, version, "system", reason=str(exc))
                raise
            self._verified[found.folder] = package
            return package

    def statuses(self) -> list[VersionStatus]:
        """Every installed or recorded version with its effective role, by name then version."""
        installed = self.installed()
        recorded = self.states.versions() if self.states is not None else []
        by_ref = {(s.name, s.version): s for s in recorded}
        names_recorded = {s.name for s in recorded}
        out: list[VersionStatus] = []
        names = {i.manifest.name for i in installed}
        default = {n: _default([i for i in installed if i.manifest.name == n]) for n in names}
        for i in installed:
            m = i.manifest
            state = by_ref.pop((m.name, m.version), None)
            if state is not None:
                out.append(VersionStatus(m.name, m.version, state.role, state.enabled, True, i))
            elif m.name in names_recorded:
                out.append(VersionStatus(m.name, m.version, Role.CANDIDATE, True, False, i))
            else:
                role = Role.ACTIVE if i is default[m.name] else Role.CANDIDATE
                out.append(VersionStatus(m.name, m.version, role, True, False, i))
        out += [VersionStatus(s.name, s.version, s.role, s.enabled, True, None) for s in by_ref.values()]
        return sorted(out, key=lambda v: (v.name, version_key(v.version)))

    # ---- changing what runs ------------------------------------------------------------------

    def _states(self) -> ModelStates:
        if self.states is None:
            raise ValueError("this registry records no state (no ModelStates given)")
        return self.states

    def _record(self, event: AuditEvent, name: str, version: str, actor: str, **detail: object) -> None:
        if self._audit is not None:
            self._audit(AuditRecord(event, actor=actor, detail={"model": name, "version": version, **detail}))

    def adopt(self, name: str, actor: str) -> list[VersionState]:
        """Record installed versions of ``name`` that have no state yet; returns the new records.

        When ``name`` had no state at all, the version that ran by default becomes active, so what
        runs does not change.
        """
        states = self._states()
        recorded = states.versions(name)
        installed = self.installed(name)
        default = None if recorded else _default(installed)
        known = {s.version for s in recorded}
        new = []
        for i in installed:
            if i.manifest.version in known:
                continue
            role = Role.ACTIVE if i is default else Role.CANDIDATE
            new.append(states.add(name, i.manifest.version, i.package_hash, i.folder.name, role))
            self._record(AuditEvent.MODEL_ADDED, name, i.manifest.version, actor, how="adopted",
                         role=str(role), package_hash=i.package_hash, folder=i.folder.name)
        return new

    def install(self, package: ModelPackage, actor: str, source: str = "") -> tuple[VersionState, bool]:
        """Copy a verified package into ``models_dir/<name>-<version>/`` and record it.

        The first version of a name becomes active; later ones are candidates.

        Returns
        -------
        tuple
            The recorded state, and ``False`` when exactly this package was already installed.

        Raises
        ------
        PackageError
            When a different package is installed as the same ``name@version``, or the copy fails
            verification.
        """
        states = self._states()
        m = package.manifest
        self.adopt(m.name, actor)
        same = [i for i in self.installed(m.name) if i.manifest.version == m.version]
        if same:
            state = states.get(m.name, m.version)
            if state is not None and all(i.package_hash == package.package_hash for i in same):
                return state, False
            raise PackageError(f"a different package is already installed as {package.ref} in "
                               f"{same[0].folder}; versions are immutable: give this one a new version")
        recorded = states.get(m.name, m.version)
        if recorded is not None and recorded.package_hash != package.package_hash:
            raise PackageError(f"{package.ref} was installed before as a different package "
                               f"(sha256 {recorded.package_hash[:12]}); versions are immutable")
        target = self.models_dir / f"{m.name}-{m.version}"
        if target.exists():
            raise PackageError(f"{target} already exists and is not {package.ref}")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        staging = self.models_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            copy_package(package, staging)
            copied = self.load(staging)
            if copied.package_hash != package.package_hash:
                raise PackageError(f"{package.root} changed while it was being installed")
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        if recorded is not None:  # its folder had been removed; the recorded state stands
            self._record(AuditEvent.MODEL_ADDED, m.name, m.version, actor, how="reinstalled",
                         role=str(recorded.role), package_hash=package.package_hash, source=source,
                         folder=target.name)
            return recorded, True
        role = Role.CANDIDATE if states.versions(m.name) else Role.ACTIVE
        state = states.add(m.name, m.version, package.package_hash, target.name, role)
        self._record(AuditEvent.MODEL_ADDED, m.name, m.version, actor, how="installed", role=str(role),
                     package_hash=package.package_hash, signed_by=package.signed_by, source=source,
                     folder=target.name)
        log.info("installed %s as %s in %s", package.ref, role, target)
        return state, True

    def promote(self, name: str, version: str, actor: str) -> str | None:
        """Make ``name@version`` active after verifying it; returns the version it displaced.

        Raises
        ------
        PackageError
            When it is not installed, is disabled, or fails verification.
        """
        states = self._states()
        self.adopt(name, actor)
        package = self._verified_or_refused(name, version, actor)
        try:
            previous = states.promote(name, version)
        except ValueError as exc:
            raise PackageError(str(exc)) from exc
        self._record(AuditEvent.MODEL_PROMOTED, name, version, actor, previous=previous,
                     package_hash=package.package_hash)
        return previous

    def set_enabled(self, name: str, version: str, enabled: bool, actor: str) -> bool:
        """Allow or forbid ``name@version`` to run; returns whether it was enabled before.

        Raises
        ------
        PackageError
            When it is not installed (disabling a recorded but removed version is allowed).
        """
        states = self._states()
        self.adopt(name, actor)
        if states.get(name, version) is None:
            raise PackageError(f"model package {name}@{version} is not installed")
        if enabled:
            self._verified_or_refused(name, version, actor)
        before = states.set_enabled(name, version, enabled)
        self._record(AuditEvent.MODEL_ENABLED if enabled else AuditEvent.MODEL_DISABLED, name, version,
                     actor, was_enabled=before)
        return before

    def _verified_or_refused(self, name: str, version: str, actor: str) -> ModelPackage:
        try:
            return self.load(self.find(name, version).folder)
        except PackageError as exc:
            self._record(AuditEvent.MODEL_REFUSED, name, version, actor, reason=str(exc))
            raise


def _default(installed: list[Installed]) -> Installed | None:
    """The version that runs for a name with no recorded state; ``installed`` is sorted lowest first."""
    eligible = [i for i in installed if version_key(i.manifest.version)[3] == 1  # a release
                and i.manifest.provenance.get("status") != "candidate"]
    return eligible[-1] if eligible else None
