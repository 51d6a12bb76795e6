"""The database: URLs, the engine, and the unit of work shared by the API and the worker.

Domain code takes an `AsyncConnection` and never commits: `async with db.transaction() as conn:`
commits when the block ends and rolls back when it raises, the same way in the API and the worker.
Engines are built lazily on the event loop that uses them (one per process), never per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import sqlalchemy.exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

UNREACHABLE: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
    TimeoutError,
    OSError,
)
"""What the drivers raise when PostgreSQL cannot be reached (not a bad statement)."""


def is_unreachable(error: BaseException) -> bool:
    """Did this error come from PostgreSQL being out of reach? SQLAlchemy wraps a connection that broke
    mid-statement as a plain `DBAPIError`: its causes tell (e.g. `ConnectionResetError`)."""
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, UNREACHABLE) or getattr(seen, "connection_invalidated", False):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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


def _expire(turn: asyncio.Future[Any]) -> None:
    if not turn.done():
        turn.set_exception(TimeoutError("no database connection became free in time"))


class StatementPool:
    """asyncpg connections for single statements, each its own transaction: the hot path.

    asyncpg's own Pool does, on every use, what these statements do not need: a session reset (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL: a round trip), a Task to shield the release, an asyncio
    Queue and a proxy object: about 80 µs of CPU a statement on this kind of machine, a sixth of a
    `GET /status`. This pool keeps idle connections in a list (newest first), hands a released one
    straight to the oldest waiter, and drops a connection that a statement left in doubt: a
    connection error, a timeout, a cancellation. A statement's own error (a constraint, say) leaves
    its connection usable, as PostgreSQL aborted only that statement.
    """

    def __init__(
        self, url: str, *, max_size: int, connect_timeout: float, acquire_timeout: float, max_idle: float = 300.0
    ) -> None:
        self._url = url
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._max_idle = max_idle
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        self._waiting: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self.size = 0
        """Connections open or being opened."""
        self._closing = False

    async def run(self, method: str, query: str, args: tuple[object, ...], within: float) -> Any:
        """`conn.<method>(query, *args)` (fetchrow, fetchval or execute) on a connection of the pool."""
        conn = await self._acquire()
        try:
            result = await getattr(conn, method)(query, *args, timeout=within)
        except asyncpg.PostgresError:
            self._release(conn)  # closed by now if the error was the connection's
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._release(conn)
        return result

    async def _acquire(self) -> asyncpg.Connection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._acquire_timeout
        while True:
            if self._closing:
                raise asyncpg.InterfaceError("the pool is closing")
            now = time.monotonic()
            while self._idle:
                conn, since = self._idle.pop()
                if not conn.is_closed() and now - since < self._max_idle:
                    return conn
                self._discard(conn)
            if self.size < self._max_size:
                return await self._connect()
            turn: asyncio.Future[asyncpg.Connection | None] = loop.create_future()
            self._waiting.append(turn)
            handle = loop.call_at(deadline, _expire, turn)
            try:
                conn = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled() and turn.exception() is None:
                    # Handed a connection (or room for one) just as we were canceled: pass it on.
                    handed = turn.result()
                    if handed is not None:
                        self._release(handed)
                    else:
                        self._hand_over(None)
                raise
            finally:
                handle.cancel()
            if conn is not None:
                return conn
            # None: a connection was dropped, so there is room to open one.

    async def _connect(self) -> asyncpg.Connection:
        self.size += 1
        try:
            conn = await asyncpg.connect(self._url, timeout=self._connect_timeout, command_timeout=30)
        except BaseException:
            self._dropped()
            raise
        try:
            await _json_codecs(conn)
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def _release(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or self._closing or conn.is_in_transaction():
            self._discard(conn)
            return
        if not self._hand_over(conn):
            self._idle.append((conn, time.monotonic()))

    def _discard(self, conn: asyncpg.Connection) -> None:
        if not conn.is_closed():
            conn.terminate()
        self._dropped()

    def _dropped(self) -> None:
        self.size -= 1
        self._hand_over(None)  # the oldest waiter may open a connection in this one's place

    def _hand_over(self, conn: asyncpg.Connection | None) -> bool:
        """Give a connection (or, None, room for one) to the oldest waiter; False if none waits."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        self._closing = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            self._dropped()
        for turn in self._waiting:
            if not turn.done():
                turn.set_exception(asyncpg.InterfaceError("the pool is closing"))


class Database:
    """SQLAlchemy for most things, plus a lean pool of asyncpg connections for the hottest statements.

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
        self._fast = StatementPool(
            libpq_url(url),
            max_size=pool_size,
            connect_timeout=connect_timeout,
            acquire_timeout=pool_timeout or 10.0,
        )
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
        return await self._fast.run("fetchval", query, args, 30)

    async def execute(self, query: str, *args: object) -> str:
        status: str = await self._fast.run("execute", query, args, 30)
        return status

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._fast.run("fetch", query, args, 30)
        return rows

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record | None:
        """One row through the statement pool (prepared and cached per connection)."""
        row: asyncpg.Record | None = await self._fast.run("fetchrow", query, args, 10)
        return row

    async def dispose(self) -> None:
        await self._fast.close()
        await self.engine.dispose()
