"""How an attempt ends: one guarded write, then its log line, its metrics and its announcement.

Failed (retried or final, as mediagen.core.retry decides), canceled, handed back by a stopping worker,
or lost to another worker: each end is written in one statement guarded by the claim token (a worker
that lost the job writes nothing), and only once it is committed is it logged (`job.attempt.*`),
counted and announced to listeners (mediagen.notify). A prediction the job no longer wants is
canceled at the provider, so it is not billed for nothing, and what it ran for is recorded as its spend.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from mediagen import metrics
from mediagen.core import jobs, pricing
from mediagen.core.db import is_unreachable
from mediagen.core.errors import LeaseExpired, MediagenError
from mediagen.core.pricing import Price
from mediagen.core.routing import Route
from mediagen.logging import log_event
from mediagen.providers.base import Prediction
from mediagen.worker.context import WorkerContext

# Sends from inside a job's own message go through the delay queue: an immediate send would reuse
# the Redis id of the message still being processed and be deleted by its acknowledgement.
MIN_RESEND_DELAY = 1.0

# How long a cancel waits to read the prediction it canceled (its metrics: what it ran for); briefly,
# so a provider that answers slowly does not hold up the job's end.
CANCELED_READ_SECONDS = 1.0


async def fail(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None, error: Exception) -> None:
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
        spend = spend_of(ctx, claim, prediction)
        held = await jobs.fail_attempt(ctx.db, claim, failure, retry_delay=retry_delay, spend=spend)
    except Exception:
        # The database is unreachable: leave the job to its lease; the next claim closes this attempt.
        log_event("job.attempt.unrecorded", logging.WARNING, job_id=str(claim.job_id), attempt=claim.attempt)
        return
    if not held:
        log_lost(claim)
        return
    count_spend(claim, spend)
    # Logged once the row is committed, so the log and the attempts table tell the same story.
    attempt_closed(
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
        announce(ctx, claim, "retrying", delay_seconds=retry_delay, error_class=failure.error_class)
        await send_quietly(ctx, claim.job_id, max(retry_delay, MIN_RESEND_DELAY))
    else:
        if prediction is not None and not prediction.done:
            await cancel_prediction(ctx, claim, prediction)
        metrics.jobs_finished.labels("failed").inc()
        log_event(
            "job.failed",
            job_id=str(claim.job_id),
            attempt=claim.attempt,
            error_class=failure.error_class,
            error=failure.message,
        )
        announce(ctx, claim, "failed", error_class=failure.error_class, error=failure.message)


async def fail_over(ctx: WorkerContext, claim: jobs.Claim, to: Route, cause: MediagenError) -> bool:
    """The attempt's provider cannot take the job (its circuit open, or a create refused for capacity) and
    the job holds no prediction anywhere: end this attempt and move the job to its next route, due now.
    True when the move was recorded (the caller claims the job again at once)."""
    failure = jobs.Failure(cause.error_class, f"failed over to {to.provider}: {cause.message}", cause.http_status)
    try:
        held = await jobs.fail_over(ctx.db, claim, to, failure)
    except Exception:
        log_event("job.attempt.unrecorded", logging.WARNING, job_id=str(claim.job_id), attempt=claim.attempt)
        return False
    if not held:
        log_lost(claim)
        return False
    attempt_closed(
        claim.job_id,
        claim.attempt,
        "failed",
        failure.error_class,
        error=failure.message,
        http_status=failure.http_status,
        provider=claim.provider,
    )
    metrics.failovers.labels(claim.provider, to.provider, cause.error_class).inc()
    log_event(
        "job.failover",
        job_id=str(claim.job_id),
        attempt=claim.attempt,
        from_provider=claim.provider,
        to_provider=to.provider,
        error_class=cause.error_class,
        reason=cause.message,
    )
    announce(ctx, claim, "retrying", delay_seconds=0.0, error_class=cause.error_class, failover_to=to.provider)
    return True


async def cancel_prediction(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction) -> str | None:
    """Stop paying for a prediction we no longer want; its status if that worked.

    A cancel the provider cannot take now (an outage, a 5xx, a timeout) is tried again in the background
    until it is taken or the job's deadline passes, when the provider ends the prediction itself (it was
    created with the deadline as `Cancel-After`). The job's end is not held up meanwhile."""
    try:
        await ctx.provider_for(claim.provider).cancel(prediction.id)
    except MediagenError as error:
        log_event(
            "job.prediction.cancel_failed",
            logging.WARNING,
            job_id=str(claim.job_id),
            prediction_id=prediction.id,
            error=error.message,
            retrying=error.transient,
        )
        if error.transient:
            task = asyncio.get_running_loop().create_task(_keep_canceling(ctx, claim, prediction.id, error))
            ctx.cancels.add(task)
            task.add_done_callback(ctx.cancels.discard)
        return None
    log_event("job.prediction.canceled", job_id=str(claim.job_id), prediction_id=prediction.id)
    return "canceled"


async def _keep_canceling(ctx: WorkerContext, claim: jobs.Claim, prediction_id: str, error: MediagenError) -> None:
    wait = ctx.policy.base_seconds
    while True:
        await asyncio.sleep(min(max(wait, error.retry_after or 0.0), ctx.policy.cap_seconds))
        if ctx.stopping or datetime.now(UTC) >= claim.deadline_at:
            return  # the provider ends it by the deadline (Cancel-After)
        try:
            await ctx.provider_for(claim.provider).cancel(prediction_id)
        except MediagenError as again:
            if not again.transient:
                return
            error, wait = again, wait * 2
            continue
        except Exception:
            return  # the worker is closing its clients
        log_event("job.prediction.canceled", job_id=str(claim.job_id), prediction_id=prediction_id, late=True)
        return


async def cancel(ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None) -> None:
    status = None
    ended = prediction
    if prediction is not None and not prediction.done:
        status = await cancel_prediction(ctx, claim, prediction)
        if status is not None:
            ended = await _ended(ctx, claim, prediction.id)
    # A canceled prediction is billed for the time it ran: counted, or submit-then-cancel escapes the cap.
    spend = spend_of(ctx, claim, ended)
    held = await jobs.finish_canceled(ctx.db, claim, status, spend)
    if held:
        count_spend(claim, spend)
        metrics.jobs_finished.labels("canceled").inc()
        attempt_closed(claim.job_id, claim.attempt, "canceled", "JobCanceled", error="canceled on request")
        log_event("job.canceled", job_id=str(claim.job_id), attempt=claim.attempt)
        announce(ctx, claim, "canceled")


async def _ended(ctx: WorkerContext, claim: jobs.Claim, prediction_id: str) -> Prediction | None:
    """The canceled prediction as it ended, with its metrics; None if the provider cannot tell us now."""
    try:
        return await asyncio.wait_for(ctx.provider_for(claim.provider).get(prediction_id), CANCELED_READ_SECONDS)
    except (MediagenError, TimeoutError):
        return None


async def release(ctx: WorkerContext, claim: jobs.Claim, reason: str) -> None:
    try:
        held = await jobs.release(ctx.db, claim, reason)
    except Exception:
        return  # the lease will expire and the sweep hands the job back
    if held:
        attempt_closed(claim.job_id, claim.attempt, "abandoned", "WorkerShutdown", error=reason)
        announce(ctx, claim, "retrying", delay_seconds=0.0, error_class="WorkerShutdown")
        await send_quietly(ctx, claim.job_id, MIN_RESEND_DELAY)


async def send_quietly(ctx: WorkerContext, job_id: uuid.UUID, delay: float) -> None:
    try:
        await ctx.dispatcher.send([job_id], delay=delay)
    except Exception:
        # Redis is down: the job is recorded as due in PostgreSQL and the sweep will send it.
        log_event("job.dispatch.deferred", logging.WARNING, job_id=str(job_id))


def attempt_closed(
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


def spend_of(
    ctx: WorkerContext, claim: jobs.Claim, prediction: Prediction | None, images: int | None = None
) -> jobs.Spend:
    """What an ended prediction reported and cost. `images`: outputs stored, for a model whose metrics
    do not count them (Replicate bills per output image)."""
    # Priced by the model's name at the provider that ran it (a fal endpoint has fal's price).
    return measured(prediction, claim.route.model, ctx.prices, images)


def measured(
    prediction: Prediction | None, model: str, prices: Mapping[str, Price | None], images: int | None = None
) -> jobs.Spend:
    """What an ended prediction of `model` (its name at its provider) reported, priced by `prices`."""
    if prediction is None or not prediction.done:
        return jobs.NO_SPEND
    if prediction.status == "aborted":
        return jobs.Spend(None, 0, Decimal(0))  # never started: Replicate bills nothing for it
    reported = prediction.metrics or {}
    seconds = reported.get("predict_time")
    count = reported.get("image_count")
    predict_time = float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else None
    image_count = count if isinstance(count, int) and not isinstance(count, bool) else images
    made = reported.get("megapixels")
    megapixels = made if isinstance(made, int) and not isinstance(made, bool) else None
    cost = pricing.cost(model, image_count, predict_time, prices, megapixels)
    return jobs.Spend(predict_time, image_count, cost)


def count_spend(claim: jobs.Claim, spend: jobs.Spend) -> None:
    count_spend_of(claim.model, claim.provider, spend)


def count_spend_of(model: str, provider: str, spend: jobs.Spend) -> None:
    """Count a prediction's images and cost in the metrics of the job's `model` at `provider`."""
    if spend.image_count:
        metrics.images_made.labels(model, provider).inc(spend.image_count)
    if spend.cost_usd is not None:
        metrics.spend_usd.labels(model, provider).inc(float(spend.cost_usd))


def announce(ctx: WorkerContext, claim: jobs.Claim, status: str, **fields: Any) -> None:
    """Tell listeners (mediagen.notify) that the job's row changed: fire and forget, after the commit."""
    ctx.notifier.publish(claim.job_id, {"type": "job", "status": status, "attempt": claim.attempt, **fields})


async def explain_lost(ctx: WorkerContext, claim: jobs.Claim, expired: LeaseExpired) -> None:
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
    log_lost(claim)


def log_lost(claim: jobs.Claim) -> None:
    log_event("job.attempt.superseded", job_id=str(claim.job_id), attempt=claim.attempt)
