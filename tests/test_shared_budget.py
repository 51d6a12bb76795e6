"""Several workers as several machines: one Replicate budget for all of them, and none of them indispensable.

The issue's test is 200 jobs through 3 workers against a fake limited to 60 creates a minute (200 s).
Scaled to keep the suite fast, the limit still binds: the fake allows 1,200 creates a minute (a burst
of 30), our budget takes 1,000 (a burst of 5), so 200 jobs take about 12 s of creates where the three
workers could otherwise start them in a second. The headroom is what a loaded machine needs: a worker
whose event loop wakes late gives its slot up and reserves another, but when the whole machine stalls
(seen with a load average of 8 on 2 cores), the fake's own event loop reads requests that were sent
spaced out at one instant.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conftest import FakeReplicate, kill_group, private_fake, unique
from mediagen.core.db import Database
from mediagen.devtools.embedded import free_port

JOBS = 200
CREATES_PER_MINUTE = 1200  # the fake's limit
BUDGET_PER_MINUTE = 1000  # ours


@pytest.fixture
def limited_fake(workdir: Any) -> Iterator[FakeReplicate]:
    with private_fake(workdir, "limited-fake", latency=0.3) as fake:
        fake.configure(
            create_rate_per_minute=CREATES_PER_MINUTE, create_burst=30, request_rate_per_minute=3000, request_burst=100
        )
        yield fake


async def test_three_workers_share_one_budget_see_no_429_and_survive_losing_one(
    make_stack: Any, limited_fake: FakeReplicate
) -> None:
    stack = make_stack(
        REPLICATE_BASE_URL=limited_fake.url,
        MEDIAGEN_REPLICATE_CREATES_PER_MINUTE=str(BUDGET_PER_MINUTE),
        MEDIAGEN_REPLICATE_CREATE_BURST="5",
        MEDIAGEN_REPLICATE_REQUESTS_PER_MINUTE="2400",
    )
    # Each worker its own settings, as on its own host: only PostgreSQL and Redis are shared.
    workers = [
        stack.start_worker(MEDIAGEN_WORKER_METRICS_PORT=str(free_port()), MEDIAGEN_WORKER_THREADS=threads)
        for threads in ("48", "32", "64")
    ]
    api_url = stack.start_api()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=api_url, timeout=20) as api:
        prompt = unique("one of many")
        answers = await asyncio.gather(
            *(api.post("/generate", json={"prompt": f"{prompt} {i}", "parameters": {}}) for i in range(JOBS))
        )
        assert all(answer.status_code == 202 for answer in answers)
        await asyncio.sleep(3.0)
        kill_group(workers[2].proc, signal.SIGKILL)  # one machine is lost mid-run
        db = Database(stack.database_url, pool_size=2)
        try:
            statuses: dict[str, int] = {}
            # A wait, not a target: with a worker lost, the run has taken from about 25 s to about 90 s on two
            # quiet cores (why it varies is not known yet); the promise is that every job succeeds, paced.
            while time.monotonic() - started < 150:
                async with db.connect() as conn:
                    rows = await conn.execute(text("SELECT status, count(*) AS n FROM jobs GROUP BY status"))
                    statuses = {row.status: row.n for row in rows}
                if statuses.get("succeeded", 0) + statuses.get("failed", 0) == JOBS:
                    break
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - started
            async with db.connect() as conn:
                outcomes = {
                    (row.outcome, row.error_class): row.n
                    for row in await conn.execute(
                        text("SELECT outcome, error_class, count(*) AS n FROM attempts GROUP BY 1, 2")
                    )
                }
        finally:
            await db.dispose()

    faults = limited_fake.stats()["faults"]
    assert statuses == {"succeeded": JOBS}, statuses
    assert faults.get("rate_limited_create", 0) == 0 and faults.get("rate_limited_request", 0) == 0, faults
    # No attempt failed: the only attempts besides the 200 successes are those the lost worker held.
    assert set(outcomes) <= {("succeeded", None), ("abandoned", "WorkerLost")}, outcomes
    assert outcomes[("succeeded", None)] == JOBS
    # The budget bound: 200 creates at our 1,000 a minute cannot be done in much under 12 s.
    assert elapsed >= (JOBS - 5) / (BUDGET_PER_MINUTE / 60)
