"""One attempt of one job, start to finish: claim, resume or create, wait, store, record.

The attempt protocol (no lost job, no double billing):

1. Claim the job (a conditional UPDATE) and open an attempt row in the same transaction. Nothing
   claimed: someone else holds it, or it is finished, or it is not due yet. Stop.
2. If an earlier attempt started a prediction that has not itself failed, resume it (GET); if
   Replicate no longer knows it (404), note it on the attempt and go on as below. If an earlier
   create's outcome is unknown, look for its prediction in Replicate's recent list first. Only
   otherwise create one, and store its id at once, before any waiting.
3. Wait by polling on the event loop (no thread is held busy): first after about as long as this
   model's predictions take (mediagen.worker.polling), then in growing steps. The lease is renewed for all
   running jobs at once by mediagen.worker.leases.
4. Download each image at once, check it, store it atomically; then close the attempt and the job in
   one transaction, guarded by our claim token.
5. On error, mediagen.core.retry decides: retry (job `retrying`, a delayed message) or fail.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from mediagen import metrics
from mediagen.broker import Dispatcher
from mediagen.core import jobs, pricing
from mediagen.core.db import Database, is_unreachable
from mediagen.core.errors import (
    JobCanceled,
    JobDeadlineExceeded,
    LeaseExpired,
    LeaseLost,
    MediagenError,
    PermanentProviderError,
    TransientProviderError,
    WorkerStopping,
)
from mediagen.core.pricing import Price
from mediagen.core.retry import RetryPolicy, prediction_failure_is_transient
from mediagen.logging import log_event
from mediagen.notify import Event, Notifier, Subscription
from mediagen.providers.base import TERMINAL_PREDICTION, Prediction, Provider
from mediagen.providers.downloads import Downloader
from mediagen.storage import Storage
from mediagen.worker.leases import Hold, LeaseKeeper
from mediagen.worker.outputs import store_outputs
from mediagen.worker.polling import PollSchedule
from mediagen.worker.progress import ProgressReporter

T = TypeVar("T")

# Sends from inside a job's own message go through the delay queue: an immediate send would reuse
# the Redis id of the message still being processed and be deleted by its acknowledgement.
MIN_RESEND_DELAY = 1.0

CLOCK_SKEW = timedelta(seconds=30)
"""How far the provider's clock may be behind PostgreSQL's when predictions are looked for by time.
NTP keeps servers within milliseconds; 30 s also covers a host whose clock drifted, for about three
more pages of Replicate's list at its 600 creates a minute."""


@dataclass
class WorkerContext:
    """What a worker process builds once, on its event loop, and every job shares."""

    db: Database
    provider: Provider
    storage: Storage
    downloader: Downloader
    dispatcher: Dispatcher
    leases: LeaseKeeper
    policy: RetryPolicy
    lease_seconds: float
    polls: PollSchedule
    notifier: Notifier
    prices: Mapping[str, Price | None] = field(default_factory=lambda: dict(pricing.DEFAULT_PRICES))
    """The price table (settings), for each attempt's cost."""
    webhook_url: str | None = None
    """Replicate POSTs our predictions here (the API relays them as events), when webhooks are on."""
    webhook_poll_seconds: float = 30.0
    """With webhooks on: how long to wait for one before looking at the prediction anyway."""
    stopping: bool = False
    """Set when the worker begins to shut down: it takes no new job from then on."""


def model_input(claim: jobs.Claim) -> dict[str, Any]:
    """The input decided at submit; for a job from before it was recorded, the old portable five."""
    if claim.input is not None:
        return claim.input
    params = claim.parameters
    data: dict[str, Any] = {"prompt": claim.prompt}
    for key in ("width", "height", "num_outputs", "seed", "negative_prompt"):
        if params.get(key) is not None:
            data[key] = params[key]
    return data


def _exiting(ctx: WorkerContext) -> bool:
    """Is this process on its way out (a graceful stop, or an exit the worker hooks never saw)?"""
    return ctx.stopping or not threading.main_thread().is_alive()


async def run_job(ctx: WorkerContext, job_id: uuid.UUID) -> None:
    if _exiting(ctx):
        # A message that reached a worker on its way out: pass it on to another.
        await _send_quietly(ctx, job_id, MIN_RESEND_DELAY)
        return
    claim = await jobs.claim(ctx.db, job_id, lease_seconds=ctx.lease_seconds)
    if claim is None:
        early = await jobs.due_in(ctx.db, job_id)
        if early is not None:  # a delayed message that arrived before its time
            await ctx.dispatcher.send([job_id], delay=max(early, MIN_RESEND_DELAY))
        return
    if claim.abandoned_attempt is not None:
        _attempt_closed(
            job_id,
            claim.abandoned_attempt,
            "abandoned",
            "WorkerLost",
            error="the worker running this attempt stopped or lost its lease",
        )
    log_event(
        "job.attempt.started",
        job_id=str(job_id),
        attempt=claim.attempt,
        resumed_prediction=claim.resume_prediction_id,
    )
    _announce(ctx, claim, "running")
    hold = ctx.leases.hold(job_id, claim.token)
    metrics.in_flight.inc()
    try:
        await _attempt(ctx, claim, hold)
    finally:
        metrics.in_flight.dec()
        ctx.leases.drop(hold)


async def _attempt(ctx: WorkerContext, claim: jobs.Claim, hold: Hold) -> None:
    started = time.monotonic()
    prediction: Prediction | None = None
    try:
        if claim.attempt > claim.max_attempts:
            raise PermanentProviderError(
                f"gave up after {claim.max_attempts} attempts", error_class="AttemptsExhausted"
            )
        _check_deadline(claim)
        if ctx.webhook_url is None:
            prediction, created = await _start_or_resume(ctx, claim, hold)
            prediction = await _poll(ctx, claim, hold, prediction, fresh=created)
        else:
            # Listening before the create: a webhook that beats the create's answer is not missed.
            async with ctx.notifier.listen(claim.job_id) as events:
                prediction, _ = await _start_or_resume(ctx, claim, hold)
                prediction = await _await_webhook(ctx, claim, hold, prediction, events)
        if prediction.status != "succeeded":
            raise _prediction_failure(prediction)
        outputs = await store_outputs(ctx.downloader, ctx.storage, claim.job_id, prediction.output)
        asked = model_input(claim).get("num_outputs")
        if isinstance(asked, int) and len(outputs) < asked:
            # flux drops images its safety checker flagged: fewer outputs is the model's answer, not an error.
            log_event(
                "job.outputs.fewer", job_id=str(claim.job_id), attempt=claim.attempt, asked=asked, got=len(outputs)
            )
        spend = _spend(ctx, claim, prediction, images=len(outputs))
        held = await _recorded(ctx, claim, hold, lambda: jobs.succeed(ctx.db, claim, outputs, prediction.status, spend))
        if held:
            _count_spend(claim, spend)
            metrics.jobs_finished.labels("succeeded").inc()
            _attempt_closed(
                claim.job_id,
                claim.attempt,
                "succeeded",
                prediction_id=prediction.id,
                outputs=len(outputs),
                seconds=round(time.monotonic() - started, 3),
            )
            log_event("job.succeeded", job_id=str(claim.job_id), attempt=claim.attempt)
            _announce(ctx, claim, "succeeded")
        else:
            _log_lost(claim)
    except LeaseExpired as expired:
        await _explain_lost(ctx, claim, expired)
    except LeaseLost:
        _log_lost(claim)
    except JobCanceled:
        await _cancel(ctx, claim, prediction)
    except WorkerStopping as stopping:
        await _release(ctx, claim, stopping.message)
    except asyncio.CancelledError:
        await _release(ctx, claim, "the worker was stopped")
        raise
    except Exception as error:
        if _exiting(ctx):
            # Errors of a dying process (e.g. no more threads for file writes) are not the job's.
            await _release(ctx, claim, f"the worker stopped: {error}")
        else:
            await _fail(ctx, claim, prediction, error)


async def _recorded(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, write: Callable[[], Awaitable[T]]) -> T:
    """The attempt's closing write, tried again while PostgreSQL is unreachable and the job is still
    ours: a database blip does not cost a finished prediction a second attempt. Should another worker
    take the job over meanwhile, the lease keeper tells us (`LeaseExpired`) and we stop trying."""
    waiting = False
    while True:
        try:
            return await write()
        except Exception as error:
            if _exiting(ctx) or not is_unreachable(error):
                raise
            if not waiting:
                waiting = True
                log_event(
                    "job.attempt.waiting_for_database",
                    logging.WARNING,
                    job_id=str(claim.job_id),
                    attempt=claim.attempt,
                    error=f"{type(error).__name__}: {error}",
                )
            await hold.sleep(1.0)


def _check_deadline(claim: jobs.Claim) -> None:
    if datetime.now(UTC) >= claim.deadline_at:
        raise JobDeadlineExceeded("the job did not finish before its deadline")


async def _start_or_resume(ctx: WorkerContext, claim: jobs.Claim, hold: Hold) -> tuple[Prediction, bool]:
    """The attempt's prediction, and whether it was created just now (not resumed or adopted)."""
    if claim.resume_prediction_id is not None:
        resumed = await _resume(ctx, claim, hold, claim.resume_prediction_id)
        if resumed is not None:
            return resumed, False
    data = model_input(claim)
    if claim.reconcile_since is not None:
        adopted = await _reconcile(ctx, claim, hold, data)
        if adopted is not None:
            return adopted, False
    webhook = None
    if ctx.webhook_url is not None:
        webhook = f"{ctx.webhook_url}?job={claim.job_id}&attempt={claim.attempt}"
    prediction = await _unthrottled(
        ctx, claim, hold, lambda: ctx.provider.create(claim.model, data, webhook=webhook, deadline=claim.deadline_at)
    )
    if not await jobs.record_prediction(ctx.db, claim, prediction.id, prediction.status):
        # We lost the job while creating: its new holder may create a prediction of its own. Unless it
        # adopted ours, cancel ours, so the job is not paid for twice.
        owners = await jobs.prediction_owners(ctx.db, prediction.id)
        if not owners:
            await _cancel_prediction(ctx, claim, prediction)
        raise LeaseLost("the job was taken over while its prediction was being created")
    return prediction, True


async def _resume(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, prediction_id: str) -> Prediction | None:
    """The prediction an earlier attempt started, or None when Replicate no longer knows it.

    A 404 is not a dead end: it proves no such prediction exists to be billed, so the attempt records
    the loss and creates a new one (e.g. a stand-in that forgot its predictions, or an id from
    another account).
    """
    try:
        return await _unthrottled(
            ctx, claim, hold, partial(ctx.provider.get, prediction_id, deadline=claim.deadline_at)
        )
    except PermanentProviderError as error:
        if error.http_status != 404:
            raise
    if not await jobs.forget_gone_prediction(ctx.db, claim, prediction_id):
        raise LeaseLost("the job was taken over while its prediction was found gone")
    log_event(
        "job.prediction.gone",
        logging.WARNING,
        job_id=str(claim.job_id),
        attempt=claim.attempt,
        prediction_id=prediction_id,
        http_status=404,
    )
    return None


async def _reconcile(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, data: dict[str, Any]) -> Prediction | None:
    """An earlier create may have started a prediction we never heard of: find it and adopt it.

    Found by its exact input (the seed recorded at submit makes it this job's), and by the webhook URL
    where the provider shows it (ours carry the job's id). The window opens at the earliest create
    whose outcome is unknown, stamped by PostgreSQL's clock before the request went out, and read
    against the provider's clock for its predictions' `created_at`: two clocks, so the window opens
    `CLOCK_SKEW` earlier than that stamp. Too early costs a few more pages of the list; too late would
    miss the prediction and pay for it twice.
    """
    assert claim.reconcile_since is not None
    since = claim.reconcile_since - CLOCK_SKEW
    try:
        candidates = await _unthrottled(
            ctx,
            claim,
            hold,
            lambda: ctx.provider.find_recent(claim.model, data, since, deadline=claim.deadline_at),
        )
    except PermanentProviderError as error:
        # A provider without a list of predictions (some stand-ins): nothing to reconcile against.
        log_event("job.reconcile.unavailable", logging.WARNING, job_id=str(claim.job_id), error=error.message)
        return None
    for candidate in candidates:
        if candidate.status in ("failed", "canceled", "aborted") or not _webhook_of(candidate, claim):
            continue
        owners = await jobs.prediction_owners(ctx.db, candidate.id)
        if any(job_id != claim.job_id for job_id, _ in owners):
            continue  # another job's prediction with the very same input
        if not await jobs.record_prediction(ctx.db, claim, candidate.id, candidate.status):
            raise LeaseLost("the job was taken over while reconciling")
        log_event(
            "job.prediction.adopted",
            job_id=str(claim.job_id),
            attempt=claim.attempt,
            prediction_id=candidate.id,
        )
        return candidate
    return None


def _webhook_of(prediction: Prediction, claim: jobs.Claim) -> bool:
    """Could the prediction be this job's, by the webhook URL it shows (none shown: it could)?"""
    if prediction.webhook is None:
        return True
    return parse_qs(urlsplit(prediction.webhook).query).get("job") == [str(claim.job_id)]


async def _unthrottled(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again after each 429 for as long as it asks: being throttled is no failed attempt."""
    while True:
        try:
            return await call()
        except TransientProviderError as error:
            wait = ctx.policy.throttle_wait(error)
            if wait is None:
                raise
            log_event("job.throttled", job_id=str(claim.job_id), attempt=claim.attempt, retry_after=wait)
            await hold.sleep(wait)
            _check_deadline(claim)


async def _poll(
    ctx: WorkerContext, claim: jobs.Claim, hold: Hold, prediction: Prediction, *, fresh: bool
) -> Prediction:
    delays = ctx.polls.delays(claim.model, fresh=fresh)
    progress = ProgressReporter(ctx.db, ctx.notifier, claim)
    while not prediction.done:
        hold.check()
        _check_deadline(claim)
        await hold.sleep(next(delays))
        prediction = await _unthrottled(
            ctx, claim, hold, partial(ctx.provider.get, prediction.id, deadline=claim.deadline_at)
        )
        await progress.seen(prediction)
    ctx.polls.observe(claim.model, prediction)
    return prediction


async def _await_webhook(
    ctx: WorkerContext, claim: jobs.Claim, hold: Hold, prediction: Prediction, events: Subscription
) -> Prediction:
    """Wait for the webhook that says the prediction ended, then look at it (one GET); without one, look
    every `webhook_poll_seconds` anyway (a lost webhook, Replicate's retries giving up)."""
    progress = ProgressReporter(ctx.db, ctx.notifier, claim)
    while not prediction.done:
        _check_deadline(claim)
        give_up_at = time.monotonic() + ctx.webhook_poll_seconds
        while (left := give_up_at - time.monotonic()) > 0:
            event = await _next_event(events, hold, left)
            if event is None or event.get("type") != "prediction" or event.get("prediction_id") != prediction.id:
                continue
            if event.get("status") in TERMINAL_PREDICTION:
                break
            if event.get("progress"):  # a `logs` webhook: its tqdm bar, parsed by the receiver
                await progress.report(event["progress"]["percentage"])
        prediction = await _unthrottled(
            ctx, claim, hold, partial(ctx.provider.get, prediction.id, deadline=claim.deadline_at)
        )
    ctx.polls.observe(claim.model, prediction)
    return prediction


async def _next_event(events: Subscription, hold: Hold, within: float) -> Event | None:
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


def _prediction_failure(prediction: Prediction) -> MediagenError:
    """A prediction that ended failed is the model's verdict (permanent unless an infrastructure
    fault); one canceled or aborted by someone else is worth a new prediction."""
    message = prediction.error or f"the prediction ended {prediction.status}"
    if prediction.status == "failed":
        kind = TransientProviderError if prediction_failure_is_transient(message) else PermanentProviderError
        return kind(message, error_class="PredictionFailed")
    return TransientProviderError(message, error_class="PredictionCanceled")


async def _fail(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None, error: Exception) -> None:
    if isinstance(error, MediagenError):
        failure = jobs.Failure(
            error.error_class, error.message, error.http_status, create_rejected=error.create_rejected
        )
    else:
        failure = jobs.Failure(type(error).__name__, str(error) or type(error).__name__)
    if prediction is not None and prediction.done:
        # Recorded so that the next attempt knows whether this prediction can be resumed.
        failure = jobs.Failure(failure.error_class, failure.message, failure.http_status, prediction.status, False)
    decision = ctx.policy.decide(error, claim.attempt, max_attempts=claim.max_attempts)
    retry_delay = decision.delay if decision.retry else None
    try:
        spend = _spend(ctx, claim, prediction)
        held = await jobs.fail_attempt(ctx.db, claim, failure, retry_delay=retry_delay, spend=spend)
    except Exception:
        # The database is unreachable: leave the job to its lease; the next claim closes this attempt.
        log_event("job.attempt.unrecorded", logging.WARNING, job_id=str(claim.job_id), attempt=claim.attempt)
        return
    if not held:
        _log_lost(claim)
        return
    _count_spend(claim, spend)
    # Logged once the row is committed, so the log and the attempts table tell the same story.
    _attempt_closed(
        claim.job_id,
        claim.attempt,
        "failed",
        failure.error_class,
        logging.ERROR if not isinstance(error, MediagenError) else logging.INFO,
        error=failure.message,
        http_status=failure.http_status,
        prediction_id=prediction.id if prediction else claim.resume_prediction_id,
        exc_info=error if not isinstance(error, MediagenError) else None,
    )
    if retry_delay is not None:
        metrics.retries_scheduled.labels(failure.error_class).inc()
        log_event(
            "job.retry.scheduled",
            job_id=str(claim.job_id),
            attempt=claim.attempt,
            next_attempt=claim.attempt + 1,
            delay_seconds=retry_delay,
            error_class=failure.error_class,
        )
        _announce(ctx, claim, "retrying", delay_seconds=retry_delay, error_class=failure.error_class)
        await _send_quietly(ctx, claim.job_id, max(retry_delay, MIN_RESEND_DELAY))
    else:
        if prediction is not None and not prediction.done:
            await _cancel_prediction(ctx, claim, prediction)
        metrics.jobs_finished.labels("failed").inc()
        log_event(
            "job.failed",
            job_id=str(claim.job_id),
            attempt=claim.attempt,
            error_class=failure.error_class,
            error=failure.message,
        )
        _announce(ctx, claim, "failed", error_class=failure.error_class, error=failure.message)


async def _cancel_prediction(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction) -> str | None:
    """Stop paying for a prediction we no longer want; its status if that worked."""
    try:
        await ctx.provider.cancel(prediction.id)
    except MediagenError as error:
        log_event("job.prediction.cancel_failed", logging.WARNING, job_id=str(claim.job_id), error=error.message)
        return None
    log_event("job.prediction.canceled", job_id=str(claim.job_id), prediction_id=prediction.id)
    return "canceled"


async def _cancel(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None) -> None:
    status = None
    if prediction is not None and not prediction.done:
        status = await _cancel_prediction(ctx, claim, prediction)
    held = await jobs.finish_canceled(ctx.db, claim, status)
    if held:
        metrics.jobs_finished.labels("canceled").inc()
        _attempt_closed(claim.job_id, claim.attempt, "canceled", "JobCanceled", error="canceled on request")
        log_event("job.canceled", job_id=str(claim.job_id), attempt=claim.attempt)
        _announce(ctx, claim, "canceled")


async def _release(ctx: WorkerContext, claim: jobs.Claim, reason: str) -> None:
    try:
        held = await jobs.release(ctx.db, claim, reason)
    except Exception:
        return  # the lease will expire and the sweep hands the job back
    if held:
        _attempt_closed(claim.job_id, claim.attempt, "abandoned", "WorkerShutdown", error=reason)
        _announce(ctx, claim, "retrying", delay_seconds=0.0, error_class="WorkerShutdown")
        await _send_quietly(ctx, claim.job_id, MIN_RESEND_DELAY)


async def _send_quietly(ctx: WorkerContext, job_id: uuid.UUID, delay: float) -> None:
    try:
        await ctx.dispatcher.send([job_id], delay=delay)
    except Exception:
        # Redis is down: the job is recorded as due in PostgreSQL and the sweep will send it.
        log_event("job.dispatch.deferred", logging.WARNING, job_id=str(job_id))


def _attempt_closed(
    job_id: uuid.UUID, attempt: int, outcome: str, error_class: str = "", level: int = logging.INFO, **fields: Any
) -> None:
    """The one place an attempt's end is told: its metric and its log line (after the row is committed).

    `job.attempt.succeeded` for a success; `job.attempt.failed` for every other end (failed, canceled,
    abandoned), with the error class, so that log lines and attempt rows can be counted one for one.
    """
    metrics.attempts.labels(outcome, error_class).inc()
    event = "job.attempt.succeeded" if outcome == "succeeded" else "job.attempt.failed"
    if error_class:
        fields["error_class"] = error_class
    log_event(event, level, job_id=str(job_id), attempt=attempt, outcome=outcome, **fields)


def _spend(
    ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None, images: int | None = None
) -> jobs.Spend:
    """What an ended prediction reported and cost. `images`: outputs stored, for a model whose metrics
    do not count them (Replicate bills per output image)."""
    if prediction is None or not prediction.done:
        return jobs.NO_SPEND
    reported = prediction.metrics or {}
    seconds = reported.get("predict_time")
    count = reported.get("image_count")
    predict_time = float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else None
    image_count = count if isinstance(count, int) and not isinstance(count, bool) else images
    return jobs.Spend(predict_time, image_count, pricing.cost(claim.model, image_count, predict_time, ctx.prices))


def _count_spend(claim: jobs.Claim, spend: jobs.Spend) -> None:
    if spend.image_count:
        metrics.images_made.labels(claim.model).inc(spend.image_count)
    if spend.cost_usd is not None:
        metrics.spend_usd.labels(claim.model).inc(float(spend.cost_usd))


def _announce(ctx: WorkerContext, claim: jobs.Claim, status: str, **fields: Any) -> None:
    """Tell listeners (mediagen.notify) that the job's row changed: fire and forget, after the commit."""
    ctx.notifier.publish(claim.job_id, {"type": "job", "status": status, "attempt": claim.attempt, **fields})


async def _explain_lost(ctx: WorkerContext, claim: jobs.Claim, expired: LeaseExpired) -> None:
    """Our lease ran out during a database outage and another worker took the job over, closing our
    attempt as `WorkerLost`: put what really happened on it. A connection the outage broke may fail
    the first try; after a few, the attempt keeps the new holder's words."""
    for _ in range(5):
        try:
            await jobs.explain_abandoned(ctx.db, claim, expired.error_class, expired.message)
            break
        except Exception as error:
            if not is_unreachable(error):
                break
            await asyncio.sleep(1.0)
    log_event(
        "job.lease.expired",
        logging.WARNING,
        job_id=str(claim.job_id),
        attempt=claim.attempt,
        error_class=expired.error_class,
        error=expired.message,
    )
    _log_lost(claim)


def _log_lost(claim: jobs.Claim) -> None:
    log_event("job.attempt.superseded", job_id=str(claim.job_id), attempt=claim.attempt)
