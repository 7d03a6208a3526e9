"""The embedded SQLite store: the lock a server holds on it, and online backup
and restore.

A server using an SQLite file holds an exclusive `flock` on `{file}.lock` for
its whole life. The kernel drops the lock when the process ends, however it
ends (SIGKILL included), so the lock says reliably whether a server is using
the file: a server that gets it knows every earlier server on this store is
dead (and takes over their trainers at once), a second server on the same file
is refused, and so is a restore under a running server. The descriptor is not
inherited by trainers, so a trainer that outlives its server never keeps the
lock.

Backups use SQLite's online backup API: it copies the database as of one read
transaction (WAL mode lets the server keep writing meanwhile), committed WAL
content included, into a standalone file (rollback journal, no -wal/-shm
companions), checked with `PRAGMA integrity_check` and renamed into place only
when complete. A restore checks the backup (integrity, BrightRun schema, a
revision this server knows) before touching anything, then moves the current
database (with its -wal and -shm files) aside instead of deleting it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from brightrun_server.store.db import MIGRATIONS

#: Tables whose rows a backup summary counts.
COUNTED = ("jobs", "datasets", "job_metrics", "job_events")
#: Companion files of an SQLite database in WAL mode.
COMPANIONS = ("-wal", "-shm")


class StoreError(Exception):
    """An embedded-store operation could not be done; the message says why."""


class StoreInUse(StoreError):
    """A server holds the store's lock."""


def sqlite_path(url: str) -> Path | None:
    """The database file of an sqlite:/// URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser().resolve()


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


class StoreLock:
    """An exclusive, non-blocking `flock` on `{db}.lock`; the lock file records the holder's pid."""

    def __init__(self, db_path: Path) -> None:
        self.path = lock_path(db_path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"the database {self.path.with_suffix('')} is in use by a running BrightRun server (pid {holder}); "
                "stop it first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class Summary:
    """What a database file holds."""

    path: Path
    size_bytes: int
    revision: str
    rows: dict[str, int]

    def describe(self) -> str:
        counts = ", ".join(f"{n} {table.replace('job_', '')}" for table, n in self.rows.items())
        return f"{self.path} ({self.size_bytes:,} bytes, schema {self.revision}): {counts}"


def backup(db_path: Path, dest: Path, *, overwrite: bool = False) -> Summary:
    """Copy the live database `db_path` into the standalone file `dest`, consistently,
    while a server may be writing to it."""
    if not db_path.is_file():
        raise StoreError(f"no database at {db_path}")
    dest = dest.expanduser().resolve()
    if dest.parent == db_path.parent and dest.name.startswith(db_path.name):
        raise StoreError(f"back up to a file outside the store's own files, not {dest}")
    if dest.exists() and not overwrite:
        raise StoreError(f"{dest} exists; choose another name or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with contextlib.closing(sqlite3.connect(db_path, timeout=60)) as source:
            source.execute("PRAGMA busy_timeout=60000")
            with contextlib.closing(sqlite3.connect(tmp)) as target:
                # One step (all pages) = one read transaction = one consistent snapshot.
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
        summary = inspect(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except sqlite3.Error as e:
        raise StoreError(f"backing up {db_path} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return Summary(dest, summary.size_bytes, summary.revision, summary.rows)


def restore(source: Path, db_path: Path) -> tuple[Summary, Path | None]:
    """Make the backup `source` the database at `db_path`. Refuses while a server
    holds the store's lock. The current database, if any, is moved aside, not
    deleted; returns the restored summary and where the old database went."""
    source = source.expanduser().resolve()
    if not source.is_file():
        raise StoreError(f"no backup at {source}")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    # Copy first (the backup may live on another filesystem and must not change
    # under us), check the copy, and only then touch the store.
    staged = db_path.with_name(f".{db_path.name}.restore-{os.getpid()}")
    try:
        with open(source, "rb") as src, open(staged, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        summary = inspect(staged)
        with StoreLock(db_path):
            aside: Path | None = None
            if db_path.exists():
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
                aside = db_path.with_name(f"{db_path.name}.pre-restore-{stamp}")
                for suffix in ("", *COMPANIONS):
                    current = Path(f"{db_path}{suffix}")
                    if current.exists():
                        os.replace(current, Path(f"{aside}{suffix}"))
            else:
                for suffix in COMPANIONS:  # stale companions of a missing database
                    Path(f"{db_path}{suffix}").unlink(missing_ok=True)
            os.replace(staged, db_path)
            _fsync(db_path.parent)
    finally:
        staged.unlink(missing_ok=True)
    return Summary(db_path, summary.size_bytes, summary.revision, summary.rows), aside


def inspect(path: Path) -> Summary:
    """Check that `path` is an intact BrightRun database of a schema this server
    knows; summarise it. StoreError says what is wrong otherwise."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            check = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            if check != ["ok"]:
                raise StoreError(f"{path} is damaged: {'; '.join(check[:5])}")
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"alembic_version", *COUNTED} - tables
            if missing:
                raise StoreError(f"{path} is not a BrightRun database (no table {', '.join(sorted(missing))})")
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            rows = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in COUNTED}
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a readable SQLite database: {e}") from e
    if revision is None or revision[0] not in known_revisions():
        raise StoreError(f"{path} has schema revision {revision and revision[0]!r}, which this server does not know")
    return Summary(path, path.stat().st_size, revision[0], rows)


def known_revisions() -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
