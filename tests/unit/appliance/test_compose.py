"""No Docker engine runs here: parse compose.yaml and check it agrees with the configs it mounts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from appliance.settings import load_settings

REPO = Path(__file__).resolve().parents[3]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


def test_compose_services_volumes_and_healthchecks() -> None:
    compose = _compose()
    default = {name for name, s in compose["services"].items() if "profiles" not in s}
    assert default == {"orthanc", "portico"}
    for name, service in compose["services"].items():
        assert "healthcheck" in service, name
        assert service["volumes"], name
    assert set(compose["volumes"]) == {"orthanc-db", "portico-data", "portico-pg"}


def test_the_scaled_profile_runs_the_roles_over_one_postgresql_and_one_data_volume() -> None:
    services = _compose()["services"]
    scaled = {name for name, s in services.items() if "scaled" in s.get("profiles", ())}
    assert scaled == {"postgres", "portico-receive", "portico-work", "portico-dispatch"}
    roles = {"portico-receive": "receive", "portico-work": "work", "portico-dispatch": "dispatch"}
    urls = set()
    for name, role in roles.items():
        service = services[name]
        assert f"exec portico {role} " in service["entrypoint"][-1]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "portico-data:/var/lib/portico" in service["volumes"]  # one file store for every role
        urls.add(service["environment"]["PORTICO_STORAGE__DATABASE"])
        assert "pg-password" in service["secrets"] and "PGPASSWORD" in service["entrypoint"][-1]
    assert len(urls) == 1 and urls.pop().startswith("postgresql://portico@postgres:")
    assert services["portico-work"]["deploy"]["replicas"] >= 2  # scaled workers
    assert services["portico-dispatch"]["deploy"]["replicas"] == 1  # the outbox runs once per site
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/pg-password"
    # only the receiver listens for DICOM, on the port the single service would
    assert [s.get("ports") for s in (services["portico-work"], services["portico-dispatch"])] == [None, None]
    assert services["portico-receive"]["ports"] == services["portico"]["ports"]


def test_compose_agrees_with_the_mounted_portico_config() -> None:
    compose = _compose()
    portico = compose["services"]["portico"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in portico["volumes"]}
    cfg_path = REPO / mounts[portico["environment"]["PORTICO_CONFIG"]]
    settings = load_settings(cfg_path)
    # the SCP port is published and the health check echoes it under our AE title
    assert f"{settings.router.port}:{settings.router.port}" in portico["ports"]
    assert portico["healthcheck"]["test"][-3:] == [settings.router.ae_title, "127.0.0.1", str(settings.router.port)]
    assert any(p.ae_title == "HEALTHCHECK" for p in settings.router.peers)
    # the data folder is the persistent volume; the rules file is mounted where the config says
    assert mounts[settings.storage.data_dir] == "portico-data"
    assert settings.router.rules_file in mounts
    assert (REPO / mounts[settings.router.rules_file]).is_file()
    # Orthanc knows Portico under the same AE title and port, and Portico sends to Orthanc's AE/port
    orthanc = compose["services"]["orthanc"]["environment"]
    modality = yaml.safe_load(orthanc["ORTHANC__DICOM_MODALITIES"])["portico"]
    assert modality == [settings.router.ae_title, "portico", settings.router.port]
    dest = settings.dispatch.destinations[0]
    assert (dest.ae_title, dest.port) == (orthanc["ORTHANC__DICOM_AET"], int(orthanc["ORTHANC__DICOM_PORT"]))
    peer = next(p for p in settings.router.peers if p.ae_title == orthanc["ORTHANC__DICOM_AET"])
    orthanc_ip = compose["services"]["orthanc"]["networks"]["dicom"]["ipv4_address"]
    assert orthanc_ip in peer.hosts
    assert settings.models_dir == Path("/opt/portico/models")
