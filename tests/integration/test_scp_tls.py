"""The Storage SCP's DICOM TLS listener, against DCMTK's echoscu/storescu over TLS, on both reactors.

Certificates are made by the test (:mod:`tests.support.certs`). What must hold: a modality with a
certificate from the trusted CA stores over TLS; no certificate, a certificate from another CA, an
expired one, or one that is not the certificate bound to the calling AE title is refused, and the log
says which; a peer marked ``tls: required`` cannot associate in clear.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.demo_study import write_ct_series
from dicom_router.edge import Refusal
from dicom_router.scp import StorageSCP
from dicom_router.settings import DicomTlsSettings, Peer, RouterSettings, TlsMode
from inference.phantom import make_phantom
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.net import free_port
from tests.unit.dicom_router.memory_sink import FolderSink

pytestmark = pytest.mark.skipif(shutil.which("echoscu") is None, reason="DCMTK not installed")

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), clients=("portico", "modality-1", "modality-2"))


def tls_settings(pki: Pki, plain_port: int, tls_port: int) -> RouterSettings:
    return RouterSettings(
        ae_title="PORTICO", port=plain_port,
        tls=DicomTlsSettings(certificate=str(pki.server.cert), private_key=str(pki.server.key),
                             ca_bundle=str(pki.ca.cert), port=tls_port),
        peers=(
            Peer(ae_title="OPEN"),  # may use either port
            Peer(ae_title="SECURE", tls=TlsMode.REQUIRED),
            Peer(ae_title="BOUND", tls=TlsMode.REQUIRED,
                 certificate_fingerprint=pki.client("modality-1").fingerprint),
        ),
    )


class Listener:
    def __init__(self, scp: StorageSCP, sink: FolderSink, plain: int, tls: int) -> None:
        self.scp, self.sink, self.plain, self.tls = scp, sink, plain, tls


@pytest.fixture
def start(tmp_path: Path, pki: Pki) -> Iterator[Callable[[bool], Listener]]:
    started: list[StorageSCP] = []

    def make(event_driven: bool) -> Listener:
        plain, tls = free_port(), free_port()
        sink = FolderSink(tmp_path)
        scp = StorageSCP(tls_settings(pki, plain, tls), sink, event_driven=event_driven)
        scp.start()
        started.append(scp)
        return Listener(scp, sink, plain, tls)

    yield make
    for scp in started:
        scp.stop()


@pytest.fixture
def listener(start: Callable[[bool], Listener]) -> Listener:
    return start(True)


def dcmtk(tool: str, calling: str, port: int, *args: str, tls: CertFiles | None = None,
          ca: Path | None = None, files: list[Path] | None = None) -> subprocess.CompletedProcess[str]:
    options: list[str] = []
    if tls is not None:
        options += ["+tls", str(tls.key), str(tls.cert)]
    if ca is not None:
        options += ["+cf", str(ca)]
    command = [tool, *options, *args, "-aet", calling, "-aec", "PORTICO", "127.0.0.1", str(port),
               *map(str, files or [])]
    return subprocess.run(command, env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_a_modality_stores_a_series_over_tls(start: Callable[[bool], Listener], pki: Pki, tmp_path: Path,
                                             event_driven: bool) -> None:
    running = start(event_driven)
    phantom = make_phantom((4, 32, 32), spacing=(2.5, 1.4, 1.4), seed=5)
    series = write_ct_series(phantom.hu, phantom.spacing, tmp_path / "series", seed=5)
    done = dcmtk("storescu", "SECURE", running.tls, tls=pki.client("modality-2"), ca=pki.ca.cert,
                 files=list(series.paths))
    assert done.returncode == 0, done.stderr
    assert len(running.sink.instances) == len(series.paths)
    assert {i.calling_ae_title for i in running.sink.instances.values()} == {"SECURE"}


def test_an_open_peer_may_still_use_the_plain_port(listener: Listener) -> None:
    assert dcmtk("echoscu", "OPEN", listener.plain).returncode == 0


def refused_for(caplog: pytest.LogCaptureFixture, reason: Refusal) -> str:
    lines = [r.getMessage() for r in caplog.records if f"[{reason.value}]" in r.getMessage()]
    assert lines, f"no log line names {reason.value}: {caplog.text}"
    return lines[0]


def test_a_tls_required_peer_cannot_associate_in_clear(listener: Listener,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    done = dcmtk("echoscu", "SECURE", listener.plain)
    assert done.returncode != 0
    assert "Association Rejected" in done.stderr
    assert "SECURE" in refused_for(caplog, Refusal.TLS_REQUIRED)
    assert not listener.sink.instances


@pytest.mark.parametrize(
    ("who", "says"),
    [("none", "certificate"), ("wrong-ca", "certificate"), ("expired", "expired")],
)
def test_bad_client_certificates_are_refused_and_said_so(listener: Listener, pki: Pki, who: str, says: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    if who == "none":
        done = dcmtk("echoscu", "SECURE", listener.tls, "+tla", ca=pki.ca.cert)
    else:
        cert = pki.wrong_ca_client if who == "wrong-ca" else pki.expired_client
        done = dcmtk("echoscu", "SECURE", listener.tls, tls=cert, ca=pki.ca.cert)
    assert done.returncode != 0
    line = refused_for(caplog, Refusal.TLS_FAILED)
    assert says in line.lower()
    # the listener still serves a good peer
    assert dcmtk("echoscu", "SECURE", listener.tls, tls=pki.client("modality-2"), ca=pki.ca.cert).returncode == 0


def test_a_bound_ae_title_needs_its_own_certificate(listener: Listener, pki: Pki,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    other = dcmtk("echoscu", "BOUND", listener.tls, tls=pki.client("modality-2"), ca=pki.ca.cert)
    assert other.returncode != 0
    assert "Calling AE Title Not Recognized" in other.stderr
    assert "BOUND" in refused_for(caplog, Refusal.CERTIFICATE_MISMATCH)
    own = dcmtk("echoscu", "BOUND", listener.tls, tls=pki.client("modality-1"), ca=pki.ca.cert)
    assert own.returncode == 0, own.stderr


def test_a_server_certificate_the_modality_does_not_trust_fails_there(listener: Listener, pki: Pki) -> None:
    done = dcmtk("echoscu", "SECURE", listener.tls, tls=pki.client("modality-2"), ca=pki.other_ca.cert)
    assert done.returncode != 0


def test_plain_dicom_to_the_tls_port_is_refused(listener: Listener, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert dcmtk("echoscu", "OPEN", listener.tls, "-to", "5").returncode != 0
    refused_for(caplog, Refusal.TLS_FAILED)


def test_a_silent_tls_client_does_not_hold_up_the_listener(listener: Listener, pki: Pki,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom runs the handshake in the accepting thread; ours runs in the connection's, with a deadline."""
    caplog.set_level(logging.WARNING)
    silent = [socket.create_connection(("127.0.0.1", listener.tls), timeout=5) for _ in range(5)]
    try:
        done = dcmtk("echoscu", "SECURE", listener.tls, "-to", "5", tls=pki.client("modality-2"), ca=pki.ca.cert)
        assert done.returncode == 0, done.stderr
    finally:
        for sock in silent:
            sock.close()
