"""Engine, sessions and migrations for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout; because one server process owns an
SQLite file, write transactions are serialised in-process with an asyncio lock,
which rules out SQLite's lock-upgrade deadlocks. PostgreSQL writers lock the rows
they change (`SELECT ... FOR UPDATE`) instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

MIGRATIONS = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> tuple[URL, URL]:
    """Return (async URL, sync URL) for a user-facing database URL."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite"), parsed.set(drivername="sqlite")
    if backend == "postgresql":
        pg = parsed.set(drivername="postgresql+psycopg")
        return pg, pg
    raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


def _json_loads(text: str | bytes) -> Any:
    """orjson for speed (list pages decode a dozen JSON columns per job); the
    standard parser for what orjson refuses, such as the NaN a diverged loss writes."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class Database:
    """Owns the engine; hands out read sessions and write transactions."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.async_url, self.sync_url = normalise_url(url)
        self.is_sqlite = self.async_url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo, "json_deserializer": _json_loads}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: AsyncEngine = create_async_engine(self.async_url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    def migrate(self) -> None:
        """Bring the schema to the newest migration (blocking)."""
        if self.is_sqlite and self.sync_url.database not in (None, "", ":memory:"):
            Path(self.sync_url.database).parent.mkdir(parents=True, exist_ok=True)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        # Passed as an attribute, not an option: options go through configparser
        # interpolation, which breaks on the '%' of percent-encoded URLs.
        cfg.attributes["url"] = self.sync_url.render_as_string(hide_password=False)
        command.upgrade(cfg, "head")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction committed on success and rolled back on error."""
        if self._write_lock is None:
            async with self._sessions() as session, session.begin():
                yield session
            return
        async with self._write_lock, self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()


def compare_column_types(
    ctx: Any, inspected_column: Any, metadata_column: Any, inspected_type: Any, metadata_type: Any
) -> bool | None:
    """Alembic's type comparison (autogenerate, and the test that the migrated
    schema matches the models), except VARCHAR lengths on SQLite, which SQLite does
    not enforce: migration 0002 widens jobs.state on PostgreSQL only."""
    if (
        ctx.dialect.name == "sqlite"
        and isinstance(inspected_type, sa.String)
        and isinstance(metadata_type, sa.String)
        and isinstance(inspected_type, sa.Text) == isinstance(metadata_type, sa.Text)
    ):
        return False
    return None  # the default comparison


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
