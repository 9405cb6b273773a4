"""DICOM TLS settings in the YAML file: relative certificate, key and CA paths resolve against its folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.settings import load_settings
from dicom_router.settings import DimseDestination, TlsMode


def test_tls_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "portico.yaml"
    config.write_text(yaml.safe_dump({
        "router": {
            "tls": {"certificate": "tls/portico.pem", "private_key": "tls/portico.key", "ca_bundle": "tls/ca.pem"},
            "peers": [{"ae_title": "MOD1", "tls": "required",
                       "certificate_fingerprint": "AA:" * 31 + "AA"}],
        },
        "dispatch": {"destinations": [
            {"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762,
             "tls": "required", "ca_bundle": "tls/pacs-ca.pem"},
            {"kind": "dimse", "name": "abs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762,
             "tls": "required", "ca_bundle": "/etc/ssl/pacs.pem"},
        ]},
    }))
    settings = load_settings(config)
    tls = settings.router.tls
    assert tls is not None
    assert tls.certificate == str(folder / "tls" / "portico.pem")
    assert tls.private_key == str(folder / "tls" / "portico.key")
    assert tls.ca_bundle == str(folder / "tls" / "ca.pem")
    assert settings.router.peers[0].certificate_fingerprint == "aa" * 32
    pacs, absolute = settings.dispatch.destinations
    assert isinstance(pacs, DimseDestination) and pacs.tls is TlsMode.REQUIRED
    assert pacs.ca_bundle == str(folder / "tls" / "pacs-ca.pem")
    assert isinstance(absolute, DimseDestination) and absolute.ca_bundle == "/etc/ssl/pacs.pem"


def test_no_tls_block_is_fine(tmp_path: Path) -> None:
    config = tmp_path / "portico.yaml"
    config.write_text(yaml.safe_dump({"router": {"port": 11113}, "dispatch": {"destinations": []}}))
    assert load_settings(config).router.tls is None
