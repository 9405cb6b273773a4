"""Lossless compressed copies of SEGs and their use by dispatch: JPEG-LS when the peer accepts it,
the stored file when it does not (DIMSE: per presentation context; STOW-RS: resent as stored)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

import dicom_router.dispatch as dispatch
from dicom_router.dispatch import send_files
from dicom_router.settings import Compression, DimseDestination, StowDestination
from dicom_router.transcode import TranscodeError, _check_lossless, applies, cache_path, compressed_copy
from tests.support.net import free_port
from tests.support.segs import SegFiles, write_segs

CALLING = "PORTICO"


@pytest.fixture(scope="module")
def segs(tmp_path_factory: pytest.TempPathFactory) -> SegFiles:
    return write_segs(tmp_path_factory.mktemp("segs"))


@pytest.fixture
def fractional(segs: SegFiles, tmp_path: Path) -> Path:
    """A private copy of the FRACTIONAL SEG, so each test starts without cached copies."""
    path = tmp_path / "seg.dcm"
    path.write_bytes(segs.fractional.read_bytes())
    return path


def without_pixels(ds: pydicom.Dataset) -> list[pydicom.DataElement]:
    return [element for element in ds if element.keyword != "PixelData"]


# --- the compressed copy ----------------------------------------------------------------------

@pytest.mark.parametrize(("compression", "uid"), [(Compression.JPEG_LS, JPEGLSLossless),
                                                  (Compression.RLE, RLELossless)])
def test_compressed_copy_is_the_same_object_losslessly(fractional: Path, compression: Compression,
                                                       uid: str) -> None:
    variant = compressed_copy(fractional, compression)
    assert variant is not None
    assert variant.path == cache_path(fractional, compression) == fractional.with_name(f"seg.dcm.{compression}")
    assert variant.transfer_syntax_uid == uid
    original, copy = pydicom.dcmread(fractional), pydicom.dcmread(variant.path)
    assert copy.file_meta.TransferSyntaxUID == uid
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert without_pixels(copy) == without_pixels(original)
    assert np.array_equal(copy.pixel_array, original.pixel_array)
    assert variant.path.stat().st_size < fractional.stat().st_size / 2
    # deterministic: made again from scratch, byte for byte the same
    first = variant.path.read_bytes()
    variant.path.unlink()
    again = compressed_copy(fractional, compression)
    assert again is not None and again.path.read_bytes() == first


def test_copy_is_cached_and_remade_when_older_than_the_file(fractional: Path) -> None:
    variant = compressed_copy(fractional, Compression.JPEG_LS)
    assert variant is not None
    made = variant.path.stat().st_mtime_ns
    os.utime(variant.path, ns=(made - 10**9, made - 10**9))
    os.utime(fractional, ns=(made - 2 * 10**9, made - 2 * 10**9))
    assert compressed_copy(fractional, Compression.JPEG_LS) == variant
    assert variant.path.stat().st_mtime_ns == made - 10**9  # reused, not rewritten
    os.utime(fractional, ns=(made, made))  # the result file was rewritten since
    compressed_copy(fractional, Compression.JPEG_LS)
    assert variant.path.stat().st_mtime_ns > made - 10**9
    assert not list(fractional.parent.glob("*.tmp"))


def test_binary_seg_and_other_objects_are_left_alone(segs: SegFiles, tmp_path: Path) -> None:
    binary = tmp_path / "binary.dcm"
    binary.write_bytes(segs.binary.read_bytes())
    assert compressed_copy(binary, Compression.JPEG_LS) is None  # 1-bit frames: no JPEG-LS, no RLE
    assert not cache_path(binary, Compression.JPEG_LS).exists()
    assert applies(SegmentationStorage, ExplicitVRLittleEndian, Compression.JPEG_LS)
    assert not applies(SegmentationStorage, ExplicitVRLittleEndian, Compression.NONE)
    assert not applies(SegmentationStorage, JPEGLSLossless, Compression.RLE)  # already compressed
    assert not applies("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian, Compression.JPEG_LS)  # SC


def test_unreadable_file_is_a_transcode_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"not DICOM at all")
    with pytest.raises(TranscodeError, match=r"broken\.dcm"):
        compressed_copy(path, Compression.JPEG_LS)
    assert not list(tmp_path.glob("broken.dcm.*"))


def test_lossless_check_refuses_pixels_that_differ(fractional: Path) -> None:
    original = pydicom.dcmread(fractional).PixelData
    variant = compressed_copy(fractional, Compression.JPEG_LS)
    assert variant is not None
    _check_lossless(variant.path, original)
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 1
    with pytest.raises(TranscodeError, match="does not decode"):
        _check_lossless(variant.path, bytes(changed))
    with pytest.raises(TranscodeError, match="pixel bytes"):
        _check_lossless(variant.path, original + b"\0\0")


# --- dispatch over DIMSE: one context per transfer syntax ----------------------------------------

@dataclass
class Receiver:
    """A C-STORE SCP accepting SEGs in the given transfer syntaxes only; keeps what it gets."""

    transfer_syntaxes: list[str]
    port: int = field(default_factory=free_port)
    received: list[tuple[str, pydicom.Dataset]] = field(default_factory=list)

    def handle(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    def destination(self, compression: Compression) -> DimseDestination:
        return DimseDestination(name="pacs", ae_title="RECEIVER", host="127.0.0.1", port=self.port,
                                compression=compression)


StartReceiver = Callable[[list[str]], "Receiver"]


@pytest.fixture
def receiver_factory() -> Iterator[StartReceiver]:
    servers: list[ThreadedAssociationServer] = []

    def start(transfer_syntaxes: list[str]) -> Receiver:
        receiver = Receiver(transfer_syntaxes)
        ae = AE("RECEIVER")
        for ts in transfer_syntaxes:  # one context each, as a PACS with a fixed list has them
            ae.add_supported_context(SegmentationStorage, ts)
        server = ae.start_server(("127.0.0.1", receiver.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, receiver.handle)])
        assert server is not None
        servers.append(server)
        return receiver

    yield start
    for server in servers:
        server.shutdown()


def test_sent_as_jpeg_ls_when_the_peer_accepts_it(receiver_factory: StartReceiver, fractional: Path,
                                                   segs: SegFiles) -> None:
    receiver = receiver_factory([JPEGLSLossless, ExplicitVRLittleEndian])
    [result] = send_files(receiver.destination(Compression.JPEG_LS), [fractional], CALLING, timeout=10)
    assert result.ok and result.transfer_syntax_uid == JPEGLSLossless and result.path == fractional
    [(ts, ds)] = receiver.received
    original = pydicom.dcmread(fractional)
    assert ts == JPEGLSLossless and ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    # a retry or a second destination reuses the cached copy
    made = cache_path(fractional, Compression.JPEG_LS).stat().st_mtime_ns
    [again] = send_files(receiver.destination(Compression.JPEG_LS), [fractional], CALLING, timeout=10)
    assert again.ok and cache_path(fractional, Compression.JPEG_LS).stat().st_mtime_ns == made


def test_falls_back_to_the_stored_file_when_the_peer_rejects_compression(receiver_factory: StartReceiver,
                                                                         fractional: Path,
                                                                         segs: SegFiles) -> None:
    receiver = receiver_factory([ExplicitVRLittleEndian])
    [result] = send_files(receiver.destination(Compression.JPEG_LS), [fractional], CALLING, timeout=10)
    assert result.ok and result.transfer_syntax_uid == ExplicitVRLittleEndian
    [(ts, ds)] = receiver.received
    assert ts == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(fractional).pixel_array)


def test_no_compression_and_binary_segs_go_as_stored(receiver_factory: StartReceiver, fractional: Path,
                                                     segs: SegFiles, tmp_path: Path) -> None:
    receiver = receiver_factory([JPEGLSLossless, ExplicitVRLittleEndian])
    [plain] = send_files(receiver.destination(Compression.NONE), [fractional], CALLING, timeout=10)
    assert plain.ok and plain.transfer_syntax_uid == ExplicitVRLittleEndian
    assert not cache_path(fractional, Compression.JPEG_LS).exists()
    binary = tmp_path / "binary.dcm"
    binary.write_bytes(segs.binary.read_bytes())
    [result] = send_files(receiver.destination(Compression.JPEG_LS), [binary], CALLING, timeout=10)
    assert result.ok and result.transfer_syntax_uid == ExplicitVRLittleEndian
    assert [ts for ts, _ in receiver.received] == [ExplicitVRLittleEndian] * 2


def test_a_failed_transcode_sends_the_stored_file(receiver_factory: StartReceiver, fractional: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def broken(path: Path, compression: Compression) -> None:
        raise TranscodeError("encoder exploded")

    monkeypatch.setattr(dispatch, "compressed_copy", broken)
    receiver = receiver_factory([JPEGLSLossless, ExplicitVRLittleEndian])
    [result] = send_files(receiver.destination(Compression.JPEG_LS), [fractional], CALLING, timeout=10)
    assert result.ok and result.transfer_syntax_uid == ExplicitVRLittleEndian
    assert "encoder exploded" in caplog.text


# --- dispatch over STOW-RS: refused compressed parts go again as stored -------------------------

class _StowHandler(BaseHTTPRequestHandler):
    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append(body)
        code = 415 if JPEGLSLossless.encode() in body else 200  # a server that takes no JPEG-LS
        self.send_response(code)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stow_server() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Handler", (_StowHandler,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", bodies
    server.shutdown()
    server.server_close()
    thread.join()


def test_stow_resends_refused_compressed_files_as_stored(stow_server: tuple[str, list[bytes]],
                                                         fractional: Path) -> None:
    url, bodies = stow_server
    destination = StowDestination(name="web", url=url, compression=Compression.JPEG_LS)
    [result] = send_files(destination, [fractional], CALLING, timeout=10)
    assert result.ok and result.transfer_syntax_uid == ExplicitVRLittleEndian
    assert len(bodies) == 2 and JPEGLSLossless.encode() in bodies[0]
    assert fractional.read_bytes() in bodies[1]
    ds = pydicom.dcmread(io.BytesIO(cache_path(fractional, Compression.JPEG_LS).read_bytes()))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless  # the cached copy stays for the next time
