"""``/models`` (signature state, accepted inputs, model card) and ``/rules`` (lines, validation, warnings).

Real model packages (:mod:`tests.support.packages`): unsigned, signed by a trusted key, and signed by a key
that is not trusted; a rules file that is valid and one that is not, through TestClient as each role.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.roles import Role
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts
from inference.packages import sign_package
from inference.signing import generate_keypair
from tests.support.packages import make_package

PASSWORD = "a long enough passphrase"
CARD = "# Tiny\n\nSegments fat. <script>alert('card')</script> <img src=x onerror=alert(1)>\n\n- CT only\n"
RULES = """rules:
  - name: fat
    model: tiny
    series:
      Modality: {in: [CT, MR]}
  - name: gone
    model: not-installed
"""
BAD_RULES = """rules:
  - name: fat
    model: tiny
    series:
      Modality: {regex: "(unclosed"}
    colour: red
"""


@dataclass
class World:
    client: TestClient
    rules: Path
    auth: dict[Role, dict[str, str]]

    def get(self, path: str, role: Role = Role.VIEWER) -> Any:
        response = self.client.get(path, headers=self.auth[role])
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    trusted_private, trusted_public = generate_keypair()
    other_private, _ = generate_keypair()
    models = tmp_path / "models"
    make_package(models / "tiny-1.0.0", card=CARD)
    sign_package(make_package(models / "tiny-1.1.0", version="1.1.0"), trusted_private)
    sign_package(make_package(models / "other-1.0.0", name="other"), other_private)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0},
        "inference": {"models_dir": str(models), "trusted_keys": [trusted_public.decode()]},
        "router": {"rules_file": str(rules)},
        "api": {"enabled": True},
    })
    store = Store(settings.data_dir, fsync=False)
    accounts = Accounts(store, settings.api)
    auth = {}
    for role in Role:
        accounts.add(f"{role}-user", PASSWORD, [role], actor="cli:test")
        auth[role] = {"Authorization": f"Bearer {accounts.issue_token(f'{role}-user', actor='cli:test').token}"}
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield World(client, rules, auth)
    store.close()


def test_models_show_role_signature_and_accepted_inputs(world: World) -> None:
    listed = {(m["name"], m["version"]): m for m in world.get("/models")}
    assert set(listed) == {("other", "1.0.0"), ("tiny", "1.0.0"), ("tiny", "1.1.0")}
    assert {k: v["role"] for k, v in listed.items()} == {
        ("other", "1.0.0"): "active", ("tiny", "1.0.0"): "candidate", ("tiny", "1.1.0"): "active"}
    assert listed[("tiny", "1.0.0")]["signature"]["state"] == "unsigned"
    verified = listed[("tiny", "1.1.0")]["signature"]
    assert verified["state"] == "verified" and len(verified["signed_by"]) > 10
    invalid = listed[("other", "1.0.0")]["signature"]
    assert invalid["state"] == "invalid" and "does not verify" in invalid["detail"]
    accepted = listed[("tiny", "1.0.0")]["input"]
    assert (accepted["modality"], accepted["orientation"], accepted["min_slices"]) == ("CT", "axial", 1)
    assert listed[("tiny", "1.0.0")]["segments"] == ["Fat"]


def test_the_model_card_is_given_as_text_and_checked_against_its_digest(world: World) -> None:
    card = world.get("/models/tiny/1.0.0/card")
    assert card["text"] == CARD  # as the package holds it: the page shows it as text, never as HTML
    assert (card["file"], card["intact"], card["truncated"]) == ("MODEL_CARD.md", True, False)
    (world.rules.parent / "models" / "tiny-1.0.0" / "MODEL_CARD.md").write_text("# changed\n")
    assert world.get("/models/tiny/1.0.0/card")["intact"] is False
    missing = world.client.get("/models/tiny/9.9.9/card", headers=world.auth[Role.VIEWER])
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert world.client.get("/models/tiny/1.0.0/card").status_code == 401


def test_the_rules_file_is_shown_with_its_lines_rules_and_warnings(world: World) -> None:
    shown = world.get("/rules")
    assert shown["exists"] and shown["valid"] and shown["problems"] == []
    assert shown["lines"] == RULES.splitlines()
    assert [(r["name"], r["model"]) for r in shown["rules"]] == [("fat", "tiny"), ("gone", "not-installed")]
    assert shown["rules"][0]["describe"].startswith("fat: tiny on Modality in {CT, MR}")
    assert any("not-installed is not installed" in w for w in shown["warnings"])
    assert any("rule fat" in w and "MR" in w for w in shown["warnings"])
    assert world.client.get("/rules").status_code == 401


def test_an_invalid_rules_file_names_each_problem_and_its_line(world: World) -> None:
    world.rules.write_text(BAD_RULES)
    shown = world.get("/rules")
    assert shown["exists"] and not shown["valid"] and shown["rules"] == []
    lines = {p["line"]: p["message"] for p in shown["problems"]}
    assert set(lines) == {5, 6}, shown["problems"]
    assert "unknown field" in lines[6]
    world.rules.unlink()
    gone = world.get("/rules")
    assert not gone["exists"] and "cannot read" in gone["problems"][0]["message"]
