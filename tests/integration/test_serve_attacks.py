"""Issue #8's DICOM attacks, tried again against a running ``portico serve`` on loopback (bounded loops).

One service for the module, with a plain and a TLS listener. Strangers connect from 127.0.0.2 (on no
allow-list), a misbehaving allow-listed host from 127.0.0.3, the modality from 127.0.0.1. Each attack
must leave the service answering the modality and losing nothing it acknowledged. (The HTTP ones,
forged ``X-Forwarded-For``, the 2,000-part STOW-RS request, the stalled body and the bad study UID,
are in ``test_api_tls.py`` and ``test_stow_hostile.py``.)
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.demo import PorticoProcess, portico_config
from appliance.demo_study import write_ct_series
from appliance.settings import load_settings
from appliance.store import Store
from inference.phantom import make_phantom
from tests.conftest import REPO
from tests.support.certs import Pki, make_pki
from tests.support.net import free_port
from tests.support.peers import NOISY, STRANGER, connect, echo
from tests.support.polling import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")]

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


@dataclass
class Served:
    process: PorticoProcess
    config: Path
    port: int
    tls_port: int
    pki: Pki
    series: list[Path]

    def store(self) -> Store:
        return Store(load_settings(self.config).data_dir, fsync=False)

    def rss(self) -> int:
        assert self.process.pid is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("serve")
    pki = make_pki(workdir / "pki")
    port, tls_port = free_port(), free_port()
    router = {
        "peers": [{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]},
                  {"ae_title": "NOISY", "hosts": [NOISY]},
                  {"ae_title": "SECURE", "hosts": ["127.0.0.1"], "tls": "required"}],
        "tls": {"certificate": str(pki.server.cert), "private_key": str(pki.server.key),
                "ca_bundle": str(pki.ca.cert), "port": tls_port},
        "edge": {"associate_timeout": 2.0, "report_seconds": 1.0},
    }
    config = portico_config(workdir, port=port, orthanc_dicom_port=free_port(), models_dir=REPO / "models",
                            rules_file=REPO / "config" / "rules.yaml", quiet_seconds=600, extra={"router": router})
    phantom = make_phantom((6, 32, 32), spacing=(2.5, 1.4, 1.4), seed=8)
    series = write_ct_series(phantom.hu, phantom.spacing, workdir / "series", seed=8).paths
    process = PorticoProcess(config, port, workdir / "serve.log")
    process.start()
    try:
        done = storescu(port, "MODALITY", list(series))
        assert done.returncode == 0, done.stderr
        yield Served(process, config, port, tls_port, pki, list(series))
    finally:
        process.stop()


def storescu(port: int, calling: str, paths: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", *options, "-aet", calling, "-aec", "PORTICO", "127.0.0.1", str(port),
                           *map(str, paths)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
                          check=False)




def intact(served: Served) -> None:
    """The service answers the modality and still holds every instance it acknowledged."""
    assert echo(served.port, "MODALITY")
    store = served.store()
    try:
        assert store.instance_count() == len(served.series)
    finally:
        store.close()


def test_slow_connection_flood(served: Served) -> None:
    with ExitStack() as stack:
        for source in (STRANGER, NOISY):
            for _ in range(50):
                with suppress(OSError):  # a stranger's socket is closed at accept
                    stack.enter_context(connect(served.port, source)).sendall(b"\x01")
        assert echo(served.port, "MODALITY", timeout=2.0)  # answered within 2 s with 50 slow sockets open
    intact(served)


def test_oversized_associate_request(served: Served) -> None:
    before = served.rss()
    with connect(served.port, NOISY) as sock, suppress(OSError):
        sock.sendall(struct.pack(">BBL", 1, 0, 1 << 30))
        chunk = b"\0" * (1 << 20)
        for _ in range(400):
            sock.sendall(chunk)
    assert served.rss() - before < 50 << 20
    intact(served)


def test_plain_association_from_a_tls_required_peer(served: Served) -> None:
    done = subprocess.run(["echoscu", "-aet", "SECURE", "-aec", "PORTICO", "127.0.0.1", str(served.port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    wait_for(lambda: "[tls_required]" in served.log(), timeout=10, message="the refusal in the log")
    # over TLS, with a certificate from the trusted CA, the same peer gets in
    client = served.pki.client("modality-1")
    over_tls = subprocess.run(["echoscu", "+tls", str(client.key), str(client.cert), "+cf", str(served.pki.ca.cert),
                               "-aet", "SECURE", "-aec", "PORTICO", "127.0.0.1", str(served.tls_port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30, check=False)
    assert over_tls.returncode == 0, over_tls.stderr
    intact(served)


def test_refusals_are_audited_as_counts(served: Served) -> None:
    for _ in range(30):
        with suppress(OSError):
            connect(served.port, STRANGER).close()

    def refused_from_stranger() -> int:
        store = served.store()
        try:
            rows = [e for e in store.audit_events() if e["event"] == "connections_refused"
                    and e["actor"] == STRANGER and e["detail"]["reason"] == "unknown_address"]
        finally:
            store.close()
        return sum(int(e["detail"]["count"]) for e in rows) if len(rows) < 30 else -1

    wait_for(lambda: refused_from_stranger() >= 30, timeout=15, message="counted audit rows")
    intact(served)
