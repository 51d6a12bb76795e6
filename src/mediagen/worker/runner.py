"""One attempt of one job, start to finish: claim, resume or create, wait, store, record.

The attempt protocol (no lost job, no double billing):

1. Claim the job (a conditional UPDATE) and open an attempt row in the same transaction. Nothing
   claimed: someone else holds it, or it is finished, or it is not due yet. Stop.
2. If an earlier attempt started a prediction that has not itself failed, resume it (GET); if
   Replicate no longer knows it (404), note it on the attempt and go on as below. If an earlier
   create's outcome is unknown, look for its prediction in Replicate's recent list first. Only
   otherwise create one, and store its id at once, before any waiting.
3. Wait by polling on the event loop (no thread is held busy; mediagen.worker.waiting): first after
   about as long as this model's predictions take (mediagen.worker.polling), then in growing steps.
   The lease is renewed for all running jobs at once by mediagen.worker.leases.
4. Download each image at once, check it, store it atomically; then close the attempt and the job in
   one transaction, guarded by our claim token.
5. On error, mediagen.core.retry decides: retry (job `retrying`, a delayed message) or fail.

Bounded throughout: every call to the provider ends by the job's deadline (the adapter bounds it as a
whole), each prediction is created to end by then at the provider too (Replicate's `Cancel-After`), and
a read, a poll's sleep or a wait on a 429 or an outage ends the moment the job is canceled, taken over
or past its deadline. Whatever ends the job then, the prediction it knows of (resumed, adopted or
created) is canceled at the provider unless the job will resume it (mediagen.worker.endings).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from mediagen import metrics
from mediagen.core import jobs
from mediagen.core.db import is_unreachable
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
from mediagen.core.retry import prediction_failure_is_transient
from mediagen.logging import log_event
from mediagen.providers import fairshare
from mediagen.providers.base import Prediction
from mediagen.worker import endings
from mediagen.worker.context import WorkerContext
from mediagen.worker.failover import FailingOver
from mediagen.worker.leases import Hold
from mediagen.worker.outputs import store_outputs
from mediagen.worker.waiting import Flight, await_webhook, check_deadline, poll, read, seconds_left, unthrottled

T = TypeVar("T")

CLOCK_SKEW = timedelta(seconds=30)
"""How far the provider's clock may be behind PostgreSQL's when predictions are looked for by time.
NTP keeps servers within milliseconds; 30 s also covers a host whose clock drifted, for about three
more pages of Replicate's list at its 600 creates a minute."""


def model_input(claim: jobs.Claim) -> dict[str, Any]:
    """The input decided at submit for the attempt's provider; for a job from before it was recorded, the
    old portable five."""
    if claim.routes:
        return claim.route.input
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
        await endings.send_quietly(ctx, job_id, endings.MIN_RESEND_DELAY)
        return
    claim = await jobs.claim(ctx.db, job_id, lease_seconds=ctx.lease_seconds)
    if claim is None:
        early = await jobs.due_in(ctx.db, job_id)
        if early is not None:  # a delayed message that arrived before its time
            await ctx.dispatcher.send([job_id], delay=max(early, endings.MIN_RESEND_DELAY))
        return
    if claim.abandoned_attempt is not None:
        endings.attempt_closed(
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
    endings.announce(ctx, claim, "running")
    hold = ctx.leases.hold(job_id, claim.token)
    metrics.in_flight.inc()
    try:
        moved = await _attempt(ctx, claim, hold)
    finally:
        metrics.in_flight.dec()
        ctx.leases.drop(hold)
    if moved:
        # Failed over: the next attempt, at the next provider, now (the sweep re-sends it should we die).
        await run_job(ctx, job_id)


async def _attempt(ctx: WorkerContext, claim: jobs.Claim, hold: Hold) -> bool:
    """One attempt to its end; True when the job failed over to another provider, to be claimed again now."""
    started = time.monotonic()
    flight = Flight()
    if claim.resume_prediction_id is not None:
        # Not looked at yet, but ours: a job that ends before the look still cancels it.
        flight.prediction = Prediction(claim.resume_prediction_id, "starting")
    try:
        if claim.attempt > claim.max_attempts:
            raise PermanentProviderError(
                f"gave up after {claim.max_attempts} attempts", error_class="AttemptsExhausted"
            )
        check_deadline(claim)
        if ctx.webhook_for(claim.provider) is None:
            created = await _start_or_resume(ctx, claim, hold, flight)
            await poll(ctx, claim, hold, flight, fresh=created)
        else:
            # Listening before the create: a webhook that beats the create's answer is not missed.
            async with ctx.notifier.listen(claim.job_id) as events:
                await _start_or_resume(ctx, claim, hold, flight)
                await await_webhook(ctx, claim, hold, flight, events)
        prediction = flight.prediction
        assert prediction is not None
        if prediction.status != "succeeded":
            raise _prediction_failure(prediction)
        outputs = await store_outputs(ctx.downloader, ctx.storage, claim.job_id, prediction.output)
        asked = model_input(claim).get("num_outputs")
        if isinstance(asked, int) and len(outputs) < asked:
            # flux drops images its safety checker flagged: fewer outputs is the model's answer, not an error.
            log_event(
                "job.outputs.fewer", job_id=str(claim.job_id), attempt=claim.attempt, asked=asked, got=len(outputs)
            )
        spend = endings.spend_of(ctx, claim, prediction, images=len(outputs))
        held = await _recorded(ctx, claim, hold, lambda: jobs.succeed(ctx.db, claim, outputs, prediction.status, spend))
        if held:
            endings.count_spend(claim, spend)
            metrics.jobs_finished.labels("succeeded").inc()
            endings.attempt_closed(
                claim.job_id,
                claim.attempt,
                "succeeded",
                prediction_id=prediction.id,
                outputs=len(outputs),
                seconds=round(time.monotonic() - started, 3),
            )
            log_event("job.succeeded", job_id=str(claim.job_id), attempt=claim.attempt)
            endings.announce(ctx, claim, "succeeded")
        else:
            endings.log_lost(claim)
    except FailingOver as moving:
        return await endings.fail_over(ctx, claim, moving.to, moving.cause)
    except LeaseExpired as expired:
        await endings.explain_lost(ctx, claim, expired)
    except LeaseLost:
        endings.log_lost(claim)
    except JobCanceled:
        await endings.cancel(ctx, claim, flight.prediction)
    except WorkerStopping as stopping:
        await endings.release(ctx, claim, stopping.message)
    except asyncio.CancelledError:
        await endings.release(ctx, claim, "the worker was stopped")
        raise
    except Exception as error:
        if _exiting(ctx):
            # Errors of a dying process (e.g. no more threads for file writes) are not the job's.
            await endings.release(ctx, claim, f"the worker stopped: {error}")
        else:
            await endings.fail(ctx, claim, flight.prediction, _past_deadline(claim, error))
    return False


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


def _past_deadline(claim: jobs.Claim, error: Exception) -> Exception:
    """An error met once the deadline has passed (a call cut off by it, a prediction Replicate ended
    by it) ends the job as past its deadline, whatever else it would have been worth."""
    if isinstance(error, JobDeadlineExceeded) or seconds_left(claim) > 0:
        return error
    cause = error.message if isinstance(error, MediagenError) else str(error) or type(error).__name__
    return JobDeadlineExceeded(f"the job did not finish before its deadline ({cause})")


async def _start_or_resume(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, flight: Flight) -> bool:
    """The attempt's prediction into `flight`; True when it was created just now (not resumed or adopted)."""
    if claim.resume_prediction_id is not None:
        flight.prediction = await _resume(ctx, claim, hold, claim.resume_prediction_id)
        if flight.prediction is not None:
            return False
    data = model_input(claim)
    if claim.reconcile_since is not None:
        flight.prediction = await _reconcile(ctx, claim, hold, data)
        if flight.prediction is not None:
            return False
    webhook = None
    if (base := ctx.webhook_for(claim.provider)) is not None:
        webhook = f"{base}?job={claim.job_id}&attempt={claim.attempt}"
    provider = ctx.provider_for(claim.provider)
    # Given up on a cancel only while it waits before sending (Hold.create): a create cut off after it
    # went out would leave a paid prediction unknown. It ends by its own bound, and a cancel is seen next.
    # No prediction of the job lives anywhere now (none to resume, none found): it may move to the next
    # provider (mediagen.worker.failover).
    create = partial(provider.create, claim.route.model, data, webhook=webhook, deadline=claim.deadline_at)
    place = _Place(ctx, claim)
    share = fairshare.current.set(fairshare.Share(claim.owner, lane(claim.parameters), placed=place.told))
    try:
        prediction = await unthrottled(ctx, claim, hold, partial(hold.create, create), may_move=True)
    finally:
        fairshare.current.reset(share)
    if place.shown:
        await place.told(None)
    if not await jobs.record_prediction(ctx.db, claim, prediction.id, prediction.status):
        # We lost the job while creating: its new holder may create a prediction of its own. Unless it
        # adopted ours, cancel ours, so the job is not paid for twice.
        owners = await jobs.prediction_owners(ctx.db, prediction.id)
        if not owners:
            await endings.cancel_prediction(ctx, claim, prediction)
        raise LeaseLost("the job was taken over while its prediction was being created")
    flight.prediction = prediction
    return True


def lane(parameters: dict[str, Any]) -> fairshare.Lane:
    """The job's lane for the provider's budget: `interactive` when it asked for it, else `batch`."""
    return "interactive" if parameters.get("lane") == "interactive" else "batch"


class _Place:
    """The job's place in the fair queue of the provider's create budget, shown in its status while it
    waits there; only shown, so a database blip just skips it."""

    def __init__(self, ctx: WorkerContext, claim: jobs.Claim) -> None:
        self.ctx = ctx
        self.claim = claim
        self.shown = False

    async def told(self, place: int | None) -> None:
        self.shown = place is not None
        try:
            await jobs.record_queue_position(self.ctx.db, self.claim, place)
        except Exception as error:
            if not is_unreachable(error):
                raise


async def _resume(ctx: WorkerContext, claim: jobs.Claim, hold: Hold, prediction_id: str) -> Prediction | None:
    """The prediction an earlier attempt started, or None when Replicate no longer knows it.

    A 404 is not a dead end: it proves no such prediction exists to be billed, so the attempt records
    the loss and creates a new one (e.g. a stand-in that forgot its predictions, or an id from
    another account).
    """
    try:
        return await unthrottled(
            ctx,
            claim,
            hold,
            read(hold, partial(ctx.provider_for(claim.provider).get, prediction_id, deadline=claim.deadline_at)),
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
        candidates = await unthrottled(
            ctx,
            claim,
            hold,
            read(
                hold,
                lambda: ctx.provider_for(claim.provider).find_recent(
                    claim.route.model, data, since, deadline=claim.deadline_at
                ),
            ),
        )
    except PermanentProviderError as error:
        # A provider without a list of predictions (some stand-ins): nothing to reconcile against.
        log_event("job.reconcile.unavailable", logging.WARNING, job_id=str(claim.job_id), error=error.message)
        return None
    ours: list[tuple[Prediction, bool]] = []
    for candidate in candidates:
        if candidate.status in ("failed", "canceled", "aborted") or not _webhook_of(candidate, claim):
            continue
        owners = await jobs.prediction_owners(ctx.db, candidate.id)
        if any(job_id != claim.job_id for job_id, _ in owners):
            continue  # another job's prediction with the very same input
        ours.append((candidate, bool(owners)))
    if not ours:
        return None
    # Two creates of this job both unknown may have made two: the one furthest along is adopted (a
    # succeeded one is paid for already), and any other nobody holds is canceled before it is billed too.
    ours.sort(key=lambda found: _FURTHEST.get(found[0].status, 0), reverse=True)  # stable: newest first
    adopted = ours[0][0]
    if not await jobs.record_prediction(ctx.db, claim, adopted.id, adopted.status):
        raise LeaseLost("the job was taken over while reconciling")
    log_event("job.prediction.adopted", job_id=str(claim.job_id), attempt=claim.attempt, prediction_id=adopted.id)
    for extra, held in ours[1:]:
        if not held and not extra.done:
            await endings.cancel_prediction(ctx, claim, extra)
    return adopted


_FURTHEST = {"succeeded": 2, "processing": 1}


def _webhook_of(prediction: Prediction, claim: jobs.Claim) -> bool:
    """Could the prediction be this job's, by the webhook URL it shows (none shown: it could)?"""
    if prediction.webhook is None:
        return True
    return parse_qs(urlsplit(prediction.webhook).query).get("job") == [str(claim.job_id)]


def _prediction_failure(prediction: Prediction) -> MediagenError:
    """A prediction that ended failed is the model's verdict (permanent unless an infrastructure
    fault); one aborted reached the job's deadline (its `Cancel-After`) before it started; one
    canceled by someone else is worth a new prediction."""
    message = prediction.error or f"the prediction ended {prediction.status}"
    if prediction.status == "aborted":
        return JobDeadlineExceeded(
            "the job did not finish before its deadline (the provider aborted its prediction, which had not "
            "started by then: not billed)"
        )
    if prediction.status == "failed":
        transient = prediction.retryable
        if transient is None:
            transient = prediction_failure_is_transient(message)
        kind = TransientProviderError if transient else PermanentProviderError
        return kind(message, error_class="PredictionFailed")
    return TransientProviderError(message, error_class="PredictionCanceled")
