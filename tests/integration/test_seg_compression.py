"""A FRACTIONAL SEG to a real Orthanc, JPEG-LS Lossless where it accepts that, as stored where not:
stored, read back over REST and decoded by Orthanc itself, identical pixels and the same UID."""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from appliance.pacs_standin import OrthancStandIn
from dicom_router.dispatch import Dispatcher
from dicom_router.settings import Compression, DimseDestination, DispatchSettings
from dicom_router.transcode import cache_path
from tests.integration.conftest import Pacs
from tests.integration.test_dispatch import MemoryOutbox
from tests.support.net import free_port
from tests.support.segs import SegFiles, write_segs

pytestmark = pytest.mark.slow


class NoJpegLsOrthanc(OrthancStandIn):
    """An Orthanc that refuses JPEG-LS presentation contexts."""

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["JpegLosslessTransferSyntaxAccepted"] = False
        return cfg


@pytest.fixture
def no_jpeg_ls(tmp_path: Path) -> Iterator[OrthancStandIn]:
    standin = NoJpegLsOrthanc(tmp_path / "nojls", free_port(), free_port())
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture
def segs(tmp_path: Path) -> SegFiles:
    return write_segs(tmp_path / "segs", shape=(12, 128, 128))


def fetch(standin: OrthancStandIn, path: str) -> bytes:
    with urllib.request.urlopen(f"{standin.url}{path}", timeout=30) as response:
        data: bytes = response.read()
    return data


def dispatch_one(standin: OrthancStandIn, path: Path) -> MemoryOutbox:
    destination = DimseDestination(name="pacs", ae_title=standin.ae_title, host="127.0.0.1",
                                   port=standin.dicom_port, compression=Compression.JPEG_LS)
    outbox = MemoryOutbox()
    outbox.add("pacs", path)
    Dispatcher(DispatchSettings(destinations=(destination,)), outbox, "PORTICO").run_once()
    return outbox


def stored(standin: OrthancStandIn, sop_instance_uid: str) -> tuple[str, pydicom.Dataset, str]:
    [match] = standin.request("POST", "/tools/lookup", sop_instance_uid.encode())
    instance = match["ID"]
    syntax = fetch(standin, f"/instances/{instance}/metadata/TransferSyntax").decode()
    return instance, pydicom.dcmread(io.BytesIO(fetch(standin, f"/instances/{instance}/file"))), syntax


def test_fractional_seg_goes_to_orthanc_as_jpeg_ls(orthanc_factory: Callable[..., Pacs], segs: SegFiles) -> None:
    pacs = orthanc_factory(free_port())
    outbox = dispatch_one(pacs.standin, segs.fractional)
    assert [e.state for e in outbox.entries.values()] == ["sent"]
    original = pydicom.dcmread(segs.fractional)
    instance, received, syntax = stored(pacs.standin, str(original.SOPInstanceUID))
    assert syntax == JPEGLSLossless == received.file_meta.TransferSyntaxUID
    assert received.SOPInstanceUID == original.SOPInstanceUID
    np.testing.assert_array_equal(received.pixel_array, original.pixel_array)
    assert len(received.PixelData) < len(original.PixelData) / 3
    # Orthanc decodes the JPEG-LS frames itself to the same values
    for frame in (0, int(original.NumberOfFrames) // 2):
        png = Image.open(io.BytesIO(fetch(pacs.standin, f"/instances/{instance}/frames/{frame}/image-uint8")))
        np.testing.assert_array_equal(np.asarray(png), original.pixel_array[frame])
    assert cache_path(segs.fractional, Compression.JPEG_LS).is_file()


def test_orthanc_without_jpeg_ls_gets_the_stored_file(no_jpeg_ls: OrthancStandIn, segs: SegFiles) -> None:
    outbox = dispatch_one(no_jpeg_ls, segs.fractional)
    assert [e.state for e in outbox.entries.values()] == ["sent"]
    original = pydicom.dcmread(segs.fractional)
    _, received, syntax = stored(no_jpeg_ls, str(original.SOPInstanceUID))
    assert syntax == ExplicitVRLittleEndian
    np.testing.assert_array_equal(received.pixel_array, original.pixel_array)
