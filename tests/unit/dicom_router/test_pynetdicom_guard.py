"""Guard for the pynetdicom routines we override: the pin, and each routine's source as of the pin."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pynetdicom
import pytest

from dicom_router import reactor, upstream

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_installed_pynetdicom_is_the_pinned_one() -> None:
    assert pynetdicom.__version__ == upstream.PINNED_PYNETDICOM, (
        f"pynetdicom {pynetdicom.__version__} is installed but the overrides were checked against "
        f"{upstream.PINNED_PYNETDICOM}: install that, or move the pin as dicom_router/upstream.py describes"
    )


def test_pyproject_pins_the_same_version() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"pynetdicom\b", d)]
    assert pins == [f"pynetdicom=={upstream.PINNED_PYNETDICOM}"]


@pytest.mark.parametrize("name", sorted(upstream.OVERRIDDEN))
def test_overridden_routine_unchanged(name: str) -> None:
    digest = upstream.source_sha256(name)
    assert digest is not None, (
        f"{name} is gone from pynetdicom {pynetdicom.__version__} (or has no source): "
        "dicom_router/reactor.py or dicom_router/edge*.py overrides it; rework that override"
    )
    assert digest == upstream.OVERRIDDEN[name], (
        f"the source of {name} changed upstream (pynetdicom {pynetdicom.__version__}). Re-read it against "
        "its override in dicom_router/reactor.py or dicom_router/edge*.py, adapt the override, then "
        f"set its digest in dicom_router/upstream.py OVERRIDDEN to {digest!r}"
    )


def test_changed_overrides_empty_with_the_pinned_release() -> None:
    assert upstream.changed_overrides() == []


def test_changed_overrides_names_a_changed_or_missing_routine(monkeypatch: pytest.MonkeyPatch) -> None:
    table = dict(upstream.OVERRIDDEN)
    table["pynetdicom.association.Association._run_reactor"] = "0" * 64
    table["pynetdicom.association.Association._no_such_routine"] = "0" * 64
    table["no_such_package.module.routine"] = "0" * 64
    monkeypatch.setattr(upstream, "OVERRIDDEN", table)
    assert upstream.changed_overrides() == [
        "pynetdicom.association.Association._run_reactor",
        "pynetdicom.association.Association._no_such_routine",
        "no_such_package.module.routine",
    ]


def test_property_resolves_to_its_getter() -> None:
    from pynetdicom.transport import AssociationSocket

    ready = AssociationSocket.__dict__["ready"]
    assert isinstance(ready, property)
    assert upstream.resolve("pynetdicom.transport.AssociationSocket.ready") is ready.fget


def test_supported_with_the_pinned_version() -> None:
    assert pynetdicom.__version__ == upstream.PINNED_PYNETDICOM
    assert reactor.supported()


@pytest.mark.parametrize("version", [
    "3.1.0",
    "4.0.0",
    "2.1.1",
    "3.0.5",
    "3.0.3",
    "3.0.4.post1",
])
def test_supported_is_false_for_another_version(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", version)
    assert not reactor.supported()


def test_supported_is_false_when_an_overridden_method_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reactor, "changed_overrides", lambda: ["pynetdicom.association.Association._run_reactor"])
    reactor.unchanged_upstream.cache_clear()
    try:
        assert not reactor.supported()
    finally:
        reactor.unchanged_upstream.cache_clear()
