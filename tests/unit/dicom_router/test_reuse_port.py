"""``router.reuse_port``: several receiver processes share one port; without it a second bind fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_router.scp import StorageSCP
from dicom_router.settings import Peer, RouterSettings
from tests.support.net import free_port
from tests.unit.dicom_router.memory_sink import FolderSink


def _settings(port: int, reuse: bool) -> RouterSettings:
    return RouterSettings(port=port, reuse_port=reuse, peers=(Peer(ae_title="MODALITY", hosts=("127.0.0.1",)),))


def test_two_receivers_share_a_port_with_reuse_port(tmp_path: Path) -> None:
    port = free_port()
    first, second = (StorageSCP(_settings(port, True), FolderSink(tmp_path / n)) for n in ("a", "b"))
    first.start()
    try:
        second.start()
        try:
            first.stop()  # the port stays served by the other receiver
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="PORTICO")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        finally:
            second.stop()
    finally:
        first.stop()


def test_without_reuse_port_a_second_receiver_cannot_bind(tmp_path: Path) -> None:
    port = free_port()
    first = StorageSCP(_settings(port, False), FolderSink(tmp_path / "a"))
    first.start()
    try:
        with pytest.raises(OSError):
            StorageSCP(_settings(port, False), FolderSink(tmp_path / "b")).start()
    finally:
        first.stop()
