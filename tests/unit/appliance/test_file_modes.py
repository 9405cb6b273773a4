"""Owner-only at rest: explicit modes whatever the umask, the start-up repair, and the secret files' check."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from appliance.cli.serve import secrets_are_private
from appliance.durable import move_durably, write_durably
from appliance.file_modes import create_private, make_private_dirs, secret_file_problems, tighten_tree
from appliance.settings import Settings, load_settings
from appliance.store import Store
from tests.conftest import REPO


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A permissive umask, as a process that never went through ``portico`` would have."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("loose_umask")
def test_the_store_and_durable_writes_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "new" / "var"
    store = Store(data, fsync=False)
    try:
        write_durably(data / "instances" / "1.2" / "1.2.3" / "x.dcm", b"data", fsync=False)
        spooled = data / "spool" / "part"
        spooled.write_bytes(b"part")
        os.chmod(spooled, 0o600)
        move_durably(spooled, data / "quarantine" / "q" / "y.dcm", fsync=False)
    finally:
        store.close()
    for path in [data, *data.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, (path, oct(mode(path)))
    assert mode(tmp_path / "new") == 0o700  # a missing parent made on the way, too


@pytest.mark.usefixtures("loose_umask")
def test_make_private_dirs_and_create_private_leave_existing_ones_alone(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    make_private_dirs(existing / "a" / "b")
    assert (mode(existing), mode(existing / "a"), mode(existing / "a" / "b")) == (0o755, 0o700, 0o700)
    db = tmp_path / "db"
    create_private(db)
    assert mode(db) == 0o600
    db.write_bytes(b"kept")
    create_private(db)
    assert db.read_bytes() == b"kept"


def test_start_up_repair_tightens_what_group_or_others_could_read(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "var"
    (data / "instances" / "s").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "instances", 0o775)
    os.chmod(data / "instances" / "s", 0o755)
    (data / "portico.sqlite3").write_bytes(b"")
    os.chmod(data / "portico.sqlite3", 0o644)
    (data / "instances" / "s" / "a.dcm").write_bytes(b"")
    os.chmod(data / "instances" / "s" / "a.dcm", 0o600)
    key = data / "key"
    key.write_bytes(b"")
    os.chmod(key, 0o444)  # read-only stays read-only, for the owner alone
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    os.chmod(outside, 0o644)
    (data / "link").symlink_to(outside)

    caplog.set_level("WARNING")
    result = tighten_tree(data)
    assert (result.files, result.folders, result.failed) == (2, 3, 0)
    assert "tightened 2 file(s) and 3 folder(s)" in caplog.text
    assert mode(data) == 0o700 and mode(data / "instances") == 0o700 and mode(data / "instances" / "s") == 0o700
    assert mode(data / "portico.sqlite3") == 0o600 and mode(key) == 0o400
    assert mode(outside) == 0o644  # a link is not followed
    caplog.clear()
    assert tighten_tree(data).files == 0 and "tightened" not in caplog.text


def _config(tmp_path: Path, mode_setting: str, **extra: object) -> Path:
    path = tmp_path / "portico.yaml"
    path.write_text(yaml.safe_dump({"mode": mode_setting, "storage": {"data_dir": str(tmp_path / "var")},
                                    **extra}))
    return path


def test_secret_files_group_or_others_can_read_are_named_with_the_fix(tmp_path: Path) -> None:
    key, secret = tmp_path / "tls.key", tmp_path / "stow.secret"
    for path in (key, secret):
        path.write_text("x")
    config = _config(tmp_path, "production", router={
        "tls": {"certificate": "tls.pem", "private_key": "tls.key", "require_client_certificate": False}},
        dispatch={"destinations": [{"kind": "stow", "name": "pacs", "url": "https://pacs.example/dicom-web",
                                    "auth": {"kind": "bearer", "secret_file": "stow.secret"}}]})
    for path in (config, key, secret):
        os.chmod(path, 0o644)
    settings = load_settings(config)
    problems = secret_file_problems(settings, config)
    assert [(p.what, p.path, p.mode) for p in problems] == [
        ("configuration file", config, 0o644), ("router.tls.private_key", key, 0o644),
        ("dispatch.destinations[pacs].auth.secret_file", secret, 0o644)]
    assert str(problems[0]) == (f"configuration file {config} can be read by group/others (mode 0644); "
                                f"make it readable by the appliance's user only: chmod 600 {config}")
    os.chmod(config, 0o640)
    os.chmod(key, 0o600)
    os.chmod(secret, 0o400)
    assert [p.what for p in secret_file_problems(settings, config)] == ["configuration file"]
    os.chmod(config, 0o600)
    assert secret_file_problems(settings, config) == []
    assert secret_file_problems(settings, None) == []
    # a missing key file is reported where it is used, not here
    key.unlink()
    assert secret_file_problems(settings, config) == []


def test_production_refuses_and_dev_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _config(tmp_path, "production")
    os.chmod(config, 0o604)
    assert not secrets_are_private(load_settings(config), config)
    assert "not starting: configuration file" in caplog.text and f"chmod 600 {config}" in caplog.text
    caplog.clear()
    dev = _config(tmp_path, "dev")
    os.chmod(dev, 0o644)
    assert secrets_are_private(load_settings(dev), dev)
    assert "allowed in mode: dev only" in caplog.text and "not starting" not in caplog.text
    assert secrets_are_private(Settings(), None)


def test_compose_serves_from_a_private_copy_of_its_mounted_config() -> None:
    portico = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["portico"]
    script = portico["entrypoint"][-1]
    assert portico["entrypoint"][:2] == ["sh", "-c"] and "$$PORTICO_CONFIG" in script
    copy = re.search(r"install -m 600 \S+ (\S+) && exec portico serve -c (\S+)$", script)
    assert copy and copy.group(1) == copy.group(2)
