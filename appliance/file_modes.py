"""Owner-only at rest: the data folder, its files and the database; secrets nobody else can read.

One mechanism, three layers:

1. **A process-wide umask** (:data:`OWNER_ONLY_UMASK`, set by the ``portico`` entry point): every file
   and folder any part of the appliance creates (SQLite, pydicom's ``save_as``, NVFlare's client,
   which inherits it) is owner-only, whoever wrote the code that creates it.
2. **Explicit modes** where the appliance creates patient data itself (:func:`create_private`,
   :func:`make_private_dirs`; ``appliance.durable``, the store's folders and database), so a library
   user that never went through the entry point gets owner-only files too.
3. **A start-up repair** of the data folder (:func:`tighten_tree`): whatever an earlier version, a
   restore from backup or a hand-made copy left readable by group/others is tightened, and said so.

And the check of the secrets' files (:func:`secret_file_problems`): ``portico serve`` refuses a
configuration file or key file that group/others can read (only warns in ``mode: dev``).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.settings import Settings

log = logging.getLogger(__name__)

#: no permission for group and others on anything created
OWNER_ONLY_UMASK = 0o077
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
#: the permission bits group and others must not have
_GROUP_OTHER = 0o077


def make_private_dirs(folder: Path) -> None:
    """``mkdir -p`` with every folder it creates owner-only (0700); existing folders are left alone."""
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # made by another thread or process meanwhile
            continue
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is filtered by the umask; this one is not


def create_private(path: Path) -> None:
    """Create ``path`` empty and owner-only (0600) unless it exists (e.g. a database before SQLite opens it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return
    os.close(fd)


@dataclass(frozen=True)
class Tightened:
    """What :func:`tighten_tree` changed, and what it could not change."""

    files: int = 0
    folders: int = 0
    failed: int = 0


def tighten_tree(root: Path, *, root_keeps: int = 0) -> Tightened:
    """Remove group/other permissions from ``root`` and everything under it; logs what it did.

    Symbolic links are neither followed nor changed. The owner's bits stay as they are (a kit's
    read-only key stays read-only). ``root_keeps``: group/other bits ``root`` itself may keep (``0o010``:
    the FL user's group may traverse the data folder to reach its own folder, see :mod:`fl_client.box`).
    """
    if not root.is_dir():
        return Tightened()
    files = folders = failed = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        changed = _tighten(folder, root_keeps if folder == root else 0)
        folders += changed is True
        failed += changed is None
        try:
            entries = list(os.scandir(folder))
        except OSError:
            failed += 1
            continue
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
                continue
            changed = _tighten(Path(entry.path))
            files += changed is True
            failed += changed is None
    result = Tightened(files, folders, failed)
    if files or folders:
        log.warning("tightened %d file(s) and %d folder(s) under the data folder %s to owner-only "
                    "(group/others could read them)", files, folders, root)
    if failed:
        log.warning("could not tighten %d file(s) or folder(s) under the data folder %s (another user's?): "
                    "chmod -R go-rwx %s", failed, root, root)
    return result


def _tighten(path: Path, keeps: int = 0) -> bool | None:
    """True if changed, False if already owner-only, None if it could not be changed."""
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if not mode & _GROUP_OTHER & ~keeps:
            return False
        os.chmod(path, mode & ~(_GROUP_OTHER & ~keeps))
    except FileNotFoundError:  # removed meanwhile (a spool file, a temporary file)
        return False
    except OSError:
        return None
    return True


@dataclass(frozen=True)
class LooseFile:
    """A file holding secrets that group/others can access."""

    #: which setting names it (``configuration file``, ``router.tls.private_key`` …)
    what: str
    path: Path
    mode: int

    def __str__(self) -> str:
        return (f"{self.what} {self.path} can be read by group/others (mode {self.mode:04o}); "
                f"make it readable by the appliance's user only: chmod 600 {self.path}")


def secret_files(settings: Settings, config: Path | None) -> list[tuple[str, Path]]:
    """The files holding secrets: the configuration file and every key or secret file it names."""
    found: list[tuple[str, Path]] = []
    if config is not None:
        found.append(("configuration file", config))
    if settings.router.tls is not None:
        found.append(("router.tls.private_key", Path(settings.router.tls.private_key)))
    if settings.api.tls is not None:
        found.append(("api.tls.private_key", Path(settings.api.tls.private_key)))
    for destination in settings.dispatch.destinations:
        auth = getattr(destination, "auth", None)
        secret_file = getattr(auth, "secret_file", None)
        if secret_file:
            found.append((f"dispatch.destinations[{destination.name}].auth.secret_file", Path(secret_file)))
    syslog_key = getattr(getattr(getattr(settings, "audit", None), "syslog", None), "private_key", None)
    if syslog_key:
        found.append(("audit.syslog.private_key", Path(syslog_key)))
    return found


def secret_file_problems(settings: Settings, config: Path | None) -> list[LooseFile]:
    """The secret files (:func:`secret_files`) that group/others can access; a missing one is not checked here."""
    problems = []
    for what, path in secret_files(settings, config):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:  # reported where the file is used (TLS context, secret read at send)
            continue
        if mode & _GROUP_OTHER:
            problems.append(LooseFile(what, path, mode))
    return problems
