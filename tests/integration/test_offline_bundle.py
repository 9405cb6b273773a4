"""An air-gapped site (issue #10): `make bundle` writes one archive, `make install-offline` installs from it with pip
--no-index into a fresh venv and apt from the bundle's folder, and the demo runs from that venv (which has no torch).

The bundle here is the demo's own (no extras) with one Debian package and its dependencies, to keep it small; the
apt side is checked as a simulation against an empty package database (every dependency must be in the bundle),
since a test must not change the machine's packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("make bundle copies the checkout with git ls-files: not a git checkout")
    if shutil.which("apt-get") is None:
        pytest.skip("make bundle downloads Debian packages: no apt-get here")
    out = tmp_path_factory.mktemp("bundle") / "portico-bundle.tar.gz"
    env = {**os.environ, "BUNDLE_EXTRAS": "", "BUNDLE_DEBS": "dcmtk"}
    proc = subprocess.run([str(SCRIPTS / "bundle.sh"), sys.executable, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        reachable = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "pydicom", "--retries", "0",
                                    "--timeout", "10"], capture_output=True, text=True, timeout=120)
        if reachable.returncode != 0:
            pytest.skip("no package index answers, so no bundle can be made: "
                        + (reachable.stderr.strip().splitlines() or ["?"])[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_bundle_holds_wheels_debs_models_and_the_source(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert any(n.startswith("portico-bundle/wheels/onnxruntime-") and n.endswith(".whl") for n in names)
    assert any(n.startswith("portico-bundle/wheels/setuptools-") for n in names)  # for the editable install
    assert not any("/wheels/torch-" in n or "/wheels/nvidia" in n for n in names)  # the demo's bundle: no torch
    assert any(n.startswith("portico-bundle/debs/dcmtk_") and n.endswith(".deb") for n in names)
    assert "portico-bundle/debs/Packages" in names
    assert "portico-bundle/src/models/ct-body-composition/portico-model.yaml" in names
    assert "portico-bundle/src/Makefile" in names and "portico-bundle/MANIFEST" in names
    assert not any(n.startswith(("portico-bundle/src/.venv/", "portico-bundle/src/build/")) for n in names)


def test_apt_installs_the_bundles_packages_from_its_folder_alone(bundle: Path, tmp_path: Path) -> None:
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    debs = tmp_path / "portico-bundle" / "debs"
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    (tmp_path / "cache" / "archives" / "partial").mkdir(parents=True)
    (tmp_path / "sources.list").write_text(f"deb [trusted=yes] file:{debs} ./\n")
    (tmp_path / "status").write_text("")  # a machine with nothing installed: every dependency must come along
    options = [f"-o=Dir::Etc::SourceList={tmp_path / 'sources.list'}", "-o=Dir::Etc::SourceParts=/dev/null",
               f"-o=Dir::State::Lists={tmp_path / 'lists'}", f"-o=Dir::Cache={tmp_path / 'cache'}",
               f"-o=Dir::State::status={tmp_path / 'status'}", "-o=APT::Get::List-Cleanup=0"]
    update = subprocess.run(["apt-get", "update", *options], capture_output=True, text=True, timeout=120)
    assert update.returncode == 0, update.stderr
    plan = subprocess.run(["apt-get", "install", "--simulate", "--no-install-recommends", *options, "dcmtk"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout[-2000:] + plan.stderr
    assert "Inst dcmtk " in plan.stdout


def test_install_offline_into_a_fresh_venv_then_the_demo(bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # a stock pip that may not reach any index: only the bundle's wheels
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(SCRIPTS / "install-offline.sh"), str(bundle), "--venv", str(venv), "--no-system"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (venv / ".installed").exists()
    python = venv / "bin" / "python"
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], env=env, capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "onnxruntime" in freeze and "torch" not in freeze and "nvidia" not in freeze

    demo = subprocess.run([str(python), "-m", "appliance", "demo", "--workdir", str(tmp_path / "demo"),
                           "--slices", "20"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "SEG + SR in PACS yes" in demo.stdout
