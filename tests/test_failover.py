"""Failover, as units of the attempt protocol: a job whose provider is down (its circuit open) or refuses for
capacity moves to its next route as a new attempt that says why; a pinned job, or one that may hold a
prediction there, never moves; a job never holds predictions at two providers at once.

Two stub providers (tests/test_attempt_protocol.py's `StubProvider`), "replicate" and "fal", in one worker
context, and a real PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.core.errors import ProviderOutage, TransientProviderError, UnknownCreateOutcome
from mediagen.core.routing import Route
from mediagen.providers.base import Prediction
from test_attempt_protocol import MODEL, StubProvider, World, attempt_rows, job_row, logged, succeeded, world

__all__ = ["logged", "world"]

FAL_MODEL = "fal-ai/flux/schnell"


def outage() -> ProviderOutage:
    return ProviderOutage("Replicate is unavailable to every worker", retry_after=0.05)


def full(status: int = 503) -> TransientProviderError:
    refused = TransientProviderError(f"HTTP {status}", http_status=status, error_class=f"Replicate{status}")
    refused.create_rejected = True
    return refused


@pytest.fixture
async def two(world: World) -> AsyncIterator[tuple[World, StubProvider, StubProvider]]:
    """The world's worker with two providers: Replicate (the world's stub) first, then fal."""
    fal = StubProvider()
    world.ctx.providers = {"replicate": world.provider, "fal": fal}
    yield world, world.provider, fal


async def routed_job(db: Database, *, pinned: bool = False) -> uuid.UUID:
    job_id = uuid.uuid4()
    prompt = f"a lighthouse {job_id.hex[:6]}"
    routes = (
        Route("replicate", MODEL, {"prompt": prompt, "seed": 7, "aspect_ratio": "1:1"}),
        Route("fal", FAL_MODEL, {"prompt": prompt, "seed": 7, "image_size": {"width": 1024, "height": 1024}}),
    )
    new = jobs.NewJob(
        id=job_id,
        prompt=prompt,
        parameters={"provider": "replicate"} if pinned else {},
        model=MODEL,
        max_attempts=3,
        deadline_seconds=60,
        input=routes[0].input,
        provider="replicate",
        routes=routes[:1] if pinned else routes,
    )
    async with db.transaction() as conn:
        await jobs.create_jobs(conn, [new])
    return job_id


async def test_a_job_meeting_an_open_circuit_fails_over_to_the_next_provider_as_a_new_attempt(
    two: tuple[World, StubProvider, StubProvider], logged: Any
) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db)
    replicate.creates = [outage()]

    await world.run(job_id)

    assert replicate.made == [] and fal.named("create") == [FAL_MODEL]
    assert fal.inputs[0]["image_size"] == {"width": 1024, "height": 1024}  # the input decided at submit
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.provider, first.outcome, first.error_class, first.prediction_id) == (
        "replicate",
        "failed",
        "ProviderOutage",
        None,
    )
    assert first.create_sent_at is None and "failed over to fal" in first.error_message
    assert (second.provider, second.failover_from, second.outcome) == ("fal", "replicate", "succeeded")
    assert second.prediction_id == fal.nth(1)
    row = await job_row(world.ctx.db, job_id)
    assert (row.status, row.provider, row.input["image_size"]) == ("succeeded", "fal", {"width": 1024, "height": 1024})
    [moved] = logged("job.failover")
    assert (moved.__dict__["from_provider"], moved.__dict__["to_provider"]) == ("replicate", "fal")


@pytest.mark.parametrize("status", [429, 503])
async def test_a_create_refused_for_capacity_fails_over(
    two: tuple[World, StubProvider, StubProvider], status: int
) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db)
    replicate.creates = [full(status)]

    await world.run(job_id)

    assert replicate.made == [] and len(fal.made) == 1
    assert [a.provider for a in await attempt_rows(world.ctx.db, job_id)] == ["replicate", "fal"]


async def test_a_pinned_job_waits_out_the_outage_at_its_provider(two: tuple[World, StubProvider, StubProvider]) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db, pinned=True)
    replicate.creates = [outage(), outage(), "starting"]

    await world.run(job_id)

    assert fal.calls == [] and len(replicate.made) == 1
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.provider, attempt.outcome, attempt.failover_from) == ("replicate", "succeeded", None)


async def test_a_job_with_a_create_of_unknown_outcome_looks_for_it_before_anything_else(
    two: tuple[World, StubProvider, StubProvider],
) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db)
    replicate.creates = [UnknownCreateOutcome("the gateway lost the answer", http_status=502), outage()]
    await world.run(job_id)  # attempt 1: a prediction may exist at Replicate
    made = replicate.made[0]
    replicate.listed = [Prediction(made, "processing")]

    await world.run(job_id)  # attempt 2 finds it, and waits for it: the open circuit moves nothing

    assert fal.calls == [] and replicate.made == [made]
    assert [a.provider for a in await attempt_rows(world.ctx.db, job_id)] == ["replicate", "replicate"]
    assert (await job_row(world.ctx.db, job_id)).status == "succeeded"


async def test_a_job_holding_a_live_prediction_waits_for_it_through_the_outage(
    two: tuple[World, StubProvider, StubProvider],
) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db)
    made = replicate.nth(1)
    replicate.answers[made] = [outage(), outage(), outage(), succeeded(made)]  # back after the outage

    await world.run(job_id)

    assert fal.calls == []
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.provider, attempt.prediction_id, attempt.outcome) == ("replicate", made, "succeeded")


async def test_a_job_fails_over_at_most_once_per_route(two: tuple[World, StubProvider, StubProvider]) -> None:
    world, replicate, fal = two
    job_id = await routed_job(world.ctx.db)
    replicate.creates = [outage()]
    fal.creates = [ProviderOutage("fal is down too", retry_after=0.05), "starting"]

    await world.run(job_id)

    assert replicate.made == [] and len(fal.made) == 1  # fal's outage is waited out: no way back
    assert [a.provider for a in await attempt_rows(world.ctx.db, job_id)] == ["replicate", "fal"]
