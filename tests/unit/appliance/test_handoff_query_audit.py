"""The completeness C-FIND is audited when it says something new, not on every tick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import handoff as handoff_module
from appliance.handoff import HandOff
from appliance.store import Store
from dicom_router.ports import ReceivedInstance
from dicom_router.rules import RuleSet
from dicom_router.settings import Peer, RouterSettings


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "var", fsync=False)
    yield s
    s.close()


def test_queries_are_audited_once_per_new_answer(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    store.store(ReceivedInstance("1.2.840.10008.5.1.4.1.1.2", f"{study}.1", study, f"{study}.2",
                                 "1.2.840.10008.1.2.1", "PACS", "127.0.0.1", b"\0" * 132))
    answers: list[int | None] = [None, None, 5, 5, 6]
    monkeypatch.setattr(handoff_module, "count_study_instances", lambda *a, **k: answers.pop(0))
    settings = RouterSettings(peers=(Peer(ae_title="PACS", query_host="127.0.0.1", query_port=104),),
                              quiet_seconds=3600)
    hand_off = HandOff(store, settings, RuleSet(rules=()))
    now = 1_000.0
    for _ in range(5):
        now += 120  # past any back-off
        hand_off.tick(now=now)
    rows = [e["detail"] for e in store.audit_events(study) if e["event"] == "queried"]
    assert [(r["answered"], r["count"]) for r in rows] == [(False, None), (True, 5), (True, 6)]
    assert all(r["peer"] == "PACS" for r in rows)
