"""Writing a file so that it survives a crash once this returns: temp file, fsync, rename, fsync folders."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dicom_router.ports import SinkFullError


def write_durably(path: Path, data: bytes, *, fsync: bool = True, room_in: Path | None = None,
                  min_free_bytes: int = 0) -> None:
    """Write ``data`` to ``path`` atomically; with ``fsync``, durably (file, its folder, new parents).

    Raises
    ------
    SinkFullError
        When ``room_in``'s file system has less than ``min_free_bytes`` free beyond ``data``, or the
        disk or quota is full.
    """
    folder = path.parent
    if room_in is not None:
        st = os.statvfs(room_in)
        if st.f_bavail * st.f_frsize < min_free_bytes + len(data):
            raise SinkFullError("not enough free space in the data folder")
    new_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{threading.get_ident()}.tmp"
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(folder)
            if new_folder:  # a new series folder under a possibly new study folder
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise SinkFullError("disk full") from exc
        raise


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
