"""The database: URLs, the engine, and the unit of work shared by the API and the worker.

Domain code takes an `AsyncConnection` and never commits: `async with db.transaction() as conn:`
commits when the block ends and rolls back when it raises, the same way in the API and the worker.
Engines are built lazily on the event loop that uses them (one per process), never per job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


class Database:
    def __init__(self, url: str, *, pool_size: int = 20, connect_timeout: float = 2.0) -> None:
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=connect_timeout,
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

    async def dispose(self) -> None:
        await self.engine.dispose()
