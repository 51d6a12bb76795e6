"""The pool behind the hot statements (status, claim, record, succeed, fail), on a real PostgreSQL:
connections are reused and capped, a wait is bounded, and a connection a statement left in doubt is
replaced rather than handed to the next caller."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from mediagen.core.db import StatementPool, libpq_url


def pool_for(database_url: str, **kwargs: float) -> StatementPool:
    options: dict[str, float] = {"max_size": 4, "connect_timeout": 2.0, "acquire_timeout": 5.0, **kwargs}
    return StatementPool(libpq_url(database_url), **options)  # type: ignore[arg-type]


async def backends(pool: StatementPool, count: int) -> set[int]:
    return set(await asyncio.gather(*(pool.run("fetchval", "SELECT pg_backend_pid()", (), 5) for _ in range(count))))


async def test_connections_are_reused_and_never_more_than_the_cap(database_url: str) -> None:
    pool = pool_for(database_url)
    try:
        seen = set()
        for _ in range(5):
            seen |= await backends(pool, 40)
        assert 1 <= len(seen) <= 4
        assert pool.size == len(seen)
    finally:
        await pool.close()


async def test_rows_come_back_decoded(database_url: str) -> None:
    pool = pool_for(database_url)
    try:
        job_id = uuid.uuid4()
        row = await pool.run("fetchrow", "SELECT $1::uuid AS id, '{\"a\": [1]}'::jsonb AS doc", (job_id,), 5)
        assert row is not None
        assert (row["id"], row["doc"]) == (job_id, {"a": [1]})
        assert await pool.run("execute", "SELECT 1", (), 5) == "SELECT 1"
    finally:
        await pool.close()


async def test_a_wait_for_a_connection_is_bounded(database_url: str) -> None:
    pool = pool_for(database_url, max_size=1, acquire_timeout=0.2)
    try:
        sleeper = asyncio.ensure_future(pool.run("execute", "SELECT pg_sleep(1)", (), 5))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await pool.run("fetchval", "SELECT 1", (), 5)
        await sleeper
        assert await pool.run("fetchval", "SELECT 2", (), 5) == 2
    finally:
        await pool.close()


async def test_a_statement_error_keeps_the_connection_a_timeout_replaces_it(database_url: str) -> None:
    pool = pool_for(database_url, max_size=1)
    try:
        first = await pool.run("fetchval", "SELECT pg_backend_pid()", (), 5)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await pool.run("fetchval", "SELECT 1 / 0", (), 5)
        assert await pool.run("fetchval", "SELECT pg_backend_pid()", (), 5) == first
        with pytest.raises(TimeoutError):
            await pool.run("execute", "SELECT pg_sleep(5)", (), 0.2)
        second = await pool.run("fetchval", "SELECT pg_backend_pid()", (), 5)
        assert second != first
        assert pool.size == 1
    finally:
        await pool.close()


async def test_a_canceled_caller_gives_its_connection_back(database_url: str) -> None:
    pool = pool_for(database_url, max_size=1)
    try:
        busy = asyncio.ensure_future(pool.run("execute", "SELECT pg_sleep(0.6)", (), 5))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.run("fetchval", "SELECT 1", (), 5))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await busy
        running = asyncio.ensure_future(pool.run("execute", "SELECT pg_sleep(5)", (), 5))
        await asyncio.sleep(0.1)
        running.cancel()  # mid-statement: that connection is dropped, a new one takes its place
        assert await asyncio.wait_for(pool.run("fetchval", "SELECT 3", (), 5), 5) == 3
        assert pool.size == 1
    finally:
        await pool.close()


async def test_a_connection_killed_by_the_server_is_replaced(database_url: str) -> None:
    pool = pool_for(database_url, max_size=1)
    try:
        victim = await pool.run("fetchval", "SELECT pg_backend_pid()", (), 5)
        killer = await asyncpg.connect(libpq_url(database_url))
        try:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", victim)
        finally:
            await killer.close()
        await asyncio.sleep(0.5)  # the pool's idle connection sees the server hang up
        assert await pool.run("fetchval", "SELECT pg_backend_pid()", (), 5) != victim
    finally:
        await pool.close()
