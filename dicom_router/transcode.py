"""Lossless compressed copies of result files, made once and kept next to the original.

A destination with ``compression`` set gets 8/16-bit single-sample SEGs (FRACTIONAL; BINARY SEGs
are 1-bit and stay as they are) in JPEG-LS Lossless or RLE Lossless. The copy is the same object:
same SOP Instance UID and header, the pixel data encoded losslessly (checked by decoding it again
before the copy is kept). It is written atomically as ``<file>.<compression>`` beside the original,
so a retry or a second destination reuses it; it is remade when older than the original.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID, JPEGLSLossless, RLELossless, SegmentationStorage

from dicom_router.settings import Compression

LOGGER = logging.getLogger(__name__)

#: the transfer syntax of each compression
TRANSFER_SYNTAX: dict[Compression, UID] = {Compression.JPEG_LS: JPEGLSLossless, Compression.RLE: RLELossless}
#: SOP classes we compress: Segmentation, and Label Map Segmentation (not named in pydicom 3.0)
COMPRESSIBLE_SOP_CLASSES = frozenset({str(SegmentationStorage), "1.2.840.10008.5.1.4.1.1.66.7"})
#: the pydicom encoder plugin per transfer syntax; pylibjpeg's RLE is the fast one
_PLUGIN = {JPEGLSLossless: "pyjpegls", RLELossless: "pylibjpeg"}


class TranscodeError(Exception):
    """A file could not be compressed losslessly; send the original instead."""


@dataclass(frozen=True)
class Variant:
    """One encoding of a file that may be sent: its transfer syntax and where it lies."""

    transfer_syntax_uid: str
    path: Path


def cache_path(path: Path, compression: Compression) -> Path:
    """Where the ``compression`` copy of ``path`` is kept."""
    return path.with_name(f"{path.name}.{compression.value}")


def applies(sop_class_uid: str, transfer_syntax_uid: str, compression: Compression) -> bool:
    """Whether ``compression`` is worth trying for a file, from its file meta alone."""
    return (compression != Compression.NONE and sop_class_uid in COMPRESSIBLE_SOP_CLASSES
            and not UID(transfer_syntax_uid).is_compressed)


def compressed_copy(path: Path, compression: Compression) -> Variant | None:
    """The lossless ``compression`` copy of the uncompressed file ``path``, made unless cached.

    Returns ``None`` when the pixel data cannot take it (e.g. 1-bit BINARY SEG frames).

    Raises
    ------
    TranscodeError
        When encoding fails or the encoded pixels do not decode to the original ones.
    """
    target = TRANSFER_SYNTAX[compression]
    cached = cache_path(path, compression)
    try:
        if cached.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            return Variant(str(target), cached)
    except FileNotFoundError:
        pass
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["BitsAllocated", "SamplesPerPixel"])
        if header.get("BitsAllocated") not in (8, 16) or header.get("SamplesPerPixel", 1) != 1:
            return None
        ds = dcmread(path)
        original = ds.PixelData
        ds.compress(target, encoding_plugin=_PLUGIN[target], generate_instance_uid=False)
        tmp = cached.with_name(cached.name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        del ds
        # the copy is as private as the original (owner-only in the appliance's data folder)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        _check_lossless(tmp, original)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, cached)
    except TranscodeError:
        raise
    except Exception as exc:
        # the encoder's type only: its message may quote header values
        raise TranscodeError(f"cannot compress {path.name} to {target.name}: {type(exc).__name__}") from exc
    finally:
        cached.with_name(cached.name + ".tmp").unlink(missing_ok=True)
    LOGGER.debug("compressed %s to %s: %d -> %d bytes", path.name, target.name, path.stat().st_size,
                 cached.stat().st_size)
    return Variant(str(target), cached)


def _check_lossless(path: Path, original: bytes) -> None:
    """Decode ``path`` frame by frame and compare with the original pixel bytes."""
    offset = 0
    for frame in iter_pixels(path, raw=True):
        data = np.ascontiguousarray(frame).tobytes()
        if original[offset:offset + len(data)] != data:
            raise TranscodeError(f"{path.name}: compressed frame does not decode to the original")
        offset += len(data)
    # native pixel data may carry one pad byte to an even length
    if offset not in (len(original), len(original) - 1):
        raise TranscodeError(f"{path.name}: {offset} pixel bytes decoded, {len(original)} stored")
