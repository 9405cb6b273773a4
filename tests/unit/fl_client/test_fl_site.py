"""fl_client without a federation: kits, policy, approvals gate, outgoing ledger, cohort split, export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fl_client.approvals import Approvals
from fl_client.dataset import split_of, to_grid
from fl_client.errors import KitError, NotEnrolledError
from fl_client.executor import PorticoTrainer
from fl_client.kit import install_kit, make_request, package_signed, validate_kit
from fl_client.layout import SiteLayout
from fl_client.policy import CLASS_ALLOW_LIST, write_policy
from fl_client.settings import FLSettings, PrivacySettings
from fl_client.site_components import SiteJobGate, inspect_dxo
from fl_client.supervisor import FLSupervisor, descendants, job_id_of, kill_tree, nvflare_env

PY = sys.executable


def _nvflare(args: list[str], cwd: Path, layout: SiteLayout) -> str:
    proc = subprocess.run([PY, "-m", "nvflare.cli", *args], cwd=cwd, env=nvflare_env(layout), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A centrally provisioned project: server, one admin, sites site-1 and site-2."""
    root = tmp_path_factory.mktemp("prov")
    project = {"api_version": 3, "name": "unit_project", "participants": [
        {"name": "server", "type": "server", "org": "p", "fed_learn_port": 18002, "admin_port": 18002},
        {"name": "admin@p.org", "type": "admin", "org": "p", "role": "project_admin"},
        {"name": "site-1", "type": "client", "org": "hospital"},
        {"name": "site-2", "type": "client", "org": "hospital"}],
        "builders": [{"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
                     {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
                      "args": {"config_folder": "config", "scheme": "grpc"}},
                     {"path": "nvflare.lighter.impl.cert.CertBuilder"},
                     {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}]}
    (root / "project.yml").write_text(yaml.safe_dump(project))
    _nvflare(["provision", "-p", str(root / "project.yml"), "-w", str(root / "ws")], root,
             SiteLayout(root / "nvhome"))
    return root / "ws" / "unit_project" / "prod_00"


def test_valid_kit_is_described(kits: Path) -> None:
    info = validate_kit(kits / "site-1")
    assert (info.site, info.org, info.project) == ("site-1", "hospital", "unit_project")
    assert info.server_target.endswith(":18002") and info.root_ca_fingerprint.startswith("SHA256:")


def test_kit_with_a_foreign_key_or_certificate_is_refused(kits: Path, tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(kits / "site-1", kit)
    (kit / "startup" / "client.key").chmod(0o600)
    shutil.copy(kits / "site-2" / "startup" / "client.key", kit / "startup" / "client.key")
    with pytest.raises(KitError, match="private key"):
        validate_kit(kit)
    shutil.copy(kits / "site-2" / "startup" / "client.crt", kit / "startup" / "client.crt")
    with pytest.raises(KitError, match="names 'site-2'"):
        validate_kit(kit)
    (kit / "startup" / "rootCA.pem").unlink()
    with pytest.raises(KitError, match=r"rootCA\.pem is missing"):
        validate_kit(kit)


def test_zip_kit_installs_read_only(kits: Path, tmp_path: Path) -> None:
    archive = tmp_path / "site-1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (kits / "site-1").rglob("*"):
            zf.write(path, Path("site-1") / path.relative_to(kits / "site-1"))
    layout = SiteLayout(tmp_path / "data" / "fl")
    info = install_kit(archive, layout, expected_fingerprint=validate_kit(kits / "site-1").root_ca_fingerprint)
    assert info.site == "site-1"
    assert (layout.site / "startup" / "client.key").stat().st_mode & 0o777 == 0o400
    assert json.loads(layout.enrolment_file.read_text())["site"] == "site-1"


def test_a_kit_needs_its_fingerprint_or_an_explicit_waiver(kits: Path, tmp_path: Path) -> None:
    layout = SiteLayout(tmp_path / "fl")
    with pytest.raises(KitError, match="fingerprint"):
        install_kit(kits / "site-1", layout)
    with pytest.raises(KitError, match="not the project's server"):
        install_kit(kits / "site-1", layout, expected_fingerprint="SHA256:" + ":".join(["AB"] * 32))
    assert install_kit(kits / "site-1", layout, fingerprint_waived=True).site == "site-1"


@pytest.mark.parametrize(("extra", "why"), [
    ("local/custom/decomposers/x.py", "custom code folder"),
    ("local/site_hook.py", "code"),
    ("local/study_runtime.yaml", "not a file NVFlare's provisioning writes"),
    ("startup/sitecustomize.py", "code"),
])
def test_a_kit_carrying_code_or_unknown_local_files_is_refused(kits: Path, tmp_path: Path, extra: str,
                                                               why: str) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(kits / "site-1", kit)
    (kit / extra).parent.mkdir(parents=True, exist_ok=True)
    (kit / extra).write_text("open('/tmp/pwned', 'w')\n")
    fp = validate_kit(kits / "site-1").root_ca_fingerprint
    with pytest.raises(KitError, match=re.escape(why)):
        install_kit(kit, SiteLayout(tmp_path / "fl"), expected_fingerprint=fp)
    assert not (tmp_path / "fl" / "site").exists()


def test_installed_local_holds_only_portico_policy(kits: Path, tmp_path: Path) -> None:
    layout = SiteLayout(tmp_path / "fl")
    install_kit(kits / "site-1", layout, expected_fingerprint=validate_kit(kits / "site-1").root_ca_fingerprint)
    assert not list((layout.site / "local").iterdir())
    write_policy(FLSettings(), layout, tmp_path / "models")
    # a file dropped into local/ later does not survive the next start
    (layout.site / "local" / "custom").mkdir()
    (layout.site / "local" / "custom" / "x.py").write_text("x = 1\n")
    write_policy(FLSettings(), layout, tmp_path / "models")
    assert sorted(p.name for p in (layout.site / "local").iterdir()) == \
        ["authorization.json", "log_config.json", "privacy.json", "resources.json"]


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(KitError, match="leaves the archive"):
        install_kit(archive, SiteLayout(tmp_path / "fl"))


def test_distributed_provisioning_keeps_the_key_here(tmp_path: Path) -> None:
    """Site key + CSR here, approval by the project admin's CA, packaging with the fingerprint."""
    layout = SiteLayout(tmp_path / "appliance" / "fl")
    admin = tmp_path / "admin"
    admin.mkdir()
    profile = admin / "project_profile.yaml"
    profile.write_text(yaml.safe_dump({"name": "dist_project", "scheme": "grpc", "connection_security": "mtls",
                                       "server": {"host": "localhost", "fed_learn_port": 18102}}))
    _nvflare(["cert", "init", "--profile", str(profile), "-o", str(admin / "ca")], admin, SiteLayout(admin / "h"))
    request = make_request(layout, project="dist_project", site="hospital-a", org="hospital")
    with zipfile.ZipFile(request) as zf:
        assert not any(n.endswith(".key") for n in zf.namelist())
    signed = admin / "hospital-a.signed.zip"
    _nvflare(["cert", "approve", str(request), "--ca-dir", str(admin / "ca"), "--profile", str(profile), "--out",
              str(signed)], admin, SiteLayout(admin / "h"))
    from cryptography import x509

    from fl_client.kit import fingerprint

    expected = fingerprint(x509.load_pem_x509_certificate((admin / "ca" / "rootCA.pem").read_bytes()))
    with pytest.raises(KitError):
        package_signed(signed, layout, expected_fingerprint="SHA256:" + ":".join(["00"] * 32))
    info = package_signed(signed, layout, expected_fingerprint=expected)
    assert (info.site, info.mode) == ("hospital-a", "csr")
    assert info.server_target == "localhost:18102"


def test_policy_denies_by_default(tmp_path: Path) -> None:
    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    settings = FLSettings(privacy=PrivacySettings(exclude_vars=("out\\..*",), percentile=10))
    write_policy(settings, layout, tmp_path / "models")
    authz = json.loads((layout.site / "local" / "authorization.json").read_text())
    for role, rights in authz["permissions"].items():
        assert rights["byoc"] == "none" and rights["shell_commands"] == "none", role
    resources = json.loads((layout.site / "local" / "resources.json").read_text())
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert resources["class_allow_list"] == list(CLASS_ALLOW_LIST)
    assert "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor" not in CLASS_ALLOW_LIST
    assert resources["allow_log_streaming"] is False
    filters = json.loads((layout.site / "local" / "privacy.json").read_text())["scopes"][0]["task_result_filters"]
    assert [f["path"].rsplit(".", 1)[-1] for f in filters] == ["PrivacyFloor", "PercentilePrivacy", "OutgoingLedger"]


def test_gate_waits_for_approval_bound_to_name_and_submitter(tmp_path: Path) -> None:
    layout = SiteLayout(tmp_path / "fl")
    layout.ensure()
    gate = SiteJobGate(str(layout.control))
    meta = {"job_id": "j1", "name": "fedavg", "submitter_name": "lead@x"}
    reason = gate.check("check_resources", meta, "lead@x")
    assert reason is not None and "waiting for approval" in reason
    assert Approvals(layout).pending()[0].job_id == "j1"
    assert gate.check("ls", {}, "admin") is not None and gate.check("shutdown", {}, "admin") is not None
    assert gate.check("check_status", {}, "admin") is None
    Approvals(layout).decide("j1", "approved", actor="alice")
    assert gate.check("check_resources", meta, "lead@x") is None
    assert not Approvals(layout).pending()
    assert gate.check("check_resources", {**meta, "name": "other"}, "lead@x") is not None
    Approvals(layout).decide("j2", "rejected", actor="alice", reason="no", name="x", submitter="y")
    assert "rejected" in str(gate.check("deploy_app", {"job_id": "j2", "name": "x", "submitter_name": "y"}, "y"))


def test_ledger_accepts_weights_and_metrics_only() -> None:
    weights = {"w": np.ones((3, 3), np.float32), "n": torch.tensor(4)}
    problems, summary = inspect_dxo("WEIGHTS", weights, {"NUM_STEPS_CURRENT_ROUND": 3,
                                                         "initial_metrics": {"dice": 0.5}})
    assert not problems and summary["variables"] == 2
    problems, _ = inspect_dxo("WEIGHTS", {"w": np.ones(3), "patient": "DOE^JOHN"}, {})
    assert any("patient" in p for p in problems)
    problems, _ = inspect_dxo("WEIGHTS", {"w": np.ones(3)}, {"note": "PatientName DOE^JOHN"})
    assert problems
    problems, _ = inspect_dxo("APP_DEFINED", {"w": np.ones(3)}, {})
    assert problems


def test_cohort_split_is_deterministic_and_grid_is_fixed() -> None:
    assert split_of("1.2.3", 0.25) == split_of("1.2.3", 0.25)
    assert {split_of(f"1.2.{i}", 0.5) for i in range(50)} == {"train", "val"}
    grid = to_grid(np.ones((2, 100, 50), np.float32), (4.0, 4.0), 8.0, 64, nearest=False)
    assert grid.shape == (2, 64, 64) and grid[0, 32, 32] == 1 and grid[0, 0, 0] == 0


def test_trainer_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        PorticoTrainer(model="../x")
    with pytest.raises(ValueError):
        PorticoTrainer(model="ct-body-composition", steps=0)
    trainer = PorticoTrainer(model="ct-body-composition", steps=5)
    assert trainer.steps == 5


def test_supervisor_refuses_without_a_kit(tmp_path: Path) -> None:
    with pytest.raises(NotEnrolledError):
        FLSupervisor(FLSettings(), tmp_path).start()


def test_process_tree_helpers(tmp_path: Path) -> None:
    parent = subprocess.Popen([PY, "-c", "import subprocess,sys,time; "
                               "subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)'], "
                               "start_new_session=True); time.sleep(60)"])
    try:
        import time

        deadline = time.monotonic() + 10
        while not descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = {parent.pid: 0, **descendants(parent.pid)}
        tree[parent.pid] = int(Path(f"/proc/{parent.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert len(tree) == 2
        assert kill_tree(tree, 2.0) == 2
        parent.wait(timeout=5)
        assert not descendants(parent.pid)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert job_id_of(["python", "-m", "nvflare.private.fed.app.client.worker_process", "-n", "abc"]) == "abc"
    assert job_id_of(["python", "x.py", "-n", "abc"]) is None


def test_cli_enrol_needs_a_fingerprint_and_audits_the_waiver(kits: Path, tmp_path: Path) -> None:
    from appliance.audit import AuditEvent
    from appliance.cli.fl import main
    from appliance.store import Store

    config = tmp_path / "portico.yaml"
    config.write_text(yaml.safe_dump({"mode": "dev", "storage": {"data_dir": str(tmp_path / "data"), "fsync": False},
                                      "inference": {"models_dir": str(tmp_path / "models")}}))
    assert main(["-c", str(config), "enrol", str(kits / "site-1")]) == 1
    assert main(["-c", str(config), "enrol", str(kits / "site-1"),
                 "--i-checked-the-server-fingerprint-otherwise"]) == 0
    store = Store(tmp_path / "data", fsync=False)
    try:
        events = {e["event"]: e["detail"] for e in store.audit_events()}
    finally:
        store.close()
    assert events[AuditEvent.FL_FINGERPRINT_WAIVED]["site"] == "site-1"
    assert events[AuditEvent.FL_ENROLLED]["fingerprint_checked"] is False
