"""Dispatch to real receivers on localhost: DCMTK storescp, our own SCP (for failure statuses) and a
small STOW-RS endpoint; a destination that is down, then up, gets every item exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset

from appliance.demo_study import write_ct_series
from dicom_router.dispatch import (
    Dispatcher,
    backoff_seconds,
    echo,
    is_permanent_status,
    send_files,
    stow_url,
)
from dicom_router.ports import OutboxItem
from dicom_router.scp import StorageSCP
from dicom_router.settings import DimseDestination, DispatchSettings, Peer, RouterSettings, StowDestination
from inference.phantom import make_phantom
from tests.support.net import free_port, port_open
from tests.support.polling import wait_for
from tests.unit.dicom_router.memory_sink import FolderSink

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK not installed")

CALLING = "PORTICO"


# --- an outbox with a clock the test turns ------------------------------------------------------

@dataclass
class Entry:
    item: OutboxItem
    due_at: float = 0.0
    sent: int = 0
    state: str = "pending"
    failures: list[tuple[str, float, bool]] = field(default_factory=list)


class MemoryOutbox:
    def __init__(self) -> None:
        self.now = 0.0
        self.entries: dict[int, Entry] = {}

    def add(self, destination: str, path: Path) -> int:
        ds = dcmread(path, stop_before_pixels=True)
        item_id = len(self.entries) + 1
        self.entries[item_id] = Entry(OutboxItem(item_id, destination, path, str(ds.SOPClassUID),
                                                 str(ds.SOPInstanceUID), 0))
        return item_id

    def due(self, limit: int) -> list[OutboxItem]:
        ready = [e.item for e in self.entries.values() if e.state == "pending" and e.due_at <= self.now]
        return ready[:limit]

    def mark_sent(self, item_id: int) -> None:
        entry = self.entries[item_id]
        entry.sent += 1
        entry.state = "sent"

    def mark_failed(self, item_id: int, error: str, retry_in_seconds: float, permanent: bool) -> None:
        entry = self.entries[item_id]
        entry.failures.append((error, retry_in_seconds, permanent))
        entry.state = "dead" if permanent else "pending"
        entry.due_at = self.now + retry_in_seconds
        old = entry.item
        entry.item = OutboxItem(old.id, old.destination, old.path, old.sop_class_uid, old.sop_instance_uid,
                                old.attempts + 1)


# --- receivers ----------------------------------------------------------------------------------

@dataclass
class StoreSCP:
    port: int
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(self.folder), str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), timeout=15, message="storescp to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(free_port(), tmp_path / "storescp")
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = make_phantom((4, 64, 64), spacing=(2.5, 1.4, 1.4), seed=5)
    folder = tmp_path_factory.mktemp("results")
    paths = write_ct_series(phantom.hu, phantom.spacing, folder, seed=11).paths
    # a second SOP class in the batch: a small Basic Text SR
    sr = Dataset()
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr_path = folder / "SR.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    return [*paths, sr_path]


def dimse(name: str, port: int) -> DimseDestination:
    return DimseDestination(name=name, ae_title="STORESCP", host="127.0.0.1", port=port)


def settings_with(*destinations: DimseDestination | StowDestination) -> DispatchSettings:
    return DispatchSettings(destinations=destinations, retry_initial_seconds=2, retry_max_seconds=5)


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- tests --------------------------------------------------------------------------------------

def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, 2, 300) for n in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff_seconds(10_000, 2, 300) == 300


def test_permanent_statuses() -> None:
    assert is_permanent_status(0xA900) and is_permanent_status(0xC210) and is_permanent_status(0x0122)
    assert not is_permanent_status(0xA700) and not is_permanent_status(0x0110)


def test_dispatch_to_storescp(storescp: StoreSCP, files: list[Path]) -> None:
    storescp.start()
    outbox = MemoryOutbox()
    for path in files:
        outbox.add("pacs", path)
    dispatcher = Dispatcher(settings_with(dimse("pacs", storescp.port)), outbox, CALLING)
    assert dispatcher.run_once() == len(files)
    assert all(e.state == "sent" and e.sent == 1 for e in outbox.entries.values())
    received = storescp.received()
    assert len(received) == len(files)
    assert {sop_uid(p) for p in received} == {sop_uid(p) for p in files}
    # sent as stored: the dataset bytes arrive unchanged
    by_uid = {sop_uid(p): p for p in files}
    for path in received:
        _, offset = split_dataset(path)
        original = by_uid[sop_uid(path)]
        _, original_offset = split_dataset(original)
        assert path.read_bytes()[offset:] == original.read_bytes()[original_offset:]
    assert dispatcher.run_once() == 0


def test_destination_down_then_up_delivers_exactly_once(storescp: StoreSCP, files: list[Path]) -> None:
    outbox = MemoryOutbox()
    for path in files[:3]:
        outbox.add("pacs", path)
    dispatcher = Dispatcher(settings_with(dimse("pacs", storescp.port)), outbox, CALLING, timeout=5)

    assert dispatcher.run_once() == 3  # nobody listens yet
    assert all(e.failures[-1][1:] == (2.0, False) for e in outbox.entries.values())
    assert dispatcher.run_once() == 0  # not due before the backoff has passed
    outbox.now += 2
    assert dispatcher.run_once() == 3
    assert all([f[1] for f in e.failures] == [2.0, 4.0] for e in outbox.entries.values())
    outbox.now += 4
    assert dispatcher.run_once() == 3
    assert all([f[1] for f in e.failures] == [2.0, 4.0, 5.0] for e in outbox.entries.values())  # capped

    storescp.start()
    outbox.now += 5
    assert dispatcher.run_once() == 3
    assert all(e.state == "sent" and e.sent == 1 for e in outbox.entries.values())
    outbox.now += 1000
    assert dispatcher.run_once() == 0
    assert len(storescp.received()) == 3


def test_unknown_destination_and_missing_file_are_permanent(storescp: StoreSCP, files: list[Path],
                                                            tmp_path: Path) -> None:
    storescp.start()
    outbox = MemoryOutbox()
    lost = outbox.add("nowhere", files[0])
    gone_path = tmp_path / "gone.dcm"
    shutil.copy(files[1], gone_path)
    gone = outbox.add("pacs", gone_path)
    gone_path.unlink()
    fine = outbox.add("pacs", files[2])
    Dispatcher(settings_with(dimse("pacs", storescp.port)), outbox, CALLING).run_once()
    assert outbox.entries[lost].state == "dead" and "unknown destination" in outbox.entries[lost].failures[0][0]
    assert outbox.entries[gone].state == "dead" and "missing" in outbox.entries[gone].failures[0][0]
    assert outbox.entries[fine].state == "sent"


@pytest.fixture
def our_scp(tmp_path: Path) -> Iterator[tuple[StorageSCP, FolderSink, int]]:
    port = free_port()
    sink = FolderSink(tmp_path / "ours")
    sink.root.mkdir()
    scp = StorageSCP(RouterSettings(ae_title="STORESCP", port=port, peers=(Peer(ae_title=CALLING),)), sink)
    scp.start()
    yield scp, sink, port
    scp.stop()


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_failure_statuses_permanent_or_retried(our_scp: tuple[StorageSCP, FolderSink, int],
                                               files: list[Path], tmp_path: Path) -> None:
    _, sink, port = our_scp
    _, offset = split_dataset(files[0])
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(files[0].read_bytes()[:offset] + b"\x01\x02\x03" * 500)
    outbox = MemoryOutbox()
    bad = outbox.add("ours", files[0])
    outbox.entries[bad].item = OutboxItem(bad, "ours", broken, outbox.entries[bad].item.sop_class_uid,
                                          outbox.entries[bad].item.sop_instance_uid, 0)
    good = outbox.add("ours", files[1])
    dispatcher = Dispatcher(settings_with(dimse("ours", port)), outbox, CALLING)
    dispatcher.run_once()
    error, _, permanent = outbox.entries[bad].failures[0]
    assert permanent and "0xC2" in error
    assert outbox.entries[good].state == "sent"

    sink.full = True  # 0xA700: worth retrying
    full = outbox.add("ours", files[2])
    dispatcher.run_once()
    error, retry, permanent = outbox.entries[full].failures[0]
    assert not permanent and "0xA700" in error and retry == 2.0
    sink.full = False
    outbox.now += 2
    dispatcher.run_once()
    assert outbox.entries[full].state == "sent"


def test_send_files_and_echo(storescp: StoreSCP, files: list[Path], tmp_path: Path) -> None:
    destination = dimse("pacs", storescp.port)
    assert echo(destination, CALLING, timeout=5) is False  # not started yet
    storescp.start()
    assert echo(destination, CALLING, timeout=5) is True
    junk = tmp_path / "junk.txt"
    junk.write_text("not dicom")
    results = send_files(destination, [files[0], junk, files[-1]], CALLING)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].permanent and results[1].path == junk
    assert results[0].status == 0 and results[0].sop_instance_uid == sop_uid(files[0])
    assert len(storescp.received()) == 2


# --- STOW-RS --------------------------------------------------------------------------------------

@dataclass
class StowServer:
    status: int = 200
    failed_uid: str | None = None
    requests: list[tuple[str, str, list[bytes]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"


@pytest.fixture
def stow() -> Iterator[StowServer]:
    state = StowServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            content_type = str(self.headers["Content-Type"])
            message = BytesParser(policy=HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body)
            parts = [bytes(part.get_payload(decode=True)) for part in message.iter_parts()]
            state.requests.append((self.path, content_type, parts))
            payload: dict[str, object] = {}
            if state.failed_uid:
                payload["00081198"] = {"vr": "SQ", "Value": [{
                    "00081155": {"vr": "UI", "Value": [state.failed_uid]},
                    "00081197": {"vr": "US", "Value": [0xA900]},
                }]}
            data = json.dumps(payload).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    state.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.server.shutdown()
    state.server.server_close()
    thread.join(timeout=5)


def test_stow_url() -> None:
    assert stow_url(StowDestination(name="a", url="http://x/dicom-web/")) == "http://x/dicom-web/studies"
    assert stow_url(StowDestination(name="a", url="http://x/studies")) == "http://x/studies"


def test_stow_rs_multipart_and_partial_failure(stow: StowServer, files: list[Path]) -> None:
    outbox = MemoryOutbox()
    ids = [outbox.add("web", p) for p in files[:3]]
    dispatcher = Dispatcher(settings_with(StowDestination(name="web", url=stow.url)), outbox, CALLING)
    assert dispatcher.run_once() == 3
    (path, content_type, parts) = stow.requests[0]
    assert path == "/dicom-web/studies"
    assert 'type="application/dicom"' in content_type and "multipart/related" in content_type
    assert parts == [p.read_bytes() for p in files[:3]]
    assert all(outbox.entries[i].state == "sent" for i in ids)

    stow.status, stow.failed_uid = 202, sop_uid(files[3])
    more = [outbox.add("web", p) for p in files[3:5]]
    dispatcher.run_once()
    assert outbox.entries[more[0]].state == "dead"  # 0xA900 will never succeed
    assert "0xA900" in outbox.entries[more[0]].failures[0][0]
    assert outbox.entries[more[1]].state == "sent"

    stow.status, stow.failed_uid = 503, None
    last = outbox.add("web", files[0])
    dispatcher.run_once()
    assert outbox.entries[last].state == "pending" and outbox.entries[last].failures[0][1] == 2.0
