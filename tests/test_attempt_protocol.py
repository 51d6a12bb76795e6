"""The attempt protocol (mediagen.worker.runner), as its specification: no lost job, no double billing.

Each test gives a job in a real PostgreSQL, runs `run_job` against a stub provider that records every
call and answers as the test scripts it, and reads what happened at the provider and in the database.
Nothing else is real: the dispatcher and the notifier only record, the downloader hands back a PNG,
images go to a temporary folder, and the lease keeper is the real one, driven by hand (`renew()`,
`watch_cancels()`) where a test needs what its timer would do.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import text

from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.core.errors import PermanentProviderError, TransientProviderError, UnknownCreateOutcome
from mediagen.core.retry import RetryPolicy
from mediagen.providers.base import Prediction, unsent
from mediagen.storage.local import LocalStorage
from mediagen.worker.context import WorkerContext
from mediagen.worker.leases import LeaseKeeper
from mediagen.worker.polling import PollSchedule
from mediagen.worker.runner import CLOCK_SKEW, run_job

MODEL = "black-forest-labs/flux-schnell"
Hook = Callable[[], Awaitable[None]]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


@dataclass
class StubProvider:
    """A `Provider` that records every call and answers as scripted.

    `creates`: what each create answers, in order, the last one repeated (a status for a new
    prediction, an `UnknownCreateOutcome` for one made whose answer was lost, or another error for a
    refusal); the n-th prediction made is `nth(n)`. `answers`: per prediction id, what each GET answers,
    in order, the last one repeated (default: `succeeded` with one output). `listed`: what
    `find_recent` finds. `on_create` runs while a create's request is out (its prediction exists at the
    provider by then), `on_get` before each GET answers.
    """

    creates: list[str | Exception] = field(default_factory=lambda: ["starting"])
    answers: dict[str, list[Prediction | Exception]] = field(default_factory=dict)
    listed: list[Prediction] = field(default_factory=list)
    on_create: Hook | None = None
    on_get: Hook | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    """Ids of the predictions that exist because of a create (billed unless canceled)."""
    canceled: list[str] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    deadlines: list[datetime | None] = field(default_factory=list)
    windows: list[datetime] = field(default_factory=list)
    cancel_errors: list[Exception] = field(default_factory=list)
    token: asyncio.Event | None = None
    """When set: each create first waits for it, unsent (a rate-limit token that has not come)."""
    """Raised by the first cancels, in order (the provider in an outage)."""
    got: asyncio.Event = field(default_factory=asyncio.Event)
    prefix: str = field(default_factory=lambda: f"p{uuid.uuid4().hex[:8]}")
    """Prediction ids are unique across the run's database (reconcile looks them up in every job)."""

    def nth(self, n: int) -> str:
        return f"{self.prefix}-{n}"

    def named(self, call: str) -> list[str]:
        return [arg for name, arg in self.calls if name == call]

    async def create(
        self, model: str, input: dict[str, Any], *, webhook: str | None = None, deadline: datetime | None = None
    ) -> Prediction:
        self.calls.append(("create", model))
        self.deadlines.append(deadline)
        if self.token is not None:
            with unsent():  # as the Replicate adapter waits for its rate-limit token: nothing sent yet
                await self.token.wait()
        self.inputs.append(input)
        answer = self.creates.pop(0) if len(self.creates) > 1 else self.creates[0]
        if isinstance(answer, Exception) and not isinstance(answer, UnknownCreateOutcome):
            raise answer  # refused: nothing was made
        prediction_id = self.nth(len(self.made) + 1)
        self.made.append(prediction_id)
        if self.on_create is not None:
            await self.on_create()
        if isinstance(answer, Exception):
            raise answer  # made, but the answer was lost
        return Prediction(prediction_id, answer)

    async def get(self, prediction_id: str, *, deadline: datetime | None = None) -> Prediction:
        self.calls.append(("get", prediction_id))
        self.got.set()
        if self.on_get is not None:
            await self.on_get()
        script = self.answers.get(prediction_id) or [succeeded(prediction_id)]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def cancel(self, prediction_id: str) -> None:
        self.calls.append(("cancel", prediction_id))
        if self.cancel_errors:
            raise self.cancel_errors.pop(0)
        self.canceled.append(prediction_id)

    async def find_recent(
        self, model: str, input: dict[str, Any], since: datetime, *, deadline: datetime | None = None
    ) -> list[Prediction]:
        self.calls.append(("find_recent", model))
        self.windows.append(since)
        return list(self.listed)

    async def aclose(self) -> None:
        pass


def succeeded(prediction_id: str) -> Prediction:
    return Prediction(prediction_id, "succeeded", output=[f"https://replicate.delivery/{prediction_id}/0.png"])


def processing(prediction_id: str) -> Prediction:
    return Prediction(prediction_id, "processing")


class StubDownloader:
    def __init__(self) -> None:
        self.fetched: list[str] = []

    async def fetch(self, url: str) -> bytes:
        self.fetched.append(url)
        return PNG

    async def aclose(self) -> None:
        pass


class RecordingDispatcher:
    def __init__(self) -> None:
        self.sent: list[tuple[uuid.UUID, float]] = []

    async def send(self, job_ids: list[uuid.UUID], *, delay: float = 0.0) -> None:
        self.sent.extend((job_id, delay) for job_id in job_ids)


class RecordingNotifier:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, job_id: uuid.UUID, event: dict[str, Any]) -> None:
        self.events.append(event)

    def statuses(self) -> list[str]:
        return [event["status"] for event in self.events if event.get("type") == "job"]


@dataclass
class World:
    """One test's worker (its context) and what it can look at afterwards."""

    ctx: WorkerContext
    provider: StubProvider
    downloader: StubDownloader
    notifier: RecordingNotifier
    media: Path

    async def job(self, seed: int = 42, deadline_seconds: float = 60) -> uuid.UUID:
        """Given a job, queued: its input carries a recorded seed, which makes it unique."""
        job_id = uuid.uuid4()
        new = jobs.NewJob(
            id=job_id,
            prompt=f"a lighthouse {job_id.hex[:6]}",
            parameters={},
            model=MODEL,
            max_attempts=3,
            deadline_seconds=deadline_seconds,
            input={"prompt": f"a lighthouse {job_id.hex[:6]}", "seed": seed},
        )
        async with self.ctx.db.transaction() as conn:
            await jobs.create_jobs(conn, [new])
        return job_id

    async def run(self, job_id: uuid.UUID) -> None:
        await asyncio.wait_for(run_job(self.ctx, job_id), 10)

    def stored_files(self) -> list[Path]:
        return sorted(path for path in self.media.rglob("*") if path.is_file())


@pytest.fixture
async def world(db: Database, tmp_path: Path) -> AsyncIterator[World]:
    provider = StubProvider()
    downloader = StubDownloader()
    notifier = RecordingNotifier()
    ctx = WorkerContext(
        db=db,
        provider=provider,
        storage=LocalStorage(tmp_path),
        downloader=downloader,  # type: ignore[arg-type]
        dispatcher=RecordingDispatcher(),  # type: ignore[arg-type]
        leases=LeaseKeeper(db, lease_seconds=30),
        policy=RetryPolicy(max_attempts=3, base_seconds=0.01, cap_seconds=0.02),
        lease_seconds=30,
        polls=PollSchedule(initial=0.01, maximum=0.02),
        notifier=notifier,  # type: ignore[arg-type]
    )
    yield World(ctx, provider, downloader, notifier, tmp_path)


async def job_row(db: Database, job_id: uuid.UUID) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})).one()


async def attempt_rows(db: Database, job_id: uuid.UUID) -> list[Any]:
    async with db.connect() as conn:
        rows = await conn.execute(text("SELECT * FROM attempts WHERE job_id = :id ORDER BY number"), {"id": job_id})
        return list(rows.all())


async def expire_lease(db: Database, job_id: uuid.UUID) -> None:
    """The job's worker stopped renewing its lease (it died, or its database link did)."""
    async with db.transaction() as conn:
        await conn.execute(
            text("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = :id"), {"id": job_id}
        )


async def a_worker_died_holding(world: World, job_id: uuid.UUID, prediction_id: str) -> None:
    """Given attempt 1 claimed by a worker that recorded `prediction_id` and then died: its lease ran out."""
    claim = await jobs.claim(world.ctx.db, job_id, lease_seconds=30)
    assert claim is not None
    assert await jobs.record_prediction(world.ctx.db, claim, prediction_id, "processing")
    await expire_lease(world.ctx.db, job_id)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    caplog.set_level(logging.INFO, logger="mediagen")

    def events(name: str) -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.getMessage() == name]

    yield events


# --- create ---------------------------------------------------------------------------------------


async def test_a_new_job_creates_one_prediction_and_stores_its_id_before_waiting(world: World) -> None:
    job_id = await world.job()
    recorded_at_first_look: list[str | None] = []

    async def look_at_the_attempt() -> None:
        recorded_at_first_look.append((await attempt_rows(world.ctx.db, job_id))[-1].prediction_id)

    world.provider.on_get = look_at_the_attempt

    await world.run(job_id)

    assert world.provider.named("create") == [MODEL]
    assert world.provider.inputs == [{"prompt": f"a lighthouse {job_id.hex[:6]}", "seed": 42}]
    assert world.provider.made == [world.provider.nth(1)]
    assert recorded_at_first_look[0] == world.provider.nth(1)
    assert (await job_row(world.ctx.db, job_id)).status == "succeeded"
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.prediction_id, attempt.outcome, attempt.resumed) == (world.provider.nth(1), "succeeded", False)
    assert world.stored_files() == [world.media / str(job_id) / "0.png"]
    assert world.provider.canceled == []


async def test_a_job_held_by_another_worker_is_left_alone(world: World) -> None:
    job_id = await world.job()
    claim = await jobs.claim(world.ctx.db, job_id, lease_seconds=30)  # another worker holds it
    assert claim is not None

    await world.run(job_id)

    assert world.provider.calls == []
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.claim_token) == ("running", claim.token)


# --- resume ---------------------------------------------------------------------------------------


async def test_redelivered_job_resumes_its_prediction(world: World) -> None:
    job_id = await world.job()
    earlier = world.provider.nth(0)
    await a_worker_died_holding(world, job_id, earlier)
    world.provider.answers[earlier] = [processing(earlier), succeeded(earlier)]

    await world.run(job_id)

    assert world.provider.named("create") == []
    assert world.provider.named("get") == [earlier, earlier]
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.outcome, first.error_class) == ("abandoned", "WorkerLost")
    assert (second.prediction_id, second.resumed, second.outcome) == (earlier, True, "succeeded")
    assert (await job_row(world.ctx.db, job_id)).status == "succeeded"


async def test_a_prediction_gone_on_resume_is_recorded_and_a_new_one_created(world: World, logged: Any) -> None:
    job_id = await world.job()
    forgotten = world.provider.nth(0)
    await a_worker_died_holding(world, job_id, forgotten)
    world.provider.answers[forgotten] = [PermanentProviderError("not found", http_status=404)]

    await world.run(job_id)

    assert world.provider.named("get")[0] == forgotten
    assert world.provider.made == [world.provider.nth(1)]
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert (second.gone_prediction_id, second.prediction_id) == (forgotten, world.provider.nth(1))
    assert second.outcome == "succeeded"
    assert [record.__dict__["prediction_id"] for record in logged("job.prediction.gone")] == [forgotten]


async def test_a_prediction_that_failed_is_replaced_not_resumed(world: World) -> None:
    job_id = await world.job()
    first_id = world.provider.nth(1)
    world.provider.answers[first_id] = [Prediction(first_id, "failed", error="CUDA error: out of memory")]
    await world.run(job_id)  # attempt 1: its prediction fails of an infrastructure fault
    assert (await job_row(world.ctx.db, job_id)).status == "retrying"

    await world.run(job_id)  # attempt 2

    assert world.provider.made == [first_id, world.provider.nth(2)]
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.prediction_status, first.outcome) == ("failed", "failed")
    assert (second.prediction_id, second.resumed, second.outcome) == (world.provider.nth(2), False, "succeeded")


# --- an unknown create outcome --------------------------------------------------------------------


async def test_after_an_unknown_create_outcome_the_next_attempt_adopts_the_prediction_it_finds(
    world: World, logged: Any
) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate did not answer: ReadTimeout"), "starting"]
    await world.run(job_id)  # attempt 1: the create went out and made a prediction; its answer was lost
    assert (await job_row(world.ctx.db, job_id)).status == "retrying"
    lost = world.provider.nth(1)
    world.provider.listed = [processing(lost)]

    await world.run(job_id)  # attempt 2

    assert world.provider.named("find_recent") == [MODEL]
    assert len(world.provider.named("create")) == 1
    assert world.provider.made == [lost]
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.prediction_id, first.outcome, first.error_class) == (None, "failed", "UnknownCreateOutcome")
    assert (second.prediction_id, second.outcome) == (lost, "succeeded")
    assert [record.__dict__["prediction_id"] for record in logged("job.prediction.adopted")] == [lost]


async def test_after_an_unknown_create_outcome_with_nothing_found_the_next_attempt_creates(world: World) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate did not answer: RemoteProtocolError"), "starting"]
    await world.run(job_id)

    await world.run(job_id)  # Replicate's list shows nothing: the first create made nothing after all

    assert world.provider.named("find_recent") == [MODEL]
    assert len(world.provider.named("create")) == 2
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert (second.prediction_id, second.outcome) == (world.provider.nth(2), "succeeded")


async def test_another_jobs_prediction_with_the_same_input_is_never_adopted(world: World) -> None:
    other, theirs = await world.job(seed=7), world.provider.nth(0)
    await a_worker_died_holding(world, other, theirs)
    job_id = await world.job(seed=7)
    world.provider.creates = [UnknownCreateOutcome("Replicate did not answer: ReadTimeout"), "starting"]
    await world.run(job_id)
    world.provider.listed = [processing(theirs)]

    await world.run(job_id)

    assert world.provider.named("find_recent") == [MODEL]
    assert len(world.provider.named("create")) == 2
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert second.prediction_id == world.provider.nth(2)


async def test_of_two_predictions_its_unknown_creates_made_the_job_adopts_one_and_cancels_the_other(
    world: World,
) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate 504"), UnknownCreateOutcome("Replicate 504"), "starting"]
    await world.run(job_id)  # attempt 1: made one, its answer lost
    await world.run(job_id)  # attempt 2: the list does not show it yet (nothing found); made another, lost too
    first, second = world.provider.nth(1), world.provider.nth(2)
    world.provider.listed = [processing(second), succeeded(first)]

    await world.run(job_id)  # attempt 3

    assert world.provider.made == [first, second]
    *_, third = await attempt_rows(world.ctx.db, job_id)
    assert (third.prediction_id, third.outcome) == (first, "succeeded")  # done already: paid for anyway
    assert world.provider.canceled == [second]  # canceled before it is billed as well


async def test_a_prediction_whose_webhook_names_another_job_is_never_adopted(world: World) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate did not answer: ReadTimeout"), "starting"]
    await world.run(job_id)
    stranger = world.provider.nth(0)
    world.provider.listed = [
        Prediction(
            stranger, "processing", webhook=f"https://example.com/webhooks/replicate?job={uuid.uuid4()}&attempt=1"
        )
    ]

    await world.run(job_id)

    assert len(world.provider.named("create")) == 2
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert second.prediction_id == world.provider.nth(2)


async def test_a_prediction_whose_webhook_names_this_job_is_adopted(world: World) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate did not answer: ReadTimeout"), "starting"]
    await world.run(job_id)
    lost = world.provider.nth(1)
    world.provider.listed = [
        Prediction(lost, "processing", webhook=f"https://example.com/webhooks/replicate?job={job_id}&attempt=1")
    ]

    await world.run(job_id)

    assert len(world.provider.named("create")) == 1
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert second.prediction_id == lost


async def test_the_search_window_opens_before_the_unknown_create_by_the_clock_skew_allowance(world: World) -> None:
    job_id = await world.job()
    world.provider.creates = [UnknownCreateOutcome("Replicate 504"), "starting"]
    await world.run(job_id)

    await world.run(job_id)

    first, _ = await attempt_rows(world.ctx.db, job_id)
    # Stamped by PostgreSQL before the request went out; Replicate's clock may be behind it.
    assert world.provider.windows == [first.create_sent_at - CLOCK_SKEW]


async def test_a_create_refused_leaves_nothing_to_look_for(world: World) -> None:
    job_id = await world.job()
    refused = PermanentProviderError("Input validation failed", http_status=422, error_class="Replicate422")
    refused.create_rejected = True
    world.provider.creates = [refused]

    await world.run(job_id)

    assert world.provider.made == [] and world.provider.named("find_recent") == []
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.error_class) == ("failed", "Replicate422")
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.create_sent_at, attempt.http_status) == (None, 422)


async def test_each_prediction_is_created_to_end_by_the_jobs_deadline(world: World) -> None:
    job_id = await world.job()

    await world.run(job_id)

    assert world.provider.deadlines == [(await job_row(world.ctx.db, job_id)).deadline_at]


# --- cancel ---------------------------------------------------------------------------------------


async def test_a_cancel_while_waiting_cancels_the_prediction_and_the_job(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made)]
    running = asyncio.create_task(world.run(job_id))
    await asyncio.wait_for(world.provider.got.wait(), 5)

    async with world.ctx.db.transaction() as conn:
        assert await jobs.request_cancel(conn, job_id) == "running"
    await world.ctx.leases.watch_cancels()  # what the lease keeper does every second
    await running

    assert world.provider.canceled == [made]
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.error_class) == ("canceled", "JobCanceled")
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.outcome, attempt.prediction_status) == ("canceled", "canceled")
    assert world.notifier.statuses()[-1] == "canceled"
    assert world.stored_files() == []


async def test_a_cancel_during_a_429_wait_cancels_the_prediction_being_resumed(world: World) -> None:
    job_id = await world.job()
    earlier = world.provider.nth(0)
    await a_worker_died_holding(world, job_id, earlier)
    world.provider.answers[earlier] = [TransientProviderError("throttled", http_status=429, retry_after=30)]
    running = asyncio.create_task(world.run(job_id))
    await asyncio.wait_for(world.provider.got.wait(), 5)

    async with world.ctx.db.transaction() as conn:
        await jobs.request_cancel(conn, job_id)
    await world.ctx.leases.watch_cancels()
    await asyncio.wait_for(running, 2)  # not 30 s: the wait ends with the cancel

    assert world.provider.canceled == [earlier]
    assert (await job_row(world.ctx.db, job_id)).status == "canceled"


async def test_a_cancel_ends_a_look_at_the_prediction_that_hangs(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made)]
    never = asyncio.Event()
    running = asyncio.create_task(world.run(job_id))
    await asyncio.wait_for(world.provider.got.wait(), 5)
    world.provider.on_get = never.wait  # the next look hangs (the client sleeping out a Retry-After)
    await asyncio.sleep(0.1)

    async with world.ctx.db.transaction() as conn:
        await jobs.request_cancel(conn, job_id)
    await world.ctx.leases.watch_cancels()
    await asyncio.wait_for(running, 2)

    assert world.provider.canceled == [made]
    assert (await job_row(world.ctx.db, job_id)).status == "canceled"


async def test_a_job_past_its_deadline_before_resuming_cancels_its_prediction(world: World) -> None:
    job_id = await world.job()
    earlier = world.provider.nth(0)
    await a_worker_died_holding(world, job_id, earlier)
    async with world.ctx.db.transaction() as conn:
        past = text("UPDATE jobs SET deadline_at = now() - interval '1 second' WHERE id = :id")
        await conn.execute(past, {"id": job_id})

    await world.run(job_id)

    assert world.provider.calls == [("cancel", earlier)]
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.error_class) == ("failed", "JobDeadlineExceeded")


async def test_a_429_wait_past_the_deadline_ends_at_the_deadline_and_cancels_the_prediction(world: World) -> None:
    job_id = await world.job(deadline_seconds=1)
    made = world.provider.nth(1)
    world.provider.answers[made] = [TransientProviderError("throttled", http_status=429, retry_after=30)]
    started = time.monotonic()

    await world.run(job_id)

    assert time.monotonic() - started < 3
    assert world.provider.canceled == [made]
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.error_class) == ("failed", "JobDeadlineExceeded")


async def test_an_aborted_prediction_ends_the_job_at_its_deadline_unbilled(world: World) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [Prediction(made, "aborted")]

    await world.run(job_id)

    assert world.provider.made == [made] and world.provider.canceled == []
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.error_class) == ("failed", "JobDeadlineExceeded")
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert (attempt.prediction_status, attempt.cost_usd) == ("aborted", 0)


async def test_a_cancel_the_provider_cannot_take_during_an_outage_is_tried_again_after_the_job_ended(
    world: World,
) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made)]
    world.provider.cancel_errors = [TransientProviderError("Service Unavailable", http_status=503)] * 2
    running = asyncio.create_task(world.run(job_id))
    await asyncio.wait_for(world.provider.got.wait(), 5)

    async with world.ctx.db.transaction() as conn:
        await jobs.request_cancel(conn, job_id)
    await world.ctx.leases.watch_cancels()
    await running
    assert (await job_row(world.ctx.db, job_id)).status == "canceled"  # not held up by the outage
    await asyncio.wait_for(asyncio.gather(*world.ctx.cancels), 5)

    assert world.provider.named("cancel") == [made] * 3
    assert world.provider.canceled == [made]


async def test_a_cancel_while_the_create_waits_for_its_rate_limit_token_ends_the_job_with_nothing_made(
    world: World,
) -> None:
    job_id = await world.job()
    world.provider.token = asyncio.Event()  # never comes
    running = asyncio.create_task(world.run(job_id))
    while not world.provider.named("create"):
        await asyncio.sleep(0.01)

    async with world.ctx.db.transaction() as conn:
        await jobs.request_cancel(conn, job_id)
    await world.ctx.leases.watch_cancels()
    await asyncio.wait_for(running, 2)

    assert world.provider.made == [] and world.provider.canceled == []
    assert (await job_row(world.ctx.db, job_id)).status == "canceled"


async def test_a_cancel_while_the_create_is_out_lets_it_end_then_cancels_its_prediction(world: World) -> None:
    job_id = await world.job()

    async def canceled_meanwhile() -> None:
        async with world.ctx.db.transaction() as conn:
            await jobs.request_cancel(conn, job_id)
        await world.ctx.leases.watch_cancels()  # told while the request is out: not given up
        await asyncio.sleep(0.05)

    world.provider.on_create = canceled_meanwhile

    await world.run(job_id)

    [made] = world.provider.made
    [attempt] = await attempt_rows(world.ctx.db, job_id)
    assert attempt.prediction_id == made  # recorded, not lost to the cancel
    assert world.provider.canceled == [made]
    assert (await job_row(world.ctx.db, job_id)).status == "canceled"


# --- a lost lease ---------------------------------------------------------------------------------


async def test_a_worker_that_lost_its_lease_while_waiting_writes_nothing_more(world: World, logged: Any) -> None:
    job_id = await world.job()
    made = world.provider.nth(1)
    world.provider.answers[made] = [processing(made)]
    running = asyncio.create_task(world.run(job_id))
    await asyncio.wait_for(world.provider.got.wait(), 5)

    # Its lease ran out; another worker claims the job, and will resume the prediction.
    await expire_lease(world.ctx.db, job_id)
    successor = await jobs.claim(world.ctx.db, job_id, lease_seconds=30)
    assert successor is not None and successor.resume_prediction_id == made
    await world.ctx.leases.renew()  # the keeper's next renewal finds the job no longer ours
    await running

    assert world.provider.canceled == []  # the successor's to finish
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.claim_token, job.error_class) == ("running", successor.token, None)
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.outcome, first.error_class) == ("abandoned", "WorkerLost")
    assert (second.prediction_id, second.finished_at) == (made, None)
    assert world.downloader.fetched == [] and world.stored_files() == []
    assert world.notifier.statuses() == ["running"]
    assert len(logged("job.attempt.superseded")) == 1


async def test_a_worker_that_lost_the_job_while_creating_cancels_its_prediction(world: World) -> None:
    job_id = await world.job()
    successors: list[jobs.Claim] = []

    async def taken_over() -> None:
        await expire_lease(world.ctx.db, job_id)
        successor = await jobs.claim(world.ctx.db, job_id, lease_seconds=30)
        assert successor is not None
        successors.append(successor)

    world.provider.on_create = taken_over

    await world.run(job_id)

    # Nobody else knows of the prediction: left running, it would be billed besides the successor's own.
    assert world.provider.canceled == [world.provider.nth(1)]
    assert world.provider.named("get") == []
    job = await job_row(world.ctx.db, job_id)
    assert (job.status, job.claim_token) == ("running", successors[0].token)
    first, second = await attempt_rows(world.ctx.db, job_id)
    assert (first.prediction_id, first.outcome) == (None, "abandoned")
    assert second.prediction_id is None


async def test_a_worker_that_lost_the_job_while_creating_leaves_the_prediction_its_successor_adopted(
    world: World,
) -> None:
    job_id = await world.job()

    async def taken_over_and_adopted() -> None:
        await expire_lease(world.ctx.db, job_id)
        successor = await jobs.claim(world.ctx.db, job_id, lease_seconds=30)
        assert successor is not None and successor.reconcile_since is not None
        # The successor reconciles, finds the prediction in Replicate's list and records it as its own.
        assert await jobs.record_prediction(world.ctx.db, successor, world.provider.nth(1), "starting")

    world.provider.on_create = taken_over_and_adopted

    await world.run(job_id)

    assert world.provider.canceled == []
    _, second = await attempt_rows(world.ctx.db, job_id)
    assert (second.prediction_id, second.finished_at) == (world.provider.nth(1), None)
