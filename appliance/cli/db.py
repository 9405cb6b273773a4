"""``portico db status|migrate|backup|restore``: the appliance database's version, upgrades and backups.

- ``status``: where the database is, its schema version and the version this Portico expects.
- ``migrate``: apply missing migrations now (``portico serve`` does it at start-up, after a backup copy).
- ``backup [--out FILE]``: a consistent copy of a SQLite database while the appliance runs (SQLite's online
  backup API), checked with ``integrity_check``; default ``DATA_DIR/backups/portico-YYYYmmddTHHMMSS.sqlite3``.
- ``restore FILE``: replace the SQLite database with a backup (stop the appliance first); the replaced one is
  kept beside it. PostgreSQL is backed up and restored with ``pg_dump``/``pg_restore`` (docs/operations.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from appliance.audit import AuditEvent, AuditRecord
from appliance.cli.common import parser, settings_from
from appliance.db.backup import backup_sqlite, check_sqlite, restore_sqlite
from appliance.db.engine import SQLITE_NAME, SQLiteDatabase, open_database
from appliance.db.migrations import LATEST, upgrade, version
from appliance.settings import Settings
from appliance.store import Store


def main(argv: Sequence[str]) -> int:
    p = parser("db", "The appliance database: version, migrations, backups.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="where the database is and its schema version")
    sub.add_parser("migrate", help="apply missing migrations now")
    backup = sub.add_parser("backup", help="a consistent copy of the SQLite database, while it runs")
    backup.add_argument("--out", type=Path, help="file to write (owner-only)")
    restore = sub.add_parser("restore", help="replace the SQLite database with a backup (appliance stopped)")
    restore.add_argument("file", type=Path)
    args = p.parse_args(argv)
    settings = settings_from(args)
    if args.action == "restore":
        return _restore(settings, args.file)
    database = open_database(settings.storage.database, settings.data_dir)
    try:
        if args.action == "status":
            found = version(database)
            sys.stdout.write(f"database: {database.describe()}\nschema version: {found} (this Portico: {LATEST})\n")
            return 0 if found == LATEST else 1
        if args.action == "migrate":
            applied = upgrade(database, backup_dir=settings.data_dir / "backups")
            sys.stdout.write(f"applied: {', '.join(map(str, applied))}\n" if applied else "up to date\n")
            return 0
        if not isinstance(database, SQLiteDatabase):
            sys.stderr.write("portico db backup: the database is PostgreSQL; back it up with pg_dump "
                             "(docs/operations.md)\n")
            return 2
        target = args.out or settings.data_dir / "backups" / f"portico-{time.strftime('%Y%m%dT%H%M%S')}.sqlite3"
        backup_sqlite(database, target)
        verdict = check_sqlite(target)
        if verdict != "ok":
            sys.stderr.write(f"portico db backup: the copy fails its integrity check: {verdict}\n")
            return 1
        sys.stdout.write(f"backed up to {target}\n")
    finally:
        database.close()
    _audit(settings, "backup", target.name)
    return 0


def _restore(settings: Settings, source: Path) -> int:
    if settings.storage.database not in ("", "sqlite"):
        sys.stderr.write("portico db restore: restores the SQLite database in the data folder only; for "
                         "PostgreSQL use pg_restore (docs/operations.md)\n")
        return 2
    if not source.is_file():
        sys.stderr.write(f"portico db restore: no file {source}\n")
        return 2
    target = settings.data_dir / SQLITE_NAME
    if target.exists():  # the replaced database is kept, never lost to a mistaken restore
        kept = SQLiteDatabase(target)
        try:
            backup_sqlite(kept, settings.data_dir / "backups" / f"replaced-{time.strftime('%Y%m%dT%H%M%S')}.sqlite3")
        finally:
            kept.close()
    try:
        restore_sqlite(source, target)
    except ValueError as exc:
        sys.stderr.write(f"portico db restore: {exc}\n")
        return 1
    _audit(settings, "restore", source.name)
    sys.stdout.write(f"restored {target} from {source}\n")
    return 0


def _audit(settings: Settings, action: str, file: str) -> None:
    store = Store.from_settings(settings, fsync=False)
    try:
        store.record(AuditRecord(AuditEvent.SERVICE, actor="portico db", detail={"action": f"database {action}",
                                                                                  "file": file}))
    finally:
        store.close()
