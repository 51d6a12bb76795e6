"""An outage is a pause, not a failure: a job that meets the account's open circuit waits in its attempt,
spending none, keeps the prediction it has in flight, says so in its status, and still ends at its deadline.

First as units of the attempt protocol (a stub provider raising `ProviderOutage`, as the budget's
reservation does while the circuit is open; the world of tests/test_attempt_protocol.py), then the whole
stack through the fake Replicate's outage (every `/v1/` endpoint 503).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conftest import private_fake, submit, unique, wait_for_job
from mediagen.core import jobs
from mediagen.core.errors import ProviderOutage
from test_attempt_protocol import World, attempt_rows, job_row, logged, processing, succeeded, world

__all__ = ["logged", "world"]  # fixtures, shared with the protocol's own tests


def outage(seconds: float = 0.05) -> ProviderOutage:
    return ProviderOutage("Replicate is unavailable to every worker", retry_after=seconds)


async def test_a_prediction_in_flight_waits_out_the_outage_and_is_resumed_in_the_same_attempt(
    world: World, logged: Any
) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made), outage(), outage(), outage(), succeeded(made)]

    await world.run(job_id)

    assert world.provider.named("create") == ["black-forest-labs/flux-schnell"]  # one prediction, paid once
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.prediction_id, attempt.outcome) == (made, "succeeded")
    row = await job_row(world.ctx.db, job_id)
    assert (row.status, row.attempts, row.waiting_for) == ("succeeded", 1, None)
    assert len(logged("job.waiting_for_provider")) == 1


async def test_a_job_waiting_on_the_provider_says_so_in_its_status(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    seen: list[str | None] = []
    world.provider.answers[made] = [processing(made), outage(0.2), succeeded(made)]

    async def look() -> None:
        view = await jobs.get_status(world.ctx.db, job_id)
        assert view is not None
        seen.append(jobs.shown_waiting_for(view.status, view.waiting_for))

    world.provider.on_get = look
    await world.run(job_id)

    # before the outage, during it (the GET after the wait), and after it: the finished job shows nothing
    assert seen[0] is None and "provider" in seen
    view = await jobs.get_status(world.ctx.db, job_id)
    assert view is not None and view.status == "succeeded" and view.waiting_for is None


async def test_a_create_refused_by_the_open_circuit_is_made_once_the_provider_is_back(world: World) -> None:
    job_id = await world.job()
    world.provider.creates = [outage(), outage(), "starting"]

    await world.run(job_id)

    assert len(world.provider.made) == 1
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert attempt.outcome == "succeeded"


async def test_the_deadline_still_ends_a_job_waiting_on_the_provider(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made), outage()]
    async with world.ctx.db.transaction() as conn:
        await conn.execute(
            text("UPDATE jobs SET deadline_at = :at WHERE id = :id"),
            {"at": datetime.now(UTC) + timedelta(seconds=1), "id": job_id},
        )

    await world.run(job_id)

    row = await job_row(world.ctx.db, job_id)
    assert (row.status, row.error_class, row.attempts) == ("failed", "JobDeadlineExceeded", 1)


async def test_a_cancel_during_an_outage_wait_ends_the_job_at_once_and_cancels_its_prediction(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made), outage(30)]
    running = asyncio.create_task(world.run(job_id))
    while world.provider.named("get") != [made, made]:  # the second look met the open circuit: 30 s to wait
        await asyncio.sleep(0.01)

    async with world.ctx.db.transaction() as conn:
        await jobs.request_cancel(conn, job_id)
    await world.ctx.leases.watch_cancels()  # what the lease keeper does every second
    await asyncio.wait_for(running, 2)  # not 30 s: the wait ends with the cancel
    await asyncio.wait_for(asyncio.gather(*world.ctx.cancels), 5)

    assert world.provider.canceled == [made]
    view = await jobs.get_status(world.ctx.db, job_id)
    assert view is not None
    assert (view.status, view.attempts, jobs.shown_waiting_for(view.status, view.waiting_for)) == ("canceled", 1, None)


# --- the whole stack, through the fake's outage ---------------------------------------------------------


async def test_jobs_in_flight_or_submitted_during_an_outage_succeed_after_it_paying_once(
    make_stack: Any, workdir: Any
) -> None:
    with private_fake(workdir, "outage-fake", latency=5.0) as fake:
        stack = make_stack(
            REPLICATE_BASE_URL=fake.url,
            MEDIAGEN_REPLICATE_CIRCUIT_FAILURES="3",
            MEDIAGEN_REPLICATE_CIRCUIT_OPEN_SECONDS="1",
        )
        worker = stack.start_worker()
        api_url = stack.start_api()
        prompts = [unique(f"a quiet harbour {n}") for n in range(4)]
        async with httpx.AsyncClient(base_url=api_url, timeout=20) as api:
            ids = [await submit(api, prompt, width=512, height=512) for prompt in prompts]
            await _until_all(api, ids, lambda body: body["status"] == "running")
            httpx.post(f"{fake.url}/_fake/outage", json={"seconds": 8}).raise_for_status()
            started = time.monotonic()

            waiting = await _until_all(api, ids, lambda body: body.get("waiting_for") == "provider", at_least=1)
            # submitted while the circuit is open: their creates wait too, sent only once Replicate is back
            late = [unique(f"a late harbour {n}") for n in range(2)]
            prompts += late
            ids += [await submit(api, prompt, width=512, height=512) for prompt in late]
            finished = [await wait_for_job(api, job_id, timeout=60) for job_id in ids]

        assert waiting and time.monotonic() - started >= 7.0
        assert [(body["status"], body["attempts"]) for body in finished] == [("succeeded", 1)] * len(ids)
        assert all(body.get("waiting_for") is None for body in finished)
        assert [fake.predictions_for(prompt) for prompt in prompts] == [1] * len(prompts)
        events = [line.get("event") for line in worker.log_lines()]
        assert "provider.circuit.opened" in events and "provider.circuit.closed" in events
        assert "job.attempt.failed" not in events


async def _until_all(
    api: httpx.AsyncClient, ids: list[str], check: Any, *, at_least: int | None = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Poll the jobs' status until `check` holds for all of them (or for `at_least` of them)."""
    give_up = time.monotonic() + timeout
    while True:
        bodies = [(await api.get(f"/status/{job_id}")).json() for job_id in ids]
        passed = [body for body in bodies if check(body)]
        if len(passed) >= (at_least or len(ids)):
            return passed
        if time.monotonic() > give_up:
            pytest.fail(f"not reached within {timeout} s: {bodies}")
        await asyncio.sleep(0.1)
