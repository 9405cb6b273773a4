from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[3]


def test_example_config_loads_and_resolves_paths_relative_to_file() -> None:
    s = load_settings(REPO / "config" / "portico.example.yaml")
    assert s.router.ae_title == "PORTICO"
    assert s.rules_path == REPO / "config" / "rules.yaml"
    assert s.models_dir == REPO / "models"
    assert [d.name for d in s.dispatch.destinations] == ["pacs"]


def test_environment_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTICO_ROUTER__PORT", "11999")
    monkeypatch.setenv("PORTICO_ROUTER__QUIET_SECONDS", "2.5")
    s = load_settings(REPO / "config" / "portico.example.yaml")
    assert s.router.port == 11999
    assert s.router.quiet_seconds == 2.5


@pytest.mark.parametrize("aet", ["", "A" * 17, "BAD\\AET", "   "])
def test_invalid_ae_titles_refused(aet: str) -> None:
    with pytest.raises(ValidationError):
        Settings(router={"ae_title": aet})


def test_unknown_keys_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Settings(router={"colour": "blue"})


def test_placeholder_secret_refused_outside_dev() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(api={"enabled": True, "token": "change-me"})
    assert Settings(mode="dev", api={"enabled": True, "token": "change-me"}).api.enabled


def test_destination_kinds_are_a_discriminated_union() -> None:
    s = Settings(dispatch={"destinations": [
        {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"kind": "stow", "name": "web", "url": "http://127.0.0.1:8042/dicom-web"},
    ]})
    assert [d.kind for d in s.dispatch.destinations] == ["dimse", "stow"]
    with pytest.raises(ValidationError):
        Settings(dispatch={"destinations": [{"kind": "ftp", "name": "x"}]})


def test_session_budget_and_arena_reach_the_service_session_cache(tmp_path: Path) -> None:
    from appliance.service import Service

    (tmp_path / "rules.yaml").write_text("rules: []\n")
    settings = Settings(storage={"data_dir": str(tmp_path / "var")},
                        router={"rules_file": str(tmp_path / "rules.yaml")},
                        inference={"models_dir": str(tmp_path / "models"), "max_sessions": 2,
                                   "session_memory_mb": 300, "cpu_memory_arena": True})
    service = Service(settings)
    try:
        assert service.sessions.max_sessions == 2
        assert service.sessions.max_bytes == 300 * 2**20
        assert service.sessions.cpu_memory_arena is True
    finally:
        service.store.close()
    with pytest.raises(ValidationError):
        Settings(inference={"max_sessions": 0})
