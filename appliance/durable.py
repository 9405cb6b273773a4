"""Writing a file so that it survives a crash once this returns: temp file, fsync, rename, fsync folders.

Files are created owner-only (0600) and new folders 0700, whatever the umask (:mod:`appliance.file_modes`).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path
from typing import BinaryIO

from appliance.file_modes import PRIVATE_FILE, make_private_dirs
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
    make_private_dirs(folder)
    tmp = folder / f".{path.name}.{threading.get_ident()}.tmp"
    try:
        with _open_private(tmp) as fh:
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


def move_durably(source: Path, path: Path, *, fsync: bool = True) -> None:
    """Move the finished file ``source`` to ``path``; with ``fsync``, durably (file, its new folder, new parents).

    A rename when both are on one file system (the spool is inside the data folder), else a copy.

    Raises
    ------
    SinkFullError
        When the disk or quota is full.
    """
    folder = path.parent
    new_folder = not folder.exists()
    try:
        make_private_dirs(folder)
        if fsync:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.replace(source, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across(source, path, fsync=fsync)
        if fsync:
            fsync_dir(folder)
            if new_folder:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
    except OSError as exc:
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise SinkFullError("disk full") from exc
        raise


def _copy_across(source: Path, path: Path, *, fsync: bool) -> None:
    tmp = path.parent / f".{path.name}.{threading.get_ident()}.tmp"
    try:
        with source.open("rb") as src, _open_private(tmp) as out:
            shutil.copyfileobj(src, out)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    source.unlink()


def _open_private(path: Path) -> BinaryIO:
    """``path`` opened for writing, created owner-only (0600) whatever the umask."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: a temporary file older than this cannot belong to a write still under way (a write takes well
#: under a second); younger ones are left alone, as another process (``portico receive``) may own them
STALE_TEMPORARY_SECONDS = 60.0


def remove_stale_temporaries(root: Path, *, older_than: float = STALE_TEMPORARY_SECONDS,
                             now: float | None = None) -> int:
    """Remove the temporary files that an interrupted write left under ``root``; return how many.

    These are :func:`write_durably`'s and :func:`move_durably`'s ``.NAME.THREAD.tmp`` and any other
    ``*.tmp`` or ``*.part`` file, never a finished file: a crash between writing and renaming leaves
    one behind, and nothing will ever rename it.
    """
    if not root.is_dir():
        return 0
    cutoff = (time.time() if now is None else now) - older_than
    removed = 0
    # one walk of the tree (it holds every instance), not one per suffix
    for path in root.rglob("*"):
        if not path.name.endswith((".tmp", ".part")):
            continue
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to remove
            continue
    return removed
