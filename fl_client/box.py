"""The NVFlare client in its own box: its own unprivileged OS user when Portico runs as root.

When the appliance runs as root, the client and every job process it starts run as ``fl.run_as``
(``portico-fl`` by default; the installer creates it). That user owns the FL folder
(``<data_dir>/<fl.workspace>``: NVFlare's workspace, its HOME and TMPDIR, Portico's FL state) and
nothing else of the appliance: the configuration, the database and the stored instances stay
root's, owner-only. What the trainer reads from the appliance is *staged* into the box before the
client starts:

- each cohort's files are **copied** into ``portico/cohorts/<name>.files/`` (owner read-only), and the
  cohort index names the copies. Copies, not hard links: a hard link shares the store's owner-only
  inode, so it would need the store's own files opened up (group-readable or an ACL), which the data
  folder's start-up repair removes again and which would expose the originals; a copy exposes only
  what the cohort holds, and an unchanged file is not copied twice;
- the allowed models' manifests (``portico-model.yaml`` only) into ``portico/models/``.

The data folder itself stays owner-only apart from ``g+x`` for the FL user's group (traverse, no
listing), so the FL user can reach its own folder by name and nothing else.

A root Portico refuses to start NVFlare when ``fl.run_as`` names no user (a clear error, not a
silent fallback); ``fl.run_as: null`` is the explicit choice to run NVFlare as root. Portico not
running as root starts NVFlare as its own (already unprivileged) user.

The FL folder is handed over (``chown``) before each start, with no FL process alive: symbolic links
are not followed and a file with other hard links is left alone (it could be a link the FL user made
to a file outside its box).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from fl_client.dataset import CohortIndex, SeriesRecord
from fl_client.errors import BoxError
from fl_client.layout import SiteLayout
from inference.packages import MANIFEST_NAME

log = logging.getLogger(__name__)

#: the data folder may keep this for its group (the FL user's): traverse only, no listing
GROUP_TRAVERSE = 0o010


@dataclass(frozen=True)
class FLUser:
    """The unprivileged OS user the NVFlare processes run as."""

    name: str
    uid: int
    gid: int


def box_user(run_as: str | None) -> FLUser | None:
    """The user NVFlare runs as, or None when it runs as Portico's own user.

    None when Portico is not root (it cannot, and need not, switch) or when ``run_as`` is None (the
    explicit choice to run NVFlare as root).

    Raises
    ------
    BoxError
        When Portico runs as root and ``run_as`` names no user, or a privileged one.
    """
    if os.geteuid() != 0 or run_as is None:
        return None
    try:
        entry = pwd.getpwnam(run_as)
    except KeyError:
        raise BoxError(
            f"Portico runs as root and the FL user {run_as!r} (fl.run_as) does not exist: create it "
            f"(scripts/install-system.sh does: useradd --system --user-group --no-create-home "
            f"--shell /usr/sbin/nologin {run_as}), or set fl.run_as: null to run NVFlare as root "
            "(it can then read every instance and the configuration)") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise BoxError(f"fl.run_as {run_as!r} is root or in group root: it must be an unprivileged user")
    return FLUser(run_as, entry.pw_uid, entry.pw_gid)


def _traversable(st: os.stat_result, user: FLUser) -> bool:
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def open_the_way(layout: SiteLayout, data_dir: Path, user: FLUser) -> None:
    """Let ``user`` reach the FL folder: the data folder (Portico's) gets group x for the user's group;
    a folder above it that the user cannot traverse is refused, not changed.

    Raises
    ------
    BoxError
        When a folder above the data folder keeps the FL user out.
    """
    data_dir = data_dir.resolve()
    root = layout.root.resolve()
    for folder in reversed(root.parents):
        st = folder.stat()
        if _traversable(st, user):
            continue
        if folder == data_dir or data_dir in folder.parents:
            os.chown(folder, -1, user.gid, follow_symlinks=False)
            os.chmod(folder, stat.S_IMODE(st.st_mode) | GROUP_TRAVERSE)
            log.info("the FL user %s may traverse %s (group x, no listing)", user.name, folder)
            continue
        raise BoxError(f"the FL user {user.name!r} cannot reach {root}: {folder} keeps it out "
                       f"(give it o+x, or move storage.data_dir)")


def hand_over(root: Path, user: FLUser) -> int:
    """Make ``root`` and everything below it ``user``'s; how many entries changed owner."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):  # never follows symbolic links
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) == (user.uid, user.gid) or stat.S_ISLNK(st.st_mode):
                continue
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                log.warning("not handing %s to %s: it has other hard links", path, user.name)
                continue
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
            changed += 1
    st = os.lstat(root)
    if (st.st_uid, st.st_gid) != (user.uid, user.gid):
        os.chown(root, user.uid, user.gid, follow_symlinks=False)
        changed += 1
    return changed


def _no_links_below(base: Path, path: Path) -> None:
    """Refuse to write through a symbolic link anywhere from ``base`` down to ``path`` (the FL user owns them)."""
    current = base
    for part in path.relative_to(base).parts:
        current = current / part
        if current.is_symlink():
            raise BoxError(f"{current} is a symbolic link: not writing through it")


def _private_dir(folder: Path, user: FLUser | None) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if user is not None:
        os.chown(folder, user.uid, user.gid, follow_symlinks=False)


def _copy(src: Path, folder: Path, name: str, user: FLUser | None) -> None:
    """``src`` as ``folder/name``, read-only for its owner; kept when size and mtime match already."""
    s = src.stat()
    dest = folder / name
    try:
        d = os.lstat(dest)
        if stat.S_ISREG(d.st_mode) and (d.st_size, d.st_mtime_ns) == (s.st_size, s.st_mtime_ns) \
                and (user is None or d.st_uid == user.uid):
            return
    except FileNotFoundError:
        pass
    tmp = folder / f".{name}.part"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            os.fchmod(out.fileno(), 0o400)
            if user is not None:
                os.fchown(out.fileno(), user.uid, user.gid)
        os.utime(tmp, ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stage_cohort(index: CohortIndex, folder: Path, user: FLUser | None, *, base: Path) -> CohortIndex:
    """Copies of ``index``'s files in ``folder`` (owned by ``user``); the index naming the copies.

    Files no longer in the cohort are removed. ``base`` is the trusted folder above ``folder`` (the data
    folder): no symbolic link below it is written through.
    """
    _no_links_below(base, folder.parent)
    _private_dir(folder, user)
    _no_links_below(base, folder)
    keep: set[str] = set()

    def stage(path: str) -> str:
        name = hashlib.sha256(path.encode()).hexdigest()[:32] + ".dcm"
        keep.add(name)
        _copy(Path(path), folder, name, user)
        return str(folder / name)

    series = tuple(SeriesRecord.model_validate({
        **s.model_dump(), "image_paths": tuple(stage(p) for p in s.image_paths),
        "seg_paths": tuple(stage(p) for p in s.seg_paths)}) for s in index.series)
    for stray in folder.iterdir():
        if stray.name not in keep and not stray.is_dir():
            stray.unlink()
    return index.model_copy(update={"series": series})


def stage_models(models_dir: Path, folder: Path, names: tuple[str, ...], user: FLUser | None, *,
                 base: Path) -> Path:
    """The manifests of the installed packages named ``names`` (all versions), copied into ``folder``.

    The trainer needs a package's manifest only (segments, labels, architecture); the weights it trains
    come from the federation.
    """
    from inference.packages import read_manifest

    _no_links_below(base, folder.parent)
    _private_dir(folder, user)
    keep: set[str] = set()
    for manifest_path in sorted(models_dir.glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest, _ = read_manifest(manifest_path.parent)
        except Exception:  # an unreadable package is not staged; the trainer reports a missing model
            log.warning("not staging %s for FL: unreadable manifest", manifest_path.parent.name)
            continue
        if manifest.name not in names:
            continue
        package = manifest_path.parent.name
        keep.add(package)
        _private_dir(folder / package, user)
        _copy(manifest_path, folder / package, MANIFEST_NAME, user)
    for stray in folder.iterdir():
        if stray.name not in keep and stray.is_dir() and not stray.is_symlink():
            shutil.rmtree(stray)
    return folder
