"""The database: URLs, the engine, and the unit of work shared by the API and the worker.

Domain code takes an `AsyncConnection` and never commits: `async with db.transaction() as conn:`
commits when the block ends and rolls back when it raises, the same way in the API and the worker.
Engines are built lazily on the event loop that uses them (one per process), never per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def async_url(url: str) -> str:
    """`postgresql://...` (any driver) → the asyncpg dialect SQLAlchemy runs on."""
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """`postgresql://...` → the psycopg 3 dialect Alembic migrates with."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The plain `postgresql://` URL asyncpg's and libpq's own connect functions take."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The fast pool's reset on release. asyncpg's default (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL) is a round trip per statement we send; our statements set no session state, and an
    open transaction is still rolled back by asyncpg before this is called."""


class Database:
    """SQLAlchemy for most things, plus a lean asyncpg pool for the hottest statements.

    `GET /status/{id}` (the route clients poll) and the worker's per-attempt writes (claim, record
    the prediction, succeed, fail) run through the raw driver as single prepared statements: each is
    its own transaction, one round trip, no ORM or Core compilation, which halves their CPU. The
    rest goes through SQLAlchemy and its unit of work (`transaction()`).
    """

    def __init__(
        self, url: str, *, pool_size: int = 10, connect_timeout: float = 2.0, pool_timeout: float | None = None
    ) -> None:
        """`connect_timeout` bounds a new connection (the API answers 503 within it when PostgreSQL is
        gone); `pool_timeout` bounds the wait for a free one (the worker waits, the API does not)."""
        self._url = url
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout or 10.0
        self._fast: asyncpg.Pool | None = None
        self._fast_lock = asyncio.Lock()
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=pool_timeout or connect_timeout,
            pool_pre_ping=False,
            connect_args={"timeout": connect_timeout, "command_timeout": 30},
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def fetchval(self, query: str, *args: object) -> Any:
        pool = self._fast or await self._fast_pool()
        async with pool.acquire(timeout=self._pool_timeout) as conn:
            return await conn.fetchval(query, *args, timeout=30)

    async def execute(self, query: str, *args: object) -> str:
        pool = self._fast or await self._fast_pool()
        async with pool.acquire(timeout=self._pool_timeout) as conn:
            status: str = await conn.execute(query, *args, timeout=30)
            return status

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        """One row through the raw asyncpg pool (prepared and cached per connection)."""
        pool = self._fast or await self._fast_pool()
        async with pool.acquire(timeout=self._pool_timeout) as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args, timeout=10)
            return row

    async def _fast_pool(self) -> asyncpg.Pool:
        async with self._fast_lock:
            if self._fast is None:
                self._fast = await asyncpg.create_pool(
                    libpq_url(self._url),
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    command_timeout=30,
                    init=_json_codecs,
                    reset=_keep_session,
                )
            return self._fast

    async def dispose(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        await self.engine.dispose()
