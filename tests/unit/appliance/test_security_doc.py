"""``docs/security.md`` against the code: storage places and retention defaults, roles, secret files, ports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.file_modes import secret_files
from appliance.settings import RetentionSettings, Settings
from appliance.store import STALE_SPOOL_SECONDS, Store
from dicom_router.settings import DicomTlsSettings, RouterSettings
from tests.conftest import REPO

DOC = (REPO / "docs" / "security.md").read_text(encoding="utf-8")


def rows(name: str) -> list[list[str]]:
    found = re.search(rf"<!-- checked: {name} -->\n(.*?)<!-- /checked: {name} -->", DOC, re.DOTALL)
    assert found, f"docs/security.md has no checked block {name!r}"
    lines = [line for line in found.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_storage_places_are_the_stores_and_retention_defaults_are_the_settings(tmp_path: Path) -> None:
    store = Store(tmp_path / "var", fsync=False)
    try:
        places = {p.name for p in (store.instances_dir, store.results_dir, store.quarantine_dir, store.spool_dir)}
    finally:
        store.close()
    documented = {re.match(r"`([^/`]+)", row[0]).group(1): row[3] for row in rows("storage")}  # type: ignore[union-attr]
    assert set(documented) == places | {"portico.sqlite3", Settings().fl.workspace}
    defaults = RetentionSettings()
    for name, value in defaults.model_dump().items():
        if name.endswith(("_days", "_mb")):
            assert f"`storage.retention.{name}` ({value:g})" in " ".join(documented.values()), name
    assert f"`interval_minutes` ({defaults.interval_minutes:g})" in DOC
    assert f"after {STALE_SPOOL_SECONDS // 3600} hours" in documented["spool"]


def test_roles_are_the_policys_roles() -> None:
    roles = pytest.importorskip("appliance.roles")
    assert {row[0].strip("`") for row in rows("roles")} == {str(r) for r in roles.Role}


def test_every_secret_file_the_serve_check_covers_is_named(tmp_path: Path) -> None:
    settings = Settings.model_validate({
        "mode": "dev",
        "router": {"tls": {"certificate": "c.pem", "private_key": "k.pem", "require_client_certificate": False}},
        "api": {"tls": {"certificate": "c.pem", "private_key": "k.pem"}},
        "dispatch": {"destinations": [{"kind": "stow", "name": "d", "url": "https://x/dicom-web",
                                       "auth": {"kind": "bearer", "secret_file": "s"}}]},
        **({"audit": {"syslog": {"host": "collector", "certificate": "c.pem", "private_key": "k.pem"}}}
           if "audit" in Settings.model_fields else {}),
    })
    for what, _ in secret_files(settings, tmp_path / "portico.yaml"):
        name = re.sub(r"\[[^]]*\]", "[]", what)
        assert name == "configuration file" or f"`{name}`" in DOC, name
    assert "`chmod 600 <file>`" in DOC


def test_default_ports_are_the_settings() -> None:
    assert f"`router.port` ({RouterSettings().port})" in DOC
    assert f"`router.tls.port` ({DicomTlsSettings.model_fields['port'].default})" in DOC
    assert f"`api.port` ({Settings().api.port})" in DOC
