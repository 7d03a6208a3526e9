"""API keys: create, list, revoke, authenticate, and a rate limit per key.

Authentication runs on every call, so a key's lookup is cached for a couple
of seconds; a revocation takes effect at once on the replica that made it and
within `cache_seconds` on the others. `last_use_time` is written at most once
a minute per key, off the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from brightrun_server.domain import auth, caller
from brightrun_server.domain.caller import Caller, Role
from brightrun_server.domain.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from brightrun_server.domain.listing import decode_page_token, encode_page_token, page_size
from brightrun_server.services.jobs import utcnow
from brightrun_server.store.db import Database
from brightrun_server.store.models import ApiKeyRow
from brightrun_server.store.query import after_key

log = logging.getLogger(__name__)

MAX_TTL = timedelta(days=3650)
#: Where the server writes the admin key it makes for a store without keys.
ADMIN_KEY_FILE = "admin-api-key"
_LAST_USE_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class _Known:
    row: ApiKeyRow
    fetched: float


class _Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self) -> float:
        """0 if a call may go ahead now, else seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ApiKeys:
    def __init__(
        self,
        db: Database,
        *,
        rate_per_second: float = 0.0,
        burst: int = 0,
        cache_seconds: float = 2.0,
    ) -> None:
        self._db = db
        self._rate = rate_per_second
        self._burst = max(burst, 1)
        self._cache_seconds = cache_seconds
        self._known: dict[str, _Known] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._last_use: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ per call

    async def authenticate(self, secret: str | None) -> Caller:
        """The caller a secret stands for; Unauthenticated when there is none."""
        if not secret:
            raise Unauthenticated(
                "this call needs an API key: send metadata 'authorization: Bearer <key>' "
                "(the SDK and CLI read BRIGHTRUN_API_KEY)",
                reason="API_KEY_MISSING",
            )
        key_id = auth.parse(secret)
        if key_id is None:
            raise Unauthenticated("malformed API key: expected brk_<id>_<secret>", reason="API_KEY_INVALID")
        row = await self._lookup(key_id)
        if row is None or not auth.matches(secret, row.secret_hash):
            raise Unauthenticated("unknown API key", reason="API_KEY_INVALID")
        now = utcnow()
        if row.revoke_time is not None:
            raise Unauthenticated(
                f"API key {row.id} was revoked at {row.revoke_time.isoformat()}",
                reason="API_KEY_REVOKED",
                metadata={"api_key_id": row.id, "revoke_time": row.revoke_time.isoformat()},
            )
        if row.expire_time is not None and row.expire_time <= now:
            raise Unauthenticated(
                f"API key {row.id} expired at {row.expire_time.isoformat()}",
                reason="API_KEY_EXPIRED",
                metadata={"api_key_id": row.id, "expire_time": row.expire_time.isoformat()},
            )
        self._note_use(row.id)
        return Caller(project=row.project, actor=row.name, role=Role(row.role), key_id=row.id)

    def authorize(self, who: Caller, required: Role, method: str) -> None:
        if not auth.allows(who.role, required):
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs the {required.value} role; this key is {who.role.value}",
                reason="ROLE_REQUIRED",
                metadata={"required_role": required.value, "role": who.role.value, "method": method},
            )

    def check_rate(self, who: Caller) -> None:
        if self._rate <= 0:
            return
        bucket = self._buckets.get(who.key_id)
        if bucket is None:
            bucket = self._buckets[who.key_id] = _Bucket(self._rate, self._burst)
        wait = bucket.take()
        if wait > 0:
            raise ResourceExhausted(
                f"API key {who.key_id} is over its limit of {self._rate:g} calls a second; retry in {wait:.2f}s",
                reason="RATE_LIMITED",
                metadata={"api_key_id": who.key_id, "limit_per_second": f"{self._rate:g}"},
                retry_after=wait,
            )

    async def _lookup(self, key_id: str) -> ApiKeyRow | None:
        known = self._known.get(key_id)
        if known is not None and time.monotonic() - known.fetched < self._cache_seconds:
            return known.row
        async with self._db.read() as session:
            row = await session.get(ApiKeyRow, key_id)
        if row is None:
            self._known.pop(key_id, None)
            return None
        self._known[key_id] = _Known(row, time.monotonic())
        return row

    def _note_use(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._last_use.get(key_id, -_LAST_USE_EVERY) < _LAST_USE_EVERY:
            return
        self._last_use[key_id] = now
        task = asyncio.get_running_loop().create_task(self._write_last_use(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_last_use(self, key_id: str) -> None:
        try:
            async with self._db.write() as session:
                await session.execute(sa.update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_use_time=utcnow()))
        except Exception:  # bookkeeping only: never fail or log-spam a call over it
            log.debug("could not record the use of key %s", key_id, exc_info=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ management

    async def create(self, *, name: str, role: Role | None, ttl: timedelta | None) -> tuple[ApiKeyRow, str]:
        violations = []
        name = name.strip()
        if not 1 <= len(name) <= 64:
            violations.append(FieldViolation("name", f"must be 1 to 64 characters, got {len(name)}"))
        if ttl is not None and not timedelta(0) <= ttl <= MAX_TTL:
            violations.append(FieldViolation("ttl", "must be between 0 (no expiry) and 3650 days"))
        if violations:
            raise InvalidArgument(violations)
        who = caller.current()
        return await self.insert(
            project=who.project,
            name=name,
            role=role or Role.MEMBER,
            created_by=who.actor,
            ttl=ttl or None,
        )

    async def insert(
        self, *, project: str, name: str, role: Role, created_by: str, ttl: timedelta | None = None
    ) -> tuple[ApiKeyRow, str]:
        new = auth.generate()
        now = utcnow()
        row = ApiKeyRow(
            id=new.id,
            name=name,
            project=project,
            role=role.value,
            secret_hash=new.secret_hash,
            created_by=created_by,
            create_time=now,
            expire_time=now + ttl if ttl else None,
            revoke_time=None,
            last_use_time=None,
        )
        async with self._db.write() as session:
            session.add(row)
        return row, new.secret

    async def list(self, *, size: int, token: str, show_revoked: bool) -> tuple[list[ApiKeyRow], str]:
        limit = page_size(size, default=50, maximum=1000)
        project = caller.current().project
        scope = f"api_keys|{project}|{show_revoked}"
        query = sa.select(ApiKeyRow).where(ApiKeyRow.project == project)
        if not show_revoked:
            query = query.where(ApiKeyRow.revoke_time.is_(None))
        key = decode_page_token(token, scope, ("time", "str"))
        if key is not None:
            query = query.where(
                after_key(
                    [ApiKeyRow.create_time, ApiKeyRow.id], [datetime.fromisoformat(key[0]), key[1]], descending=True
                )
            )
        query = query.order_by(ApiKeyRow.create_time.desc(), ApiKeyRow.id.desc()).limit(limit + 1)
        async with self._db.read() as session:
            rows = list((await session.scalars(query)).all())
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            next_token = encode_page_token([rows[-1].create_time.isoformat(), rows[-1].id], scope)
        return rows, next_token

    async def revoke(self, key_id: str) -> ApiKeyRow:
        if not key_id:
            raise InvalidArgument([FieldViolation("api_key_id", "required: the key's id, not its secret")])
        async with self._db.write() as session:
            row = await session.get(ApiKeyRow, key_id, with_for_update=True)
            if row is None or row.project != caller.current().project:
                raise NotFound("api_key", key_id)
            if row.revoke_time is None:
                row.revoke_time = utcnow()
        self._known.pop(key_id, None)
        return row

    async def get(self, key_id: str) -> ApiKeyRow:
        row = await self._lookup(key_id)
        if row is None or row.project != caller.current().project:
            raise NotFound("api_key", key_id)
        return row

    # ------------------------------------------------------------ bootstrap

    async def bootstrap(self, secret: str | None, data_dir: Path) -> Path | None:
        """Make sure someone can call the server.

        With `secret` (BRIGHTRUN_BOOTSTRAP_API_KEY), that key is the default
        project's admin key, created or re-hashed as needed (a revoked one
        stays revoked). Without it, a store with no keys at all gets a fresh
        admin key, written to `<data dir>/admin-api-key` (mode 0600); the path
        is returned so the server can say where it is.
        """
        if secret:
            key_id = auth.parse(secret)
            if key_id is None:
                raise ValueError("bootstrap_api_key (BRIGHTRUN_BOOTSTRAP_API_KEY) must look like brk_<12>_<40>")
            async with self._db.write() as session:
                row = await session.get(ApiKeyRow, key_id)
                if row is None:
                    session.add(
                        ApiKeyRow(
                            id=key_id,
                            name="bootstrap",
                            project=caller.DEFAULT_PROJECT,
                            role=Role.ADMIN.value,
                            secret_hash=auth.hash_secret(secret),
                            created_by="server",
                            create_time=utcnow(),
                            expire_time=None,
                            revoke_time=None,
                            last_use_time=None,
                        )
                    )
                elif row.revoke_time is not None:
                    log.warning("the bootstrap API key %s is revoked; it stays revoked", key_id)
                else:
                    row.secret_hash = auth.hash_secret(secret)
            return None
        async with self._db.read() as session:
            existing = await session.scalar(sa.select(sa.func.count()).select_from(ApiKeyRow))
        if existing:
            return None
        _, new_secret = await self.insert(
            project=caller.DEFAULT_PROJECT, name="admin", role=Role.ADMIN, created_by="server"
        )
        path = data_dir / ADMIN_KEY_FILE
        await asyncio.to_thread(_write_private, path, new_secret + "\n")
        log.warning("created an admin API key for project %r; its secret is in %s", caller.DEFAULT_PROJECT, path)
        return path


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
