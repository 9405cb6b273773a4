"""Our StorageSCP on a real localhost socket, driven by DCMTK's echoscu/storescu and a pynetdicom SCU.

Covers the allow-list, uncompressed and compressed series stored byte for byte, a malformed instance
in the middle of an association, duplicates, a full disk (0xA700), unexpected sink errors (0xC211),
aborts, and that no patient identifier reaches the logs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from appliance.demo_study import DEMO_PATIENT_ID, DEMO_PATIENT_NAME, write_ct_series
from dicom_router.ports import ReceivedInstance, StoreOutcome
from dicom_router.scp import StorageSCP
from dicom_router.settings import Peer, RouterSettings
from inference.phantom import make_phantom
from tests.support.net import free_port
from tests.unit.dicom_router.memory_sink import FolderSink

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed")

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
SLICES = 6


@dataclass
class Series:
    paths: list[Path]
    sop_uids: list[str]
    transfer_syntax: str


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Series]:
    phantom = make_phantom((SLICES, 64, 64), spacing=(2.5, 1.4, 1.4), seed=3)
    out: dict[str, Series] = {}
    for seed, (name, ts) in enumerate(
        [("explicit", ExplicitVRLittleEndian), ("rle", RLELossless), ("j2k", JPEG2000Lossless)], start=1
    ):
        written = write_ct_series(phantom.hu, phantom.spacing, tmp_path_factory.mktemp(name),
                                  transfer_syntax=ts, seed=seed, series_description=f"Phantom {name}")
        uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in written.paths]
        out[name] = Series(written.paths, uids, ts)
    return out


@dataclass
class Running:
    scp: StorageSCP
    sink: FolderSink
    port: int


def settings_for(port: int) -> RouterSettings:
    return RouterSettings(
        ae_title="PORTICO",
        port=port,
        peers=(
            Peer(ae_title="STORESCU"),
            Peer(ae_title="ECHOSCU", hosts=("127.0.0.1", "::1")),
            Peer(ae_title="PYSCU"),
            Peer(ae_title="FARAWAY", hosts=("10.99.99.99",)),
        ),
    )


def start_scp(tmp_path: Path, event_driven: bool | None = None, sink: FolderSink | None = None) -> Running:
    sink = sink or FolderSink(tmp_path)
    port = free_port()
    scp = StorageSCP(settings_for(port), sink, event_driven=event_driven)
    scp.start()
    return Running(scp, sink, port)


@pytest.fixture(params=[True, False], ids=["event-driven", "stock-pynetdicom"])
def any_scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    running = start_scp(tmp_path, event_driven=request.param)
    yield running
    running.scp.stop()


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Running]:
    running = start_scp(tmp_path)
    yield running
    running.scp.stop()


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=120, check=False)


def storescu(port: int, paths: list[Path], *options: str) -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", *options, "-aet", "STORESCU", "-aec", "PORTICO", "127.0.0.1", str(port),
                 *map(str, paths))


def dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_echoscu_from_an_allow_listed_peer(any_scp: Running) -> None:
    done = dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "PORTICO", "127.0.0.1", str(any_scp.port))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("calling", ["INTRUDER", "FARAWAY"], ids=["unknown-ae", "known-ae-wrong-host"])
def test_unknown_peer_is_rejected_at_association(scp: Running, calling: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    done = dcmtk("echoscu", "-aet", calling, "-aec", "PORTICO", "127.0.0.1", str(scp.port))
    assert done.returncode != 0
    assert "Calling AE Title Not Recognized" in done.stderr
    assert any("refused" in r.getMessage() and "unknown_calling_ae" in r.getMessage() and calling in r.getMessage()
               for r in caplog.records)
    # the server keeps serving the peers it knows
    assert dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "PORTICO", "127.0.0.1",
                 str(scp.port)).returncode == 0


@pytest.mark.parametrize(
    ("name", "options"),
    [("explicit", ()), ("rle", ("-xr",)), ("j2k", ("-xv",))],
)
def test_storescu_series_is_stored_byte_for_byte(any_scp: Running, series: dict[str, Series], name: str,
                                                 options: tuple[str, ...]) -> None:
    s = series[name]
    done = storescu(any_scp.port, s.paths, *options)
    assert done.returncode == 0, done.stderr
    sink = any_scp.sink
    assert sorted(sink.instances) == sorted(s.sop_uids)
    for path, uid in zip(s.paths, s.sop_uids, strict=True):
        instance = sink.instances[uid]
        assert instance.transfer_syntax_uid == s.transfer_syntax
        assert instance.sop_class_uid == CTImageStorage
        assert instance.calling_ae_title == "STORESCU"
        assert instance.peer_address == "127.0.0.1"
        stored = sink.root / f"{uid}.dcm"
        assert stored.read_bytes() == instance.data
        # the dataset went to disk as it came off the wire: same bytes as the sender's file
        assert dataset_bytes(stored) == dataset_bytes(path)
        header = dcmread(stored, stop_before_pixels=True)
        assert header.file_meta.TransferSyntaxUID == s.transfer_syntax
        assert header.StudyInstanceUID == instance.study_instance_uid


def test_duplicates_are_idempotent(scp: Running, series: dict[str, Series]) -> None:
    s = series["explicit"]
    assert storescu(scp.port, s.paths).returncode == 0
    before = {uid: (scp.sink.root / f"{uid}.dcm").stat().st_mtime_ns for uid in s.sop_uids}
    again = storescu(scp.port, s.paths)
    assert again.returncode == 0, again.stderr
    assert scp.sink.duplicates == len(s.paths)
    assert len(scp.sink.instances) == len(s.paths)
    assert {uid: (scp.sink.root / f"{uid}.dcm").stat().st_mtime_ns for uid in s.sop_uids} == before


def raw_file(tmp_path: Path, like: Path, name: str, dataset: bytes) -> Path:
    """A Part 10 file with ``like``'s preamble and meta and arbitrary dataset bytes."""
    _, offset = split_dataset(like)
    path = tmp_path / name
    path.write_bytes(like.read_bytes()[:offset] + dataset)
    return path


@pytest.fixture
def send_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    # the pynetdicom SCU then sends a file's dataset bytes as they are, however broken
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def pyscu_store(port: int, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="PORTICO")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(p).Status) for p in paths]
        assert assoc.is_established  # the association survives failures
    finally:
        assoc.release()
    return statuses


@pytest.mark.usefixtures("send_raw")
@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_malformed_instance_mid_association_is_quarantined(scp: Running, series: dict[str, Series],
                                                           tmp_path: Path) -> None:
    good = series["explicit"].paths
    garbage = raw_file(tmp_path, good[0], "garbage.dcm", bytes(range(256)) * 8)
    ds = dcmread(good[1])
    del ds.SOPInstanceUID
    no_uid_path = tmp_path / "no-uid.dcm"
    ds.save_as(no_uid_path, enforce_file_format=False)
    statuses = pyscu_store(scp.port, [good[0], garbage, good[2], no_uid_path, good[3]])
    assert statuses[0] == statuses[2] == statuses[4] == 0x0000
    assert 0xC210 <= statuses[1] <= 0xC2FF and 0xC210 <= statuses[3] <= 0xC2FF
    uids = series["explicit"].sop_uids
    assert sorted(scp.sink.instances) == sorted([uids[0], uids[2], uids[3]])
    reasons = [q.reason for q in scp.sink.quarantined]
    assert len(reasons) == 2 and "missing SOPInstanceUID" in reasons[1]
    assert all(q.calling_ae_title == "PYSCU" and q.peer_address == "127.0.0.1"
               for q in scp.sink.quarantined)
    assert (scp.sink.root / "q1.quarantine").read_bytes().endswith(bytes(range(256)) * 8)


@pytest.mark.usefixtures("send_raw")
def test_sop_class_that_does_not_match_the_request_is_refused(scp: Running, series: dict[str, Series],
                                                              tmp_path: Path) -> None:
    ds = dcmread(series["explicit"].paths[0])
    ds.SOPClassUID = MRImageStorage  # the data says MR, the file meta (and so the request) CT
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=False)
    assert dcmread(path).file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert pyscu_store(scp.port, [path]) == [0xA900]
    assert not scp.sink.instances and len(scp.sink.quarantined) == 1


def test_disk_full_answers_out_of_resources(scp: Running, series: dict[str, Series]) -> None:
    scp.sink.full = True
    assert pyscu_store(scp.port, series["explicit"].paths[:2]) == [0xA700, 0xA700]
    done = storescu(scp.port, series["explicit"].paths[:1], "-v")
    assert done.returncode != 0
    assert "Refused: OutOfResources" in done.stdout + done.stderr
    scp.sink.full = False
    assert pyscu_store(scp.port, series["explicit"].paths[:2]) == [0x0000, 0x0000]


class ExplodingSink(FolderSink):
    def store(self, instance: ReceivedInstance) -> StoreOutcome:
        raise RuntimeError("the index is on fire")


def test_unexpected_sink_error_is_0xC211_and_the_server_lives_on(tmp_path: Path,
                                                               series: dict[str, Series]) -> None:
    sink = ExplodingSink(tmp_path)
    running = start_scp(tmp_path, sink=sink)
    try:
        assert pyscu_store(running.port, series["explicit"].paths[:2]) == [0xC211, 0xC211]
        # nothing received is lost: each one is kept in quarantine
        assert [q.reason for q in sink.quarantined] == ["unexpected error while storing"] * 2
        assert dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "PORTICO", "127.0.0.1",
                     str(running.port)).returncode == 0
    finally:
        running.scp.stop()


def test_abort_mid_study_keeps_what_was_acknowledged(scp: Running, series: dict[str, Series]) -> None:
    paths = series["explicit"].paths
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PORTICO")
    assert assoc.is_established
    assert int(assoc.send_c_store(paths[0]).Status) == 0
    assoc.abort()
    assert list(scp.sink.instances) == [series["explicit"].sop_uids[0]]
    # and a new association goes on where the study left off
    assert storescu(scp.port, paths).returncode == 0
    assert len(scp.sink.instances) == len(paths)


def test_no_patient_identifiers_in_logs(scp: Running, series: dict[str, Series],
                                        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    assert storescu(scp.port, series["rle"].paths, "-xr").returncode == 0
    assert pyscu_store(scp.port, series["explicit"].paths[:1]) == [0]
    dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "PORTICO", "127.0.0.1", str(scp.port))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text  # something was logged
    for identifier in (DEMO_PATIENT_NAME, DEMO_PATIENT_ID, "PHANTOM"):
        assert identifier not in text


def test_stop_ends_running_associations_and_frees_the_port(tmp_path: Path) -> None:
    running = start_scp(tmp_path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="PORTICO")
    assert assoc.is_established
    running.scp.stop()
    assert not running.scp.is_running
    again = StorageSCP(settings_for(running.port), FolderSink(tmp_path))
    again.start()  # the port is free again
    again.stop()
    if assoc.is_established:
        assoc.abort()


@pytest.mark.usefixtures("send_raw")
@pytest.mark.parametrize("requested", ["31", "1.2.826.0.1.3680043.8.498.999"], ids=["malformed", "unknown"])
def test_a_request_for_a_sop_class_we_do_not_know_gets_a_status(any_scp: Running, series: dict[str, Series],
                                                                 tmp_path: Path, requested: str) -> None:
    """pynetdicom alone aborts the association ("No supported service class"); we answer and keep the data."""
    ds = dcmread(series["explicit"].paths[0])
    ds.file_meta.MediaStorageSOPClassUID = requested  # the request says `requested`, the data set CT
    path = tmp_path / "odd.dcm"
    ds.save_as(path, enforce_file_format=False)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(requested, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", any_scp.port, ae_title="PORTICO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert status and int(status.Status) == 0xA900
        assert assoc.is_established  # not aborted: the next instance goes through
        assert int(assoc.send_c_store(series["explicit"].paths[1]).Status) == 0x0000
    finally:
        assoc.release()
    assert len(any_scp.sink.quarantined) == 1
    assert "SOP Class UID differs" in any_scp.sink.quarantined[0].reason


@pytest.mark.parametrize(("proposed", "accepted"), [
    (["1.2.840.10008.1.2.4.100", ExplicitVRLittleEndian], ExplicitVRLittleEndian),  # MPEG-2 first: not taken
    (["1.2.840.10008.1.2.4.100"], "1.2.840.10008.1.2.4.100"),  # nothing else offered: stored as sent
    ([JPEG2000Lossless, ExplicitVRLittleEndian], JPEG2000Lossless),  # the sender's order among ours
])
def test_the_transfer_syntax_we_accept(any_scp: Running, proposed: list[str], accepted: str) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, proposed)
    assoc = ae.associate("127.0.0.1", any_scp.port, ae_title="PORTICO")
    assert assoc.is_established
    try:
        assert [str(c.transfer_syntax[0]) for c in assoc.accepted_contexts] == [accepted]
    finally:
        assoc.release()
