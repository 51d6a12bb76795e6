"""How an attempt waits: out a 429 or an outage (`unthrottled`), on its prediction by polling (`poll`) or for
its webhook (`await_webhook`), never past the job's deadline nor once the job must stop (see Hold).

The runner (mediagen.worker.runner) decides what the attempt does; this module only waits for it, keeping
the prediction the attempt answers for (`Flight`) up to date as it is seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from mediagen.core import jobs
from mediagen.core.db import is_unreachable
from mediagen.core.errors import JobDeadlineExceeded, ProviderOutage, TransientProviderError
from mediagen.logging import log_event
from mediagen.notify import Event, Subscription
from mediagen.providers.base import TERMINAL_PREDICTION, Prediction
from mediagen.worker.context import WorkerContext
from mediagen.worker.failover import FailingOver, failover_route
from mediagen.worker.leases import Hold
from mediagen.worker.progress import ProgressReporter

T = TypeVar("T")


@dataclass
class Flight:
    """The prediction this attempt answers for, as last seen: the one it resumes (before its first
    look), adopts or creates. Whatever ends the attempt decides what becomes of it."""

    prediction: Prediction | None = None


def seconds_left(claim: jobs.Claim) -> float:
    """Seconds until the job's deadline."""
    return (claim.deadline_at - datetime.now(UTC)).total_seconds()


def check_deadline(claim: jobs.Claim) -> None:
    if seconds_left(claim) <= 0:
        raise JobDeadlineExceeded("the job did not finish before its deadline")


async def unthrottled(
    ctx: WorkerContext, claim: jobs.Claim, hold: Hold, call: Callable[[], Awaitable[T]], *, may_move: bool = False
) -> T:
    """`call()`, again after each 429 or open circuit for as long as it asks: being throttled, or waiting out
    an outage (the job's status says `waiting_for: provider` meanwhile), is no failed attempt. The wait
    ends early when the job must stop (canceled, taken over) or reaches its deadline.

    `may_move`: the job holds no prediction anywhere, so when this provider is down (its circuit open) or
    refuses for capacity, a job not pinned to it moves to its next route instead (`FailingOver`)."""
    outage = False
    while True:
        try:
            result = await call()
        except TransientProviderError as error:
            if may_move and (to := failover_route(claim, error)) is not None:
                raise FailingOver(to, error) from error
            wait = ctx.policy.throttle_wait(error)
            if wait is None:
                raise
            if not isinstance(error, ProviderOutage):
                log_event("job.throttled", job_id=str(claim.job_id), attempt=claim.attempt, retry_after=wait)
            elif not outage:
                outage = True
                log_event("job.waiting_for_provider", job_id=str(claim.job_id), attempt=claim.attempt, retry_after=wait)
                await waiting_for(ctx, claim, "provider")
            await hold.sleep(max(0.0, min(wait, seconds_left(claim))))
            check_deadline(claim)
            continue
        if outage:
            await waiting_for(ctx, claim, None)
        return result


async def waiting_for(ctx: WorkerContext, claim: jobs.Claim, what: str | None) -> None:
    """Show in the job's status what the attempt waits for; only shown, so a database blip just skips it."""
    try:
        await jobs.record_waiting(ctx.db, claim, what)
    except Exception as error:
        if not is_unreachable(error):
            raise


def read(hold: Hold, call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """`call` as a read given up the moment the job must stop (Hold.read): safe for reads only."""
    return partial(hold.read, call)


async def poll(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, flight: Flight, *, fresh: bool) -> None:
    assert flight.prediction is not None
    delays = ctx.polls.delays(claim.model, fresh=fresh)
    progress = ProgressReporter(ctx.db, ctx.notifier, claim)
    while not flight.prediction.done:
        hold.check()
        check_deadline(claim)
        await hold.sleep(max(0.0, min(next(delays), seconds_left(claim))))
        look = partial(ctx.provider_for(claim.provider).get, flight.prediction.id, deadline=claim.deadline_at)
        flight.prediction = await unthrottled(ctx, claim, hold, read(hold, look))
        await progress.seen(flight.prediction)
    ctx.polls.observe(claim.model, flight.prediction)


async def await_webhook(
    ctx: WorkerContext, claim: jobs.Claim, hold: Hold, flight: Flight, events: Subscription
) -> None:
    """Wait for the webhook that says the prediction ended, then look at it (one GET); without one, look
    every `webhook_poll_seconds` anyway (a lost webhook, Replicate's retries giving up), and at the
    job's deadline."""
    assert flight.prediction is not None
    prediction = flight.prediction
    progress = ProgressReporter(ctx.db, ctx.notifier, claim)
    while not prediction.done:
        check_deadline(claim)
        give_up_at = time.monotonic() + min(ctx.webhook_poll_for(claim.provider), seconds_left(claim))
        while (left := give_up_at - time.monotonic()) > 0:
            event = await next_event(events, hold, left)
            if event is None or event.get("type") != "prediction" or not about(event, prediction):
                continue
            if event.get("status") in TERMINAL_PREDICTION:
                break
            if event.get("progress"):  # a `logs` webhook: its tqdm bar, parsed by the receiver
                await progress.report(event["progress"]["percentage"])
        look = partial(ctx.provider_for(claim.provider).get, prediction.id, deadline=claim.deadline_at)
        prediction = flight.prediction = await unthrottled(ctx, claim, hold, read(hold, look))
    ctx.polls.observe(claim.model, prediction)


def about(event: Event, prediction: Prediction) -> bool:
    """Is a webhook's event about this prediction? A webhook names it by the provider's own id: Replicate's
    is the prediction's, fal's the request id that ends ours (``fal-ai/flux/<request id>``)."""
    named = event.get("prediction_id")
    return isinstance(named, str) and (named == prediction.id or prediction.id.endswith(f"/{named}"))


async def next_event(events: Subscription, hold: Hold, within: float) -> Event | None:
    """The next event within `within` seconds, or None; raises at once when the job must stop (see Hold)."""
    hold.check()
    got = asyncio.ensure_future(events.next(within))
    stop = asyncio.ensure_future(hold.wake.wait())
    try:
        await asyncio.wait((got, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not got.done():
            got.cancel()
    hold.check()
    return got.result() if got.done() and not got.cancelled() else None
