"""Online backup and offline restore of the embedded SQLite store (`authpool backup` / `authpool restore`).

A backup is SQLite's online backup API, in one step: it reads one
consistent snapshot of the database while the server goes on writing (in
WAL mode a reader never blocks the writer), into a single self-contained
file that is checked (`PRAGMA integrity_check`) before it is renamed into
place. Its recovery point is the moment the backup began: everything the
server acknowledged before then is in it.

A restore replaces the database of a stopped server with a checked backup.
It refuses while a server holds the data directory (the store's lock file).
It first copies the backup beside the database and checks the copy; only
then does it move the database it replaces aside, exactly as it is, with its
write-ahead log (`authpool.sqlite3.before-restore-<time>` and its `-wal`:
open it with sqlite3 to read it; it may be the damaged file the restore is
for, so nothing is merged or dropped), and renames the copy into place. No
old write-ahead file stays beside the restored database, where SQLite would
replay it onto the wrong file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from authpool_server.store.sqlite import SCHEMA_VERSION, data_dir_lock

__all__ = ["BackupError", "BackupSummary", "backup", "restore"]


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BackupSummary:
    schema_version: int
    live_leases: int
    usage_records: int
    last_sequence: int
    fencing_token: int

    def describe(self) -> str:
        return (
            f"{self.live_leases} live leases, {self.usage_records} usage records, "
            f"events up to sequence {self.last_sequence}, fencing token {self.fencing_token}"
        )


@contextlib.contextmanager
def _connection(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        yield conn
    finally:
        conn.close()


def _checked(conn: sqlite3.Connection, what: Path) -> BackupSummary:
    """What `conn`'s database holds, after making sure it is sound and not newer than this server."""
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        live = conn.execute("SELECT COUNT(*) FROM leases WHERE ended_at IS NULL").fetchone()[0]
        usage = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        newest = conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM events").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise BackupError(f"{what} is not an AuthPool database ({error})") from None
    if verdict != "ok":
        raise BackupError(f"{what} failed SQLite's integrity check: {verdict}")
    version = int(meta.get("schema_version", 0))
    if not 1 <= version <= SCHEMA_VERSION:
        raise BackupError(f"{what} has schema version {version}; this server knows 1 to {SCHEMA_VERSION}")
    return BackupSummary(
        schema_version=version,
        live_leases=live,
        usage_records=usage,
        last_sequence=max(newest, int(meta.get("last_sequence", 0))),
        fencing_token=int(meta.get("fencing_token", 0)),
    )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable(path: Path) -> None:
    """On disk, owner-only (it holds the pool's state)."""
    os.chmod(path, 0o600)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(source: Path, target: Path) -> None:
    """Make `source` durable, then rename it to `target` atomically."""
    _make_durable(source)
    os.replace(source, target)
    _fsync_dir(target.parent)


_SIDE_FILES = ("", "-wal", "-shm")  # a database and what SQLite keeps beside it


def backup(database: Path, target: Path) -> BackupSummary:
    """Copy the database at `database` to `target` while its server may be serving; what the copy holds."""
    if not database.is_file():
        raise BackupError(f"no AuthPool database at {database}: is --data-dir (or the config's dataDir) right?")
    target = target.resolve()
    if target == database.resolve():
        raise BackupError("the backup must not overwrite the database itself")
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        with _connection(database) as source, _connection(partial) as copy:
            source.backup(copy)  # all pages in one step: one consistent snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            summary = _checked(copy, target)
        _install(partial, target)
    except sqlite3.Error as error:
        raise BackupError(f"cannot back up {database}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)
    return summary


def restore(backup_file: Path, database: Path) -> tuple[BackupSummary, Path | None]:
    """Replace a stopped server's database with `backup_file`; what it holds, and where the old one was kept."""
    if not backup_file.is_file():
        raise BackupError(f"no backup at {backup_file}")
    database.parent.mkdir(parents=True, exist_ok=True)
    staged = database.with_name(f".{database.name}.restoring")
    with data_dir_lock(database, purpose="restoring"):
        try:
            staged.unlink(missing_ok=True)
            with _connection(backup_file) as source, _connection(staged) as copy:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
                summary = _checked(copy, backup_file)
            _make_durable(staged)
        except sqlite3.Error as error:
            staged.unlink(missing_ok=True)
            raise BackupError(f"{backup_file} is not an AuthPool database that can be restored ({error})") from None
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        kept = None
        if database.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            kept = database.with_name(f"{database.name}.before-restore-{stamp}")
            for suffix in _SIDE_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(database.with_name(database.name + suffix), kept.with_name(kept.name + suffix))
        database.with_name(database.name + "-journal").unlink(missing_ok=True)
        os.replace(staged, database)
        _fsync_dir(database.parent)
    return summary, kept
