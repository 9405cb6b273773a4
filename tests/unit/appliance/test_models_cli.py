"""``portico models``: add, list, promote, enable/disable, verify, signatures; the registry's choices."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.audit import AuditEvent
from appliance.cli.models import main
from appliance.model_state import ModelStates, Role
from appliance.models import ModelRegistry
from appliance.store import Store
from inference.errors import PackageError
from inference.signing import generate_keypair
from tests.support.packages import FAT, TISSUE, make_package


class Appliance:
    """A config file, a models folder and a data folder in ``tmp_path``."""

    def __init__(self, tmp_path: Path, **inference: Any) -> None:
        self.tmp = tmp_path
        self.models_dir = tmp_path / "models"
        self.data_dir = tmp_path / "var"
        self.config = tmp_path / "portico.yaml"
        self.config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 0},
            "inference": {"models_dir": str(self.models_dir), **inference},
        }))

    def run(self, *argv: str) -> int:
        return main([*argv, "-c", str(self.config), "--log-level", "WARNING"])

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.models_dir, ModelStates.in_data_dir(self.data_dir))

    def events(self) -> list[dict[str, Any]]:
        store = Store(self.data_dir, fsync=False)
        try:
            return store.audit_events()
        finally:
            store.close()

    def package(self, version: str, **kwargs: Any) -> Path:
        return make_package(self.tmp / "src" / f"tiny-{version}-{len(list(self.tmp.glob('src/*')))}",
                            version, **kwargs)


@pytest.fixture
def app(tmp_path: Path) -> Appliance:
    return Appliance(tmp_path)


def test_add_promote_and_list(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    assert app.run("add", str(app.package("1.0.0"))) == 0
    assert "added tiny@1.0.0 as active" in capsys.readouterr().out
    assert app.run("add", str(app.package("1.1.0"))) == 0
    assert "added tiny@1.1.0 as candidate" in capsys.readouterr().out
    assert (app.models_dir / "tiny-1.0.0" / "model.onnx").is_file()
    assert (app.models_dir / "tiny-1.1.0" / "model.onnx").is_file()

    registry = app.registry()
    assert registry.get("tiny").manifest.version == "1.0.0"
    assert registry.get("tiny", "1.1.0").manifest.version == "1.1.0"  # a pinned candidate may run

    assert app.run("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("1.0.0" in line and " active " in line for line in lines)
    assert any("1.1.0" in line and " candidate " in line for line in lines)

    assert app.run("promote", "tiny@1.1.0") == 0
    assert "was 1.0.0" in capsys.readouterr().out
    assert registry.get("tiny").manifest.version == "1.1.0"
    roles = {s.version: s.role for s in ModelStates.in_data_dir(app.data_dir).versions("tiny")}
    assert roles == {"1.0.0": Role.CANDIDATE, "1.1.0": Role.ACTIVE}

    events = [(e["event"], e["detail"].get("version")) for e in app.events()]
    assert events == [(AuditEvent.MODEL_ADDED, "1.0.0"), (AuditEvent.MODEL_ADDED, "1.1.0"),
                      (AuditEvent.MODEL_PROMOTED, "1.1.0")]
    assert all(e["actor"].startswith("cli") for e in app.events())


def test_disable_refuses_at_get(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    app.run("add", str(app.package("1.0.0")))
    app.run("add", str(app.package("2.0.0")))
    assert app.run("disable", "tiny@1.0.0") == 0
    assert "warning: jobs that name tiny without a version will fail" in capsys.readouterr().out
    registry = app.registry()
    with pytest.raises(PackageError, match="disabled"):
        registry.get("tiny")
    with pytest.raises(PackageError, match="disabled"):
        registry.get("tiny", "1.0.0")
    assert registry.get("tiny", "2.0.0").manifest.version == "2.0.0"
    assert app.run("promote", "tiny@1.0.0") == 1  # a disabled version cannot be promoted
    assert app.run("enable", "tiny@1.0.0") == 0
    assert registry.get("tiny").manifest.version == "1.0.0"
    kinds = [e["event"] for e in app.events()]
    assert kinds.count(AuditEvent.MODEL_DISABLED) == 1 and kinds.count(AuditEvent.MODEL_ENABLED) == 1


def test_same_add_twice_is_no_change_and_different_is_refused(app: Appliance) -> None:
    source = app.package("1.0.0")
    assert app.run("add", str(source)) == 0
    assert app.run("add", str(source)) == 0
    assert app.run("add", str(app.package("1.0.0", card="# Other\n"))) == 1
    events = [e["event"] for e in app.events()]
    assert events == [AuditEvent.MODEL_ADDED, AuditEvent.MODEL_REFUSED]
    assert "immutable" in app.events()[-1]["detail"]["reason"]


def test_removed_folder_is_reinstalled_only_as_the_same_package(app: Appliance,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    source = app.package("1.0.0")
    app.run("add", str(source))
    shutil.rmtree(app.models_dir / "tiny-1.0.0")
    assert app.run("list") == 0
    assert "(not installed)" in capsys.readouterr().out
    with pytest.raises(PackageError, match="not installed"):
        app.registry().get("tiny")
    assert app.run("add", str(app.package("1.0.0", card="# Other\n"))) == 1
    assert app.run("add", str(source)) == 0
    assert app.registry().get("tiny").manifest.version == "1.0.0"
    assert app.events()[-1]["detail"]["how"] == "reinstalled"


def test_add_refuses_tampered_and_leaves_nothing(app: Appliance) -> None:
    source = app.package("1.0.0")
    (source / "LICENSE").write_text("changed\n")
    assert app.run("add", str(source)) == 1
    assert not app.models_dir.exists() or not any(app.models_dir.iterdir())
    assert app.events()[-1]["event"] == AuditEvent.MODEL_REFUSED


def test_add_zip(app: Appliance) -> None:
    source = app.package("1.0.0")
    archive = app.tmp / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.iterdir():
            zf.write(path, f"tiny/{path.name}")
    assert app.run("add", str(archive)) == 0
    assert app.registry().get("tiny").manifest.version == "1.0.0"


def test_add_zip_escaping_refused(app: Appliance) -> None:
    archive = app.tmp / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    assert app.run("add", str(archive)) == 1
    assert not (app.tmp / "evil.txt").exists() and not (app.tmp.parent / "evil.txt").exists()


def test_unrecorded_names_run_their_highest_version(app: Appliance,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped demo model needs no setup; adding a version later does not change what runs."""
    make_package(app.models_dir / "demo-a", "1.0.0")
    make_package(app.models_dir / "demo-b", "1.2.0")
    assert app.registry().get("tiny").manifest.version == "1.2.0"
    assert ModelRegistry(app.models_dir).get("tiny").manifest.version == "1.2.0"  # no state at all
    assert app.run("list") == 0
    out = capsys.readouterr().out
    assert "active*" in out and "no state recorded" in out

    assert app.run("add", str(app.package("2.0.0"))) == 0
    assert "as candidate" in capsys.readouterr().out
    registry = app.registry()
    assert registry.get("tiny").manifest.version == "1.2.0"
    adopted = [e for e in app.events() if e["detail"].get("how") == "adopted"]
    assert {e["detail"]["version"] for e in adopted} == {"1.0.0", "1.2.0"}
    assert app.run("promote", "tiny@2.0.0") == 0
    assert registry.get("tiny").manifest.version == "2.0.0"


def test_unrecorded_default_skips_candidates_and_prereleases(app: Appliance,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A federated export dropped next to the shipped model does not start running by itself."""
    make_package(app.models_dir / "base", "1.0.0")
    make_package(app.models_dir / "fl", "1.0.1-fl.job1", provenance={"status": "candidate"})
    make_package(app.models_dir / "rc", "1.1.0-rc1")
    make_package(app.models_dir / "marked", "1.2.0", provenance={"status": "candidate"})
    registry = app.registry()
    assert registry.get("tiny").manifest.version == "1.0.0"
    assert registry.get("tiny", "1.0.1-fl.job1").manifest.version == "1.0.1-fl.job1"
    assert app.run("promote", "tiny@1.0.1-fl.job1") == 0
    assert registry.get("tiny").manifest.version == "1.0.1-fl.job1"
    roles = {s.version: s.role for s in ModelStates.in_data_dir(app.data_dir).versions("tiny")}
    assert roles == {"1.0.0": Role.CANDIDATE, "1.0.1-fl.job1": Role.ACTIVE, "1.1.0-rc1": Role.CANDIDATE,
                     "1.2.0": Role.CANDIDATE}


def test_only_candidates_installed_runs_nothing(app: Appliance) -> None:
    make_package(app.models_dir / "fl", "1.0.1-fl.job1", provenance={"status": "candidate"})
    with pytest.raises(PackageError, match="only candidate or pre-release"):
        app.registry().get("tiny")


def test_verify_and_tamper_after_install(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    app.run("add", str(app.package("1.0.0")))
    assert app.run("verify") == 0
    assert app.run("verify", "tiny@1.0.0") == 0
    assert app.run("verify", "tiny") == 0
    assert "OK      tiny@1.0.0" in capsys.readouterr().out
    (app.models_dir / "tiny-1.0.0" / "model.onnx").write_bytes(b"swapped")
    assert app.run("verify", "tiny") == 1
    assert "does not match its sha256" in capsys.readouterr().out
    assert app.events()[-1]["event"] == AuditEvent.MODEL_REFUSED
    with pytest.raises(PackageError, match="sha256"):
        app.registry().get("tiny")
    assert app.run("verify", "nosuch") == 1


def test_verify_path(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    source = app.package("1.0.0")
    assert app.run("verify", str(source)) == 0
    (source / "extra.bin").write_bytes(b"?")
    assert app.run("verify", str(source)) == 1
    assert "not listed in the manifest" in capsys.readouterr().out


def test_registry_verifies_once_per_process_and_again_when_changed(app: Appliance) -> None:
    app.run("add", str(app.package("1.0.0")))
    registry = app.registry()
    first = registry.get("tiny")
    assert registry.get("tiny") is first
    folder = app.models_dir / "tiny-1.0.0"
    (folder / "MODEL_CARD.md").write_text("# changed\n")
    assert registry.get("tiny") is first  # verified at first load only
    manifest = yaml.safe_load((folder / "portico-model.yaml").read_text())
    manifest["title"] = "Changed"
    (folder / "portico-model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(PackageError, match="sha256"):  # a new manifest is verified afresh
        registry.get("tiny")


def test_signatures_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    plain = Appliance(tmp_path)
    assert plain.run("keygen", str(keys)) == 0
    public = (keys / "portico-signing.pub").read_text()
    app = Appliance(tmp_path, trusted_keys=[public], require_signatures=True)
    source = app.package("1.0.0")
    assert app.run("add", str(source)) == 1
    assert "unsigned" in capsys.readouterr().out
    assert app.run("sign", str(source), "--key", str(keys / "portico-signing.key")) == 0
    assert app.run("add", str(source)) == 0
    assert (app.models_dir / "tiny-1.0.0" / "signature.ed25519").is_file()
    added = [e for e in app.events() if e["event"] == AuditEvent.MODEL_ADDED]
    assert added[0]["detail"]["signed_by"]
    settings_registry = ModelRegistry(app.models_dir, ModelStates.in_data_dir(app.data_dir),
                                      trusted_keys=[public], require_signature=True)
    assert settings_registry.get("tiny").signed_by
    other = generate_keypair()[0]
    (keys / "other.key").write_bytes(other)
    second = app.package("1.1.0")
    app.run("sign", str(second), "--key", str(keys / "other.key"))
    assert app.run("add", str(second)) == 1
    assert "does not verify with any trusted key" in capsys.readouterr().out
    assert plain.run("keygen", str(keys)) == 1  # never overwrites a key


def make_bundle(app: Appliance) -> Path:
    bundle = app.tmp / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "LICENSE").write_text("Apache-2.0\n")
    meta = {"name": "Fat model", "version": "0.1.0",
            "network_data_format": {
                "inputs": {"image": {"modality": "CT", "num_channels": 1, "spatial_shape": [8, 8, 4]}},
                "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "fat"}}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(make_package(app.tmp / "net") / "model.onnx", bundle / "models" / "model.onnx")
    return bundle


def test_add_bundle(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    segments = app.tmp / "segments.yaml"
    segments.write_text(yaml.safe_dump({"segments": [
        {"label": 1, "name": "Fat", "category": TISSUE.model_dump(), "type": FAT.model_dump()}]}))
    argv = ["add", str(make_bundle(app)), "--bundle", "--window", "-150", "-50", "--segments", str(segments)]
    assert app.run(*argv) == 0
    out = capsys.readouterr().out
    assert "imported bundle as fat-model@0.1.0 (segment codes: overrides)" in out
    package = app.registry().get("fat-model")
    assert package.manifest.input.patch_size == (4, 8, 8)
    assert package.manifest.output.segments[0].type == FAT


def test_import_review_then_add(app: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = app.tmp / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"name": "fat", "intensity": {"low": -150, "high": -50},
                                         "body_parts": ["ABDOMEN"]}))
    out = app.tmp / "converted"
    bundle = make_bundle(app)
    argv = ["import", str(bundle), str(out), "--overrides", str(overrides), "--model-version", "2.0.0"]
    assert app.run(*argv) == 0
    assert "placeholder" in capsys.readouterr().out
    assert app.run("add", str(out)) == 0
    package = app.registry().get("fat")
    assert package.ref == "fat@2.0.0" and package.manifest.input.body_parts == ("ABDOMEN",)
    assert app.run("import", str(bundle), str(app.tmp / "again")) == 1  # no window anywhere
    assert "window" in capsys.readouterr().out


def test_usage_errors(app: Appliance) -> None:
    with pytest.raises(SystemExit):
        app.run("promote")
    assert app.run("promote", "tiny") == 1  # needs NAME@VERSION
    assert app.run("promote", "tiny@9.9.9") == 1
