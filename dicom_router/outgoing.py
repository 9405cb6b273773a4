"""What the senders share: a file to send, what happened to it, and which failures are final."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from dicom_router.errors import DispatchError
from dicom_router.transcode import Variant


def is_permanent_status(status: int) -> bool:
    """C-STORE failures that resending the same bytes can never fix."""
    return (
        0xA900 <= status <= 0xA9FF  # data set does not match SOP class
        or 0xC000 <= status <= 0xCFFF  # cannot understand
        or status in (0x0117, 0x0122, 0x0211)  # invalid instance, SOP class not supported, bad op
    )


@dataclass(frozen=True)
class SendResult:
    """What happened to one file."""

    path: Path
    sop_instance_uid: str | None
    ok: bool
    status: int | None = None
    error: str | None = None
    permanent: bool = False
    #: the transfer syntax it went in, when sent
    transfer_syntax_uid: str | None = None


@dataclass(frozen=True)
class OutgoingFile:
    """A Part 10 file on its way out, with the UIDs of its meta and any compressed copies."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: compressed copies to offer first, in order of preference; the file itself comes after them
    compressed: tuple[Variant, ...] = ()

    @property
    def variants(self) -> tuple[Variant, ...]:
        return (*self.compressed, Variant(self.transfer_syntax_uid, self.path))


def failed(f: OutgoingFile, error: str, *, status: int | None = None, permanent: bool = False) -> SendResult:
    """The result of ``f`` not being sent."""
    return SendResult(f.path, f.sop_instance_uid, False, status=status, error=error, permanent=permanent)


def file_info(path: Path) -> OutgoingFile:
    """``path`` with the UIDs of its file meta; :class:`DispatchError` (permanent) when it has none."""
    try:
        meta = read_file_meta_info(path)
    except FileNotFoundError as exc:
        raise DispatchError(f"file missing: {path.name}", permanent=True) from exc
    except Exception as exc:
        raise DispatchError(f"not a DICOM Part 10 file: {path.name} ({type(exc).__name__})", permanent=True) from exc
    try:
        return OutgoingFile(path, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                     str(meta.TransferSyntaxUID))
    except AttributeError as exc:
        raise DispatchError(f"file meta incomplete: {path.name}", permanent=True) from exc
