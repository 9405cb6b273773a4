"""DICOM TLS on our outgoing links, against real peers on loopback: DCMTK ``storescp +tls`` and Orthanc
with ``DicomTlsEnabled``, as destinations and as the PACS we ask for a study's instance count.

Refusals must fail cleanly, be retried, and say why: a certificate from a CA we do not trust, an
expired one, a destination that wants our client certificate when we have none, plain DICOM to a
TLS-only port.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from pydicom import dcmread

from appliance.demo_study import write_ct_series
from appliance.handoff import HandOff
from appliance.pacs_standin import OrthancStandIn, OrthancTls
from appliance.store import Store
from dicom_router.assembly import count_study_instances
from dicom_router.dispatch import Dispatcher, echo, send_files
from dicom_router.rules import RuleSet
from dicom_router.settings import (
    DicomTlsSettings,
    DimseDestination,
    DispatchSettings,
    Peer,
    RouterSettings,
    TlsMode,
)
from dicom_router.tls import client_context
from inference.phantom import make_phantom
from tests.integration.test_dispatch import MemoryOutbox
from tests.support.certs import CertFiles, Pki, make_pki
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK not installed")

CALLING = "PORTICO"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = make_phantom((3, 32, 32), spacing=(2.5, 1.4, 1.4), seed=7)
    return write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp("ct"), seed=13).paths


def router_tls(pki: Pki, **options: object) -> DicomTlsSettings:
    """Our identity: the ``portico`` client certificate, trusting the test CA."""
    values: dict[str, object] = {"certificate": str(pki.clients["portico"].cert),
                                 "private_key": str(pki.clients["portico"].key), "ca_bundle": str(pki.ca.cert),
                                 "require_client_certificate": True, **options}
    return DicomTlsSettings.model_validate(values)


def tls_destination(name: str, ae_title: str, port: int, **options: object) -> DimseDestination:
    values: dict[str, object] = {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port,
                                 "tls": "required", **options}
    return DimseDestination.model_validate(values)


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- DCMTK storescp with TLS ------------------------------------------------------------------------

@dataclass
class TlsStoreSCP:
    port: int
    folder: Path
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, server: CertFiles, ca: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TCP_NODELAY="1")
        # +tls KEY CERT: our server identity; +cf: trusted CA; client certificate required (-rc default)
        with self.log.open("ab") as log:
            self.procs.append(subprocess.Popen(
                ["storescp", "+tls", str(server.key), str(server.cert), "+cf", str(ca),
                 "-aet", "STORESCP", "-od", str(self.folder), str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: port_open(self.port), timeout=15, message="storescp +tls to listen")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def storescp_tls(tmp_path: Path) -> Iterator[TlsStoreSCP]:
    scp = TlsStoreSCP(free_port(), tmp_path / "storescp", tmp_path / "storescp.log")
    yield scp
    scp.stop()


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_dispatch_over_tls_to_storescp(storescp_tls: TlsStoreSCP, pki: Pki, files: list[Path],
                                       event_driven: bool) -> None:
    storescp_tls.start(pki.server, pki.ca.cert)
    destination = tls_destination("pacs", "STORESCP", storescp_tls.port)
    outbox = MemoryOutbox()
    for path in files:
        outbox.add("pacs", path)
    dispatcher = Dispatcher(DispatchSettings(destinations=(destination,)), outbox, CALLING, tls=router_tls(pki),
                            event_driven=event_driven)
    assert dispatcher.run_once() == len(files)
    assert all(e.state == "sent" and e.sent == 1 for e in outbox.entries.values()), \
        [e.failures for e in outbox.entries.values()]
    assert {sop_uid(p) for p in storescp_tls.received()} == {sop_uid(p) for p in files}

    assert echo(destination, CALLING, timeout=5, tls=router_tls(pki), event_driven=event_driven) is True
    # the certificate names "localhost" too; a name it does not carry is refused
    assert echo(tls_destination("pacs", "STORESCP", storescp_tls.port, server_hostname="localhost"), CALLING,
                timeout=5, tls=router_tls(pki)) is True
    results = send_files(tls_destination("pacs", "STORESCP", storescp_tls.port, server_hostname="pacs.example"),
                         files[:1], CALLING, timeout=5, tls=router_tls(pki))
    assert not results[0].ok and "Hostname mismatch" in (results[0].error or "")


@pytest.mark.parametrize(("server", "reason"), [
    ("wrong_ca_server", "certificate verify failed: unable to get local issuer certificate"),
    ("expired_server", "certificate verify failed: certificate has expired"),
])
def test_untrusted_destination_certificate_is_refused(storescp_tls: TlsStoreSCP, pki: Pki, files: list[Path],
                                                      server: str, reason: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    storescp_tls.start(getattr(pki, server), pki.ca.cert)
    outbox = MemoryOutbox()
    item = outbox.add("pacs", files[0])
    dispatcher = Dispatcher(DispatchSettings(destinations=(tls_destination("pacs", "STORESCP", storescp_tls.port),)),
                            outbox, CALLING, tls=router_tls(pki), timeout=5)
    with caplog.at_level(logging.WARNING, logger="dicom_router.dispatch"):
        dispatcher.run_once()
    error, _, permanent = outbox.entries[item].failures[0]
    assert error == f"association failed over TLS: {reason}"
    assert not permanent and outbox.entries[item].state == "pending"  # retried: certificates get fixed
    assert any(reason in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert storescp_tls.received() == []


def test_destination_wants_our_certificate(storescp_tls: TlsStoreSCP, pki: Pki, files: list[Path]) -> None:
    storescp_tls.start(pki.server, pki.ca.cert)
    destination = tls_destination("pacs", "STORESCP", storescp_tls.port, ca_bundle=str(pki.ca.cert))
    # no router.tls: server authentication only, no client certificate to present
    results = send_files(destination, files[:1], CALLING, timeout=5)
    assert not results[0].ok and not results[0].permanent
    assert "client certificate" in (results[0].error or ""), results[0].error
    # a client certificate from a CA the destination does not trust
    wrong = pki.wrong_ca_client
    results = send_files(destination, files[:1], CALLING, timeout=5,
                         tls=router_tls(pki, certificate=str(wrong.cert), private_key=str(wrong.key)))
    assert not results[0].ok and "unknown CA" in (results[0].error or ""), results[0].error
    assert storescp_tls.received() == []


def test_tls_to_a_plain_port_fails_cleanly(tmp_path: Path, pki: Pki, files: list[Path]) -> None:
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(tmp_path), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=15, message="storescp to listen")
        started = time.monotonic()
        results = send_files(tls_destination("plain", "STORESCP", port), files[:1], CALLING, timeout=5,
                             tls=router_tls(pki))
        assert time.monotonic() - started < 10
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not results[0].ok and not results[0].permanent
    assert results[0].error == ("association failed over TLS: the peer closed the connection during the TLS "
                                "handshake (not a DICOM TLS port?)"), results[0].error


def test_broken_tls_files_fail_items_retryably(pki: Pki, files: list[Path], tmp_path: Path) -> None:
    outbox = MemoryOutbox()
    item = outbox.add("pacs", files[0])
    broken = router_tls(pki, private_key=str(tmp_path / "missing.key"))
    dispatcher = Dispatcher(DispatchSettings(destinations=(tls_destination("pacs", "STORESCP", free_port()),)),
                            outbox, CALLING, tls=broken)
    dispatcher.run_once()
    error, _, permanent = outbox.entries[item].failures[0]
    assert error.startswith("TLS configuration: router.tls.private_key") and "no such file" in error
    assert not permanent
    assert echo(tls_destination("pacs", "STORESCP", free_port()), CALLING, tls=broken) is False


# --- Orthanc with DICOM TLS ----------------------------------------------------------------------------

@pytest.fixture
def tls_orthanc(tmp_path: Path, pki: Pki) -> Iterator[Callable[[], OrthancStandIn]]:
    if shutil.which("Orthanc") is None:
        pytest.fail("Orthanc is not installed: run `make setup` (Debian package orthanc)")
    started: list[OrthancStandIn] = []

    def make() -> OrthancStandIn:
        standin = OrthancStandIn(tmp_path / "orthanc", free_port(), free_port(),
                                 tls=OrthancTls(pki.server.cert, pki.server.key, pki.ca.cert))
        started.append(standin)
        standin.start()
        return standin

    yield make
    for standin in started:
        standin.stop()


@pytest.mark.parametrize("event_driven", [True, False], ids=["event-driven", "stock-pynetdicom"])
def test_orthanc_over_tls_destination_and_count(tls_orthanc: Callable[[], OrthancStandIn], pki: Pki,
                                                files: list[Path], event_driven: bool) -> None:
    orthanc = tls_orthanc()
    destination = tls_destination("orthanc", "ORTHANC", orthanc.dicom_port)
    outbox = MemoryOutbox()
    for path in files:
        outbox.add("orthanc", path)
    Dispatcher(DispatchSettings(destinations=(destination,)), outbox, CALLING, tls=router_tls(pki),
               event_driven=event_driven).run_once()
    assert all(e.state == "sent" for e in outbox.entries.values()), [e.failures for e in outbox.entries.values()]
    assert len(orthanc.request("GET", "/instances")) == len(files)

    # the completeness C-FIND, over TLS, answers the study's instance count
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    peer = Peer(ae_title="ORTHANC", query_host="127.0.0.1", query_port=orthanc.dicom_port, tls=TlsMode.REQUIRED)
    assert count_study_instances(peer, CALLING, study_uid, timeout=5, tls=router_tls(pki),
                                 event_driven=event_driven) == len(files)
    # as the hand-off asks: with a context built once
    context = client_context(router_tls(pki))
    assert count_study_instances(peer, CALLING, study_uid, timeout=5, context=context) == len(files)
    # without our client certificate Orthanc refuses; with broken TLS files nothing is tried
    assert count_study_instances(peer, CALLING, study_uid, timeout=5,
                                 context=client_context(None, str(pki.ca.cert))) is None
    broken = router_tls(pki, certificate=str(pki.folder / "absent.pem"))
    assert count_study_instances(peer, CALLING, study_uid, timeout=5, tls=broken) is None
    # the hand-off builds its context from router.tls once and reuses it
    handoff = HandOff(cast(Store, None), RouterSettings(tls=router_tls(pki), peers=(peer,)), cast(RuleSet, None))
    assert handoff._count(peer, study_uid) == len(files)
    assert handoff._tls_context is not None
    context_built = handoff._tls_context
    assert handoff._count(peer, study_uid) == len(files) and handoff._tls_context is context_built
    # a plain C-FIND to the TLS-only port: no count, no hang
    plain_peer = Peer(ae_title="ORTHANC", query_host="127.0.0.1", query_port=orthanc.dicom_port)
    started = time.monotonic()
    assert count_study_instances(plain_peer, CALLING, study_uid, timeout=5) is None
    assert time.monotonic() - started < 10

    # a plain destination against the TLS-only port fails cleanly, to be retried
    plain = DimseDestination(name="orthanc", ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    started = time.monotonic()
    results = send_files(plain, files[:1], CALLING, timeout=5)
    assert not results[0].ok and not results[0].permanent
    assert "a DICOM TLS port?" in (results[0].error or ""), results[0].error
    assert time.monotonic() - started < 10
    assert echo(plain, CALLING, timeout=5) is False
