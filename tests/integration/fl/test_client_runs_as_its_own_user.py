"""The NVFlare client in its own box: started by a root Portico, it runs as the FL user.

A real ``portico fl run`` as root (this machine's tests run as root; skipped otherwise) with a real
enrolled kit and a real labelled cohort; no federation server is needed (the client keeps trying to
connect). The client process's credentials are read from ``/proc/<pid>/status``; a probe process with
exactly those credentials then shows what the client can and cannot read. The FL user is
``nobody`` (present everywhere; creating a user on a shared test machine is not the test's to do).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from appliance.store import Store
from fl_client.kit import fingerprint
from fl_client.supervisor import descendants, kill_tree
from tests.integration.fl.harness import PY, REPO, Federation, env_for, make_base_package, phantom_studies
from tests.support.net import free_port
from tests.support.polling import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs a root Portico")]

FL_USER = "nobody"
SECRET = "box-test-secret-token-0123456789"


def _python_for(user: pwd.struct_passwd, root: Path) -> str:
    """An interpreter the FL user can run with this venv's packages: this one, or (where it lives under a
    folder the user cannot enter, e.g. pyenv in /root) a venv of the system's same-minor Python whose
    site-packages is this venv's (``fl.python`` is the setting for a separate interpreter)."""
    try:
        subprocess.run([PY, "-c", "import nvflare"], capture_output=True, timeout=120, check=True,
                       user=user.pw_uid, group=user.pw_gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"})
        return PY
    except (OSError, subprocess.CalledProcessError):
        pass
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not system.is_file():
        pytest.skip(f"the FL user cannot run {PY}, and there is no {system}")
    venv = root / "fl-venv"
    lib = venv / "lib" / system.name
    (venv / "bin").mkdir(parents=True)
    lib.mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(system)
    (lib / "site-packages").symlink_to(Path(sysconfig.get_paths()["purelib"]))
    (venv / "pyvenv.cfg").write_text(f"home = {system.parent}\ninclude-system-site-packages = false\n")
    for folder in (venv, venv / "bin", venv / "lib", lib):
        os.chmod(folder, 0o755)
    os.chmod(venv / "pyvenv.cfg", 0o644)
    return str(venv / "bin" / "python")


@pytest.fixture
def root() -> Iterator[Path]:
    """A folder the FL user can traverse to (pytest's own temporary root is root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="portico-box-"))
    os.chmod(folder, 0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ids(pid: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def _as(ids: dict[str, list[int]], path: Path) -> subprocess.CompletedProcess[str]:
    """``cat path`` with exactly the credentials ``ids`` (real = effective = saved, these groups only)."""
    return subprocess.run(["/bin/cat", str(path)], capture_output=True, text=True, errors="replace", timeout=30,
                          check=False,
                          user=ids["Uid"][0], group=ids["Gid"][0], extra_groups=ids["Groups"],
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


def test_a_root_portico_runs_nvflare_as_the_fl_user_who_reads_its_cohort_and_nothing_else(root: Path) -> None:
    user = pwd.getpwnam(FL_USER)
    fed = Federation(root / "federation", free_port())
    fed.root.mkdir()
    fed.provision(["site-a"])
    site = fed.add_site("site-a", {"enabled": True, "run_as": FL_USER, "stop_timeout_s": 5.0,
                                   "python": _python_for(user, root),
                                   "privacy": {"min_series": 1, "min_patients": 1}})
    config = yaml.safe_load(site.config.read_text())
    config["api"] = {"token": SECRET}
    site.config.write_text(yaml.safe_dump(config))
    os.chmod(site.config, 0o600)
    package = make_base_package(site.models_dir)
    os.chmod(site.models_dir, 0o700)  # as the appliance keeps it (the harness made it with the test's umask)
    store = Store(site.data_dir, fsync=False)
    phantom_studies(store, site.root / "work", package, [31, 32])
    instance = Path(store.instance_index()[0]["path"])
    store.close()
    root_ca = x509.load_pem_x509_certificate((site.kit / "startup" / "rootCA.pem").read_bytes())
    site.portico("fl", "enrol", str(site.kit), "--fingerprint", fingerprint(root_ca))

    log = (site.root / "portico-fl.log").open("ab")
    proc = subprocess.Popen([PY, "-m", "appliance", "fl", "-c", str(site.config), "run"], cwd=REPO,
                            env={**env_for(site.root), "PORTICO_API__TOKEN": SECRET}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fl = site.data_dir / "fl"
    known: dict[int, int] = {}
    try:
        def client_pid() -> int | None:
            sup = json.loads((fl / "portico" / "supervisor.json").read_text()) \
                if (fl / "portico" / "supervisor.json").is_file() else {}
            pid = sup.get("pid")
            return pid if isinstance(pid, int) and Path(f"/proc/{pid}").exists() else None

        try:
            pid = wait_for(lambda: client_pid() or proc.poll() is not None, 60, 0.5, "the NVFlare client")
        except AssertionError:
            pid = None
        logs = [site.root / "portico-fl.log", fl / "site" / "portico_client.log"]
        assert proc.poll() is None and isinstance(pid, int), \
            "\n".join(p.read_text()[-3000:] for p in logs if p.is_file())
        known.update(descendants(proc.pid))
        ids = _ids(pid)
        assert ids["Uid"] == [user.pw_uid] * 4 and ids["Gid"] == [user.pw_gid] * 4, ids
        assert ids["Groups"] in ([], [user.pw_gid]), ids  # root's supplementary groups are dropped
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert SECRET not in environ and "PORTICO_API" not in environ

        # NVFlare really runs in its box: its own workspace log, written as the FL user
        log_txt = fl / "site" / "log.txt"
        wait_for(lambda: log_txt.is_file() and log_txt.stat().st_size > 0, 120, 0.5, "NVFlare's log.txt")
        assert log_txt.stat().st_uid == user.pw_uid
        assert client_pid() == pid  # not crashed and restarted meanwhile

        # it reads its cohort (copies in its folder) and the staged model manifest ...
        index = json.loads((fl / "portico" / "cohorts" / "default.json").read_text())
        staged = Path(index["series"][0]["image_paths"][0])
        assert staged.is_relative_to(fl / "portico" / "cohorts" / "default.files")
        assert _as(ids, staged).returncode == 0
        site_json = json.loads((fl / "portico" / "site.json").read_text())
        manifests = list(Path(site_json["models_dir"]).glob("*/portico-model.yaml"))
        assert manifests and _as(ids, manifests[0]).returncode == 0
        # ... and nothing of the appliance's: not the configuration (the secret), the store's
        # instances, the database, the models folder
        for secret_path in (site.config, instance, next(site.data_dir.glob("*.sqlite3")),
                            next(site.models_dir.glob("*/model.onnx"))):
            probe = _as(ids, secret_path)
            assert probe.returncode != 0 and "Permission denied" in probe.stderr, (secret_path, probe)
        assert stat_mode(site.data_dir) & 0o007 == 0  # the data folder: no access for others
    finally:
        known.update(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        kill_tree(known, 5)
        log.close()
    assert not [p for p in descendants(1) if str(fl) in " ".join(_cmd(p))], "an NVFlare process outlived the stop"


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cmd(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
