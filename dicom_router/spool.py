"""One STOW-RS part on its way in: in memory while small, then in a file in the sink's spool folder.

A CT slice (half a MB) stays in memory and is stored like a C-STORE instance. A part that grows past
``memory_bytes`` moves to a file, and from then on memory holds nothing of it: the file gets our own
File Meta Information (rebuilt, as for every received instance) followed by the data set as it
arrives, so that once the part is complete and its header checked, the sink takes the file over by
a rename. Beyond ``max_bytes`` the part is dropped as it arrives (refused later, never kept).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_router.part10 import UnreadableHeader, file_meta, read_file_meta

log = logging.getLogger(__name__)

#: parts up to this size stay in memory
DEFAULT_MEMORY_BYTES = 4 * 2**20
#: the sender's File Meta Information must fit in this much of a part's beginning (it is ~200 bytes)
META_PROBE_BYTES = 64 * 2**10


@dataclass(frozen=True)
class SpooledMeta:
    """What the sender's File Meta Information said, for a part spooled to a file."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: where the data set starts in the spool file (after our rebuilt meta)
    dataset_offset: int


class PartSpool:
    """Collect one part's content; see the module docstring.

    Parameters
    ----------
    folder
        The sink's spool folder (same file system as its store).
    source_ae_title
        The sender, written into the rebuilt meta of a spooled file.
    memory_bytes
        Up to this many bytes the part stays in memory.
    max_bytes
        Beyond this many bytes the part is dropped (:attr:`too_large`).
    """

    def __init__(self, folder: Path, source_ae_title: str, *, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_bytes: int) -> None:
        self._folder = folder
        self._source = source_ae_title
        self._memory_bytes = memory_bytes
        self._max_bytes = max_bytes
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        #: the spool file, once the part outgrew memory
        self.path: Path | None = None
        #: the sender's meta, when the part is in a file and its meta was readable
        self.meta: SpooledMeta | None = None
        #: why the meta was not readable (the file then holds the part as received)
        self.unreadable: UnreadableHeader | None = None
        #: bytes of content received (counted on past ``max_bytes``)
        self.size = 0
        self.too_large = False
        #: the spool could not be written (:attr:`disk_full` says whether the disk or quota was full)
        self.failed = False
        self.disk_full = False

    @property
    def dropped(self) -> bool:
        """Whether the content is gone (too large, or the spool failed): the part can only be refused."""
        return self.too_large or self.failed

    def write(self, data: memoryview) -> None:
        """Add the next piece of the part."""
        self.size += len(data)
        if self.dropped:
            return
        if self.size > self._max_bytes:
            self.too_large = True
            self.discard()
            return
        try:
            if self._file is not None:
                self._file.write(data)
                return
            self._memory += data
            if len(self._memory) > self._memory_bytes:
                self._to_file()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed = True
        self.disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not self.disk_full:
            log.error("STOW-RS from %s: the spool file cannot be written (%s)", self._source,
                      exc.strerror or type(exc).__name__)
        self.discard()

    def _to_file(self) -> None:
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self._folder)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        memory = memoryview(self._memory)
        try:
            sop_class, sop_instance, transfer_syntax, offset = read_file_meta(bytes(self._memory[:META_PROBE_BYTES]))
        except UnreadableHeader as exc:  # kept as received, to be quarantined
            self.unreadable = exc
            self._file.write(memory)
        else:
            head = file_meta(sop_class, sop_instance, transfer_syntax, self._source)
            self.meta = SpooledMeta(sop_class, sop_instance, transfer_syntax, len(head))
            self._file.write(head)
            self._file.write(memory[offset:])
        memory.release()
        self._memory = bytearray()

    def finish(self) -> bytes | Path | None:
        """The complete part: its bytes (small parts), the spool file (closed), or ``None`` if :attr:`dropped`."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)
            self._file = None
        if self.dropped:
            return None
        if self.path is not None:
            return self.path
        data = bytes(self._memory)
        self._memory = bytearray()
        return data

    def discard(self) -> None:
        """Free the memory and remove the spool file, if any is left (idempotent)."""
        self._memory = bytearray()
        if self._file is not None:
            with contextlib.suppress(OSError):  # already failing: the file goes anyway
                self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
