"""``portico models list | add | verify | promote | enable | disable | import | keygen | sign``.

``add PATH`` verifies a package folder or ``.zip`` (``--bundle``: a MONAI bundle, converted first)
and installs it as ``<models_dir>/<name>-<version>/``: the first version of a name becomes active,
later ones candidates. ``promote NAME@VERSION`` makes a version the active one; ``disable`` stops a
version from running at all, ``enable`` allows it again. Every change is audited. See
:mod:`appliance.models` for the state model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from appliance.audit import AuditEvent, AuditRecord
from appliance.cli.common import cli_actor, parser, settings_from
from appliance.models import ModelRegistry, parse_ref
from appliance.settings import Settings
from appliance.store import Store
from inference.bundle import BundleOverrides, import_bundle, load_overrides
from inference.errors import PackageError
from inference.packages import ModelPackage, extract_zip, sign_package
from inference.signing import fingerprint, generate_keypair, public_key

ACTIONS = ("list", "add", "verify", "promote", "enable", "disable", "import", "keygen", "sign")


def _parser() -> argparse.ArgumentParser:
    p = parser("models", "Installed model packages: list, add, verify, promote, enable, disable.")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("target", nargs="?",
                   help="add/import: package or bundle folder or .zip; verify: NAME[@VERSION] or PATH "
                        "(default: every installed package); promote/enable/disable: NAME@VERSION; "
                        "keygen: output folder; sign: package folder")
    p.add_argument("out", nargs="?", type=Path, help="import: folder to write the package to")
    bundle = p.add_argument_group("MONAI bundles (add --bundle, import)")
    bundle.add_argument("--bundle", action="store_true", help="add: PATH is a MONAI bundle")
    bundle.add_argument("--overrides", type=Path, help="YAML of bundle overrides (inference.bundle)")
    bundle.add_argument("--segments", type=Path,
                        help="YAML list of segments (label, name, category, type, colour) with codes")
    bundle.add_argument("--name")
    bundle.add_argument("--model-version", dest="model_version")
    bundle.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"))
    bundle.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"))
    bundle.add_argument("--spacing", nargs=3, type=float, metavar=("Z", "Y", "X"))
    bundle.add_argument("--licence", type=Path, help="licence text when the bundle has none")
    p.add_argument("--key", type=Path, help="sign: ed25519 private key (PEM)")
    return p


def main(argv: Sequence[str]) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.action in ("keygen", "sign", "import"):
        return _offline(p, args)
    settings = settings_from(args)
    store = Store.from_settings(settings)
    try:
        registry = ModelRegistry.from_settings(settings, audit=store.record, database=store.db)
        actor = cli_actor()
        if args.action == "list":
            return _list(registry)
        if args.action == "verify":
            return _verify(registry, store, args.target, actor)
        if args.target is None:
            p.error(f"{args.action} needs a target")
        if args.action == "add":
            return _add(registry, store, settings, args, actor)
        return _change(registry, args.action, args.target, actor)
    finally:
        store.close()



def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _list(registry: ModelRegistry) -> int:
    rows = registry.statuses()
    _, broken = registry.scan()
    _out(f"{'NAME':<28} {'VERSION':<12} {'ROLE':<10} {'ENABLED':<8} {'MOD':<4} {'SHA256':<13} FOLDER")
    for v in rows:
        role = f"{v.role}{'' if v.recorded else '*'}"
        if v.installed is None:
            _out(f"{v.name:<28} {v.version:<12} {role:<10} {'yes' if v.enabled else 'no':<8} "
                 f"{'':<4} {'':<13} (not installed)")
            continue
        m = v.installed.manifest
        _out(f"{v.name:<28} {v.version:<12} {role:<10} {'yes' if v.enabled else 'no':<8} "
             f"{m.input.modality:<4} {v.installed.package_hash[:12]:<13} {v.installed.folder}")
    if any(not v.recorded for v in rows):
        _out("* no state recorded: the highest version of a name runs (candidate: only where pinned)")
    for folder, exc in broken:
        _out(f"INVALID {folder}: {exc}")
    return 1 if broken else 0


def _verify(registry: ModelRegistry, store: Store, target: str | None, actor: str) -> int:
    if target is not None and Path(target).exists():
        with tempfile.TemporaryDirectory(prefix="portico-verify-") as tmp:
            try:
                root = _unpack(Path(target), Path(tmp))
                return _report(registry.load(root))
            except PackageError as exc:
                _out(f"FAILED  {target}: {exc}")
                return 1
    if target is None:
        folders = registry.folders()
    else:
        try:
            name, version = parse_ref(target)
            found = [registry.find(name, version)] if version else registry.installed(name)
        except (ValueError, PackageError) as exc:
            _out(f"FAILED  {target}: {exc}")
            return 1
        if not found:
            _out(f"FAILED  {target}: no such path or installed model")
            return 1
        folders = [i.folder for i in found]
    failed = 0
    for folder in folders:
        try:
            _report(registry.load(folder))
        except PackageError as exc:
            failed += 1
            _out(f"FAILED  {folder}: {exc}")
            store.record(AuditRecord(AuditEvent.MODEL_REFUSED, actor=actor,
                                     detail={"folder": folder.name, "action": "verify", "reason": str(exc)}))
    return 1 if failed else 0


def _report(package: ModelPackage) -> int:
    signed = f"signed by {package.signed_by}" if package.signed_by else "signature not checked/absent"
    _out(f"OK      {package.ref} ({len(package.manifest.files)} files verified, {signed})")
    return 0


def _unpack(path: Path, tmp: Path) -> Path:
    """A folder for ``path``: itself, or where its zip was safely unpacked under ``tmp``."""
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".zip":
        dest = tmp / "unpacked"
        dest.mkdir()
        return extract_zip(path, dest)
    raise PackageError(f"{path}: not a folder or a .zip")


def _overrides(args: argparse.Namespace) -> BundleOverrides:
    base = load_overrides(args.overrides) if args.overrides else BundleOverrides()
    data: dict[str, Any] = base.model_dump(exclude_unset=True)
    if args.segments:
        try:
            loaded = yaml.safe_load(args.segments.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise PackageError(f"{args.segments}: cannot read segments: {exc}") from exc
        data["segments"] = loaded.get("segments") if isinstance(loaded, dict) else loaded
    flags = {"name": args.name, "version": args.model_version, "licence_file": args.licence,
             "intensity": {"low": args.window[0], "high": args.window[1]} if args.window else None,
             "patch_size": args.patch_size, "spacing_mm": args.spacing}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return BundleOverrides.model_validate(data)
    except ValueError as exc:
        raise PackageError(f"invalid bundle overrides: {exc}") from exc


def _add(registry: ModelRegistry, store: Store, settings: Settings, args: argparse.Namespace,
         actor: str) -> int:
    source = Path(args.target)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".portico-add-", dir=settings.data_dir) as tmp:
            root = _unpack(source, Path(tmp))
            if args.bundle:
                imported = import_bundle(root, Path(tmp) / "package", _overrides(args))
                root = imported.root
                _out(f"imported bundle as {imported.ref} (segment codes: "
                     f"{imported.manifest.provenance.get('segment_codes')})")
            package = registry.load(root)
            state, created = registry.install(package, actor, source=source.name)
    except PackageError as exc:
        _out(f"REFUSED {source}: {exc}")
        store.record(AuditRecord(AuditEvent.MODEL_REFUSED, actor=actor,
                                 detail={"source": source.name, "action": "add", "reason": str(exc)}))
        return 1
    if not created:
        _out(f"{state.ref} is already installed ({state.role}); nothing changed")
        return 0
    _out(f"added {state.ref} as {state.role}" + (
        f"; make it the running version with: portico models promote {state.ref}"
        if state.role == "candidate" else ""))
    return 0


def _change(registry: ModelRegistry, action: str, target: str, actor: str) -> int:
    try:
        name, version = parse_ref(target)
        if version is None:
            raise ValueError(f"{action} needs NAME@VERSION, got {target!r}")
        if action == "promote":
            previous = registry.promote(name, version, actor)
            _out(f"{name}@{version} is active" + (f" (was {previous}, now a candidate)" if previous else ""))
        else:
            was = registry.set_enabled(name, version, action == "enable", actor)
            _out(f"{name}@{version} {action}d" + ("" if was != (action == "enable") else " (no change)"))
            if action == "disable":
                _warn_unrunnable(registry, name)
    except (ValueError, PackageError) as exc:
        _out(f"FAILED  {target}: {exc}")
        return 1
    return 0


def _warn_unrunnable(registry: ModelRegistry, name: str) -> None:
    try:
        registry.resolve(name)
    except PackageError as exc:
        _out(f"warning: jobs that name {name} without a version will fail now: {exc}")


def _offline(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Commands that need no appliance state: key generation, signing, bundle conversion."""
    if args.target is None:
        p.error(f"{args.action} needs a target")
    target = Path(args.target)
    try:
        if args.action == "keygen":
            target.mkdir(parents=True, exist_ok=True)
            private, public = generate_keypair()
            key_file = target / "portico-signing.key"
            with key_file.open("xb") as fh:  # never overwrite a key
                fh.write(private)
            key_file.chmod(0o600)
            (target / "portico-signing.pub").write_bytes(public)
            _out(f"wrote {key_file} (keep it secret) and {target / 'portico-signing.pub'} "
                 f"(fingerprint {fingerprint(public_key(public))}; add it to inference.trusted_keys)")
        elif args.action == "sign":
            if args.key is None:
                p.error("sign needs --key PRIVATE.pem")
            path = sign_package(target, args.key.read_bytes())
            _out(f"signed {target}: {path.name}")
        else:
            if args.out is None:
                p.error("import needs BUNDLE OUT")
            with tempfile.TemporaryDirectory(prefix="portico-import-") as tmp:
                package = import_bundle(_unpack(target, Path(tmp)), args.out, _overrides(args))
            _out(f"wrote {package.ref} to {args.out} (segment codes: "
                 f"{package.manifest.provenance.get('segment_codes')}); review, sign, then add it")
    except (OSError, ValueError, PackageError) as exc:
        _out(f"FAILED  {target}: {exc}")
        return 1
    return 0
