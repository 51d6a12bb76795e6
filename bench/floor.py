"""The floor of the submit path: what submitting jobs costs with nothing but the drivers.

For each job, the durable work `POST /generate` does, with no HTTP, no FastAPI, no ORM:

* an INSERT of the same job row (same columns and values as `mediagen.core.jobs.submit._CREATE_SQL`: status
  `queued`, the prompt, the parameters as the API stores them, the exact model input with a random
  seed (as the default model's schema builds it, mediagen.catalog), the default model,
  owner `''`, max_attempts, `deadline_at = now() + deadline`, `dispatched_at = now()`), committed,
  through a raw asyncpg pool;
* the same Redis writes as `Dispatcher.send`: HSET of the message into `<ns>:<queue>.msgs` and RPUSH
  of its id onto `<ns>:<queue>`, in one MULTI pipeline (it *is* mediagen's Dispatcher, on the same
  redis-py BlockingConnectionPool of 64 the API builds).

`--concurrency` tasks share `--requests` jobs in one process (uvloop); each job is timed from its
INSERT to its enqueue. Three ways, each measured on its own:

* `autocommit` — THE floor, the figure submit is compared with: per job, one INSERT committed as its
  own transaction (one round trip), then `Dispatcher.send([job_id])`;
* `transaction` — per job, BEGIN; INSERT; COMMIT (three round trips, what a unit of work sends), then
  the send: for reference;
* `grouped` — the API's own group commit (mediagen.api.submissions) done with the drivers: jobs that
  arrive while a batch is written form the next batch, one `unnest` INSERT (the API's statement) and
  one send per batch: for reference, since the API batches and so can beat the per-job floor.

And the floor of the status route (`status`, with `--paths-file`): the route's own SELECT
(`mediagen.core.jobs.STATUS_SQL`, prepared) by job id, on the same raw pool, no HTTP.

Reads DATABASE_URL, REDIS_URL and MEDIAGEN_* from the environment, like the service. Prints one JSON
line: {mode: {"requests", "seconds", "rps", "p50_ms", "p99_ms", "cpu_ms_per_job"}} (CPU: this
process's user + system, per job).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import percentile, run_fast
from mediagen import services
from mediagen.api.schemas import GenerateRequest
from mediagen.broker import Dispatcher
from mediagen.catalog.catalog import Catalog
from mediagen.core import jobs
from mediagen.core.db import libpq_url
from mediagen.settings import Settings, get_settings

MODES = ("autocommit", "transaction", "grouped", "status")
PROMPT = "a lighthouse at dusk, oil on canvas"
BODY = {"prompt": PROMPT, "parameters": {"width": 512, "height": 512}}

INSERT_SQL = """
    INSERT INTO jobs (id, status, prompt, parameters, input, model, owner, idempotency_key, request_hash,
                      max_attempts, deadline_at, dispatched_at)
    VALUES ($1, 'queued', $2, CAST($3 AS jsonb), CAST($4 AS jsonb), $5, $6, $7, $8, $9,
            now() + make_interval(secs => $10), now())
    ON CONFLICT (owner, idempotency_key) DO NOTHING
"""

GROUP_INSERT_SQL = """
    INSERT INTO jobs (id, status, prompt, parameters, input, model, owner, idempotency_key, request_hash,
                      max_attempts, deadline_at, dispatched_at)
    SELECT n.id, 'queued', n.prompt, CAST(n.parameters AS jsonb), CAST(n.input AS jsonb), n.model, n.owner,
           n.idempotency_key, n.request_hash, n.max_attempts, now() + make_interval(secs => n.deadline), now()
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                $9::int[], $10::float8[])
         AS n(id, prompt, parameters, input, model, owner, idempotency_key, request_hash, max_attempts, deadline)
    ON CONFLICT (owner, idempotency_key) DO NOTHING
    RETURNING id
"""

Row = tuple[uuid.UUID, str, str, str, str, str, None, None, int, float]


def job_parameters() -> dict[str, Any]:
    """The parameters dict the API stores for BODY (its model_dump, model popped)."""
    params = GenerateRequest.model_validate(BODY).parameters.model_dump()
    params.pop("model")
    return params


def job_input(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """The model input the API stores for BODY on the default model (its seed replaced per job)."""
    schema = Catalog([settings.default_model]).get(settings.default_model)
    assert schema is not None, "the default model has a shipped schema"
    return schema.build_input(PROMPT, params, default_output_format=settings.default_output_format)


class Floor:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, dispatcher: Dispatcher) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.template = job_parameters()
        self.params = orjson.dumps(self.template).decode()
        self.input = job_input(settings, self.template)
        self.model = settings.default_model
        self.max_attempts = settings.max_attempts
        self.deadline = float(settings.job_deadline_seconds)
        self._waiting: list[tuple[Row, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.status_ids: list[uuid.UUID] = []
        self._next_status = 0

    def new_row(self) -> Row:
        model_input = orjson.dumps(dict(self.input, seed=random.randrange(2**32))).decode()
        return (
            uuid.uuid4(),
            PROMPT,
            self.params,
            model_input,
            self.model,
            "",
            None,
            None,
            self.max_attempts,
            self.deadline,
        )

    async def autocommit(self) -> None:
        row = self.new_row()
        async with self.pool.acquire() as conn:
            await conn.execute(INSERT_SQL, *row)
        await self.dispatcher.send([row[0]])

    async def transaction(self) -> None:
        row = self.new_row()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_SQL, *row)
        await self.dispatcher.send([row[0]])

    async def status(self) -> None:
        """The floor of `GET /status/{id}`: the route's own SELECT (prepared) on a raw pool, no HTTP."""
        job_id = self.status_ids[self._next_status % len(self.status_ids)]
        self._next_status += 1
        async with self.pool.acquire() as conn:
            await conn.fetchrow(jobs.STATUS_SQL, job_id, None)

    async def grouped(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((self.new_row(), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        await future

    async def _write_all(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:256], self._waiting[256:]
            columns = [list(column) for column in zip(*(row for row, _ in batch), strict=True)]
            try:
                async with self.pool.acquire() as conn:
                    inserted = await conn.fetch(GROUP_INSERT_SQL, *columns)
                await self.dispatcher.send(sorted((r["id"] for r in inserted), key=str))
            except Exception as error:
                for _, future in batch:
                    future.set_exception(error)
                continue
            for _, future in batch:
                future.set_result(None)


async def timed(total: int, concurrency: int, one_job: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    latencies: list[float] = []
    remaining = total

    async def task() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await one_job()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.wait_for(asyncio.gather(*(task() for _ in range(concurrency))), timeout=120)
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": round(seconds, 4),
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "cpu_ms_per_job": round(cpu * 1000 / max(1, len(latencies)), 3),
    }


async def measure(
    total: int, concurrency: int, pool_size: int, modes: list[str], status_ids: list[uuid.UUID]
) -> dict[str, Any]:
    settings = get_settings()
    assert settings.database_url and settings.redis_url
    pool = await asyncpg.create_pool(libpq_url(settings.database_url), min_size=pool_size, max_size=pool_size)
    redis = services.redis_client(settings)
    try:
        await redis.ping()
        floor = Floor(settings, pool, services.dispatcher(settings, redis))
        floor.status_ids = status_ids
        return {mode: await timed(total, concurrency, getattr(floor, mode)) for mode in modes}
    finally:
        await pool.close()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="the submit floor: raw asyncpg INSERT + Dispatcher.send")
    parser.add_argument("-n", "--requests", type=int, required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--pool-size", type=int, default=40, help="asyncpg pool (the API's is 20 + 20 overflow)")
    parser.add_argument("--modes", default="autocommit,transaction,grouped", help=f"of {', '.join(MODES)}")
    parser.add_argument("--paths-file", type=Path, help="status mode: the loadgen's /status/<id> lines")
    args = parser.parse_args()
    if not 0 < args.requests <= 200_000 or not 0 < args.concurrency <= 1024:
        parser.error("requests must be 1..200000, concurrency 1..1024")
    modes = [m for m in args.modes.split(",") if m in MODES]
    ids = []
    if "status" in modes:
        if args.paths_file is None:
            parser.error("the status mode needs --paths-file")
        ids = [uuid.UUID(line.rsplit("/", 1)[1]) for line in args.paths_file.read_text().split()]
    out = run_fast(measure(args.requests, args.concurrency, args.pool_size, modes, ids))
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
