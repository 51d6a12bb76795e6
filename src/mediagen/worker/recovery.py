"""The recovery sweep: the database is the truth, the broker only delivers.

The jobs it ends or takes are chosen and changed by the job's domain (mediagen.core.jobs.sweeps); this
module runs it periodically and does the broker's and the provider's part.

Every worker process runs it every `sweep_interval_seconds`; it is safe to run in many processes at
once (rows are taken with `FOR UPDATE SKIP LOCKED` and stamped, so two sweeps never take the same
job). Each pass:

* fails jobs that are still waiting when their deadline has passed, and cancels at the provider the
  prediction an earlier attempt left running for the next one to resume;
* ends the `running` jobs whose worker is gone (their lease expired) and that must not run again: a
  canceled one ends `canceled`, one past its deadline `failed`; and the `retrying` ones canceled while
  their last attempt's prediction may still run. Their prediction is canceled at the provider first.
  The sweep runs in the worker because only the worker has the provider: the API never calls
  Replicate on a client's request path. A cancel the provider could not take (unreachable, throttled)
  leaves the job held by the sweep for one lease, after which a sweep tries again; a refusal (4xx,
  such as a prediction it no longer knows) leaves nothing to cancel, and the job ends;
* re-sends jobs whose message was lost: `queued` (or `retrying` and due) for more than
  `stale_dispatch_seconds` with no message for them left in Redis (a flushed or restarted Redis, an
  enqueue that failed after the job was committed). Messages carry the job id as their Redis id, so
  "is there a message?" is a lookup, not a guess;
* re-sends `running` jobs whose lease expired (their worker died): the next claim closes the dead
  attempt as `abandoned` and resumes its prediction.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Literal

from mediagen import metrics
from mediagen.broker import Dispatcher
from mediagen.core import jobs, pricing
from mediagen.core.db import Database
from mediagen.core.errors import MediagenError, PermanentProviderError
from mediagen.core.pricing import Price
from mediagen.core.routing import REPLICATE
from mediagen.logging import log_event
from mediagen.notify import Notifier
from mediagen.providers.base import Prediction, Provider
from mediagen.worker.background import Background
from mediagen.worker.endings import CANCELED_READ_SECONDS, count_spend_of, measured

Canceled = Literal["canceled", "refused", "unreachable"]
"""What became of a cancel at the provider: done; refused (a 4xx: nothing there to cancel); not done."""


async def cancel_prediction(provider: Provider, job_id: uuid.UUID, prediction_id: str, *, within: float) -> Canceled:
    """Cancel a prediction nobody waits for any more, within `within` seconds."""
    try:
        await asyncio.wait_for(provider.cancel(prediction_id), within)
    except (MediagenError, TimeoutError) as error:
        refused = isinstance(error, PermanentProviderError)
        log_event(
            "job.prediction.cancel_failed",
            logging.WARNING,
            job_id=str(job_id),
            prediction_id=prediction_id,
            error=error.message if isinstance(error, MediagenError) else "the provider did not answer in time",
            swept=True,
        )
        return "refused" if refused else "unreachable"
    log_event("job.prediction.canceled", job_id=str(job_id), prediction_id=prediction_id, swept=True)
    return "canceled"


async def _ended(provider: Provider, prediction_id: str) -> Prediction | None:
    """The canceled prediction as it ended, with its metrics; None if the provider cannot tell us now."""
    try:
        return await asyncio.wait_for(provider.get(prediction_id), CANCELED_READ_SECONDS)
    except (MediagenError, TimeoutError):
        return None


def _of(providers: Mapping[str, Provider] | None, name: str | None, default: Provider) -> Provider:
    """The adapter of the provider a prediction runs at (`default` when unknown or not configured here)."""
    return (providers or {}).get(name or "", default)


async def end_unheld(
    db: Database,
    provider: Provider,
    *,
    lease_seconds: float,
    batch: int,
    notifier: Notifier | None = None,
    providers: Mapping[str, Provider] | None = None,
    prices: Mapping[str, Price | None] = pricing.DEFAULT_PRICES,
) -> int:
    """End the running jobs whose worker is gone and that must not run again (canceled, or past their
    deadline), after canceling their prediction at the provider (its spend priced by `prices`).
    Returns how many ended."""
    taken = await jobs.take_unheld(db, lease_seconds=lease_seconds, batch=batch)
    ended = await asyncio.gather(
        *(_end(db, _of(providers, job.provider, provider), job, lease_seconds, notifier, prices) for job in taken)
    )
    return sum(ended)


async def _end(
    db: Database,
    provider: Provider,
    job: jobs.Unheld,
    lease_seconds: float,
    notifier: Notifier | None,
    prices: Mapping[str, Price | None],
) -> bool:
    prediction_status = None
    spend = jobs.NO_SPEND
    if job.prediction_id is not None:
        outcome = await cancel_prediction(provider, job.job_id, job.prediction_id, within=lease_seconds / 2)
        if outcome == "unreachable":
            return False  # held by this sweep until its lease runs out; a later sweep tries again
        prediction_status = "canceled" if outcome == "canceled" else None
        if outcome == "canceled" and job.route_model is not None:
            # Billed for the time it ran: counted, or a lost worker's canceled job escapes the spend cap.
            spend = measured(await _ended(provider, job.prediction_id), job.route_model, prices)
    if not await jobs.end_unheld(db, job, prediction_status=prediction_status, spend=spend):
        return False
    count_spend_of(job.model or "", job.provider or REPLICATE, spend)
    status, error_class = ("canceled", "JobCanceled") if job.canceled else ("failed", "JobDeadlineExceeded")
    if job.status == "running" and job.attempt is not None:
        metrics.attempts.labels("abandoned", "WorkerLost").inc()
        log_event(
            "job.attempt.failed",
            job_id=str(job.job_id),
            attempt=job.attempt,
            outcome="abandoned",
            error_class="WorkerLost",
            error="the worker running this attempt stopped or lost its lease",
            swept=True,
        )
    metrics.jobs_finished.labels(status).inc()
    if job.canceled:
        log_event("job.canceled", job_id=str(job.job_id), attempt=job.attempt, swept=True)
    else:
        log_event("job.failed", job_id=str(job.job_id), error_class=error_class, swept=True)
    if notifier is not None:
        notifier.publish(job.job_id, {"type": "job", "status": status, "attempt": job.attempt})
    return True


class Sweeper(Background):
    name = "recovery-sweep"

    def __init__(
        self,
        db: Database,
        dispatcher: Dispatcher,
        provider: Provider,
        *,
        interval: float,
        stale_seconds: float,
        lease_seconds: float,
        notifier: Notifier | None = None,
        batch: int = 500,
        end_batch: int = 50,
        providers: Mapping[str, Provider] | None = None,
        prices: Mapping[str, Price | None] = pricing.DEFAULT_PRICES,
    ) -> None:
        self.db = db
        self.prices = prices
        self.dispatcher = dispatcher
        self.provider = provider
        self.providers = providers
        """Every configured provider's adapter: a prediction is canceled where it runs (`provider`: the default)."""
        self.interval = interval
        self.stale_seconds = stale_seconds
        self.lease_seconds = lease_seconds
        self.notifier = notifier
        self.batch = batch
        self.end_batch = end_batch
        """Jobs ended per pass with a call to the provider each (a pass waits for those calls)."""

    async def sweep_once(self) -> dict[str, int]:
        """One pass; returns how many jobs it expired, ended and re-sent."""
        expired = await jobs.fail_overdue(self.db, batch=self.batch)
        for overdue in expired:
            metrics.jobs_finished.labels("failed").inc()
            log_event("job.failed", job_id=str(overdue.job_id), error_class="JobDeadlineExceeded", swept=True)
            if self.notifier is not None:
                self.notifier.publish(overdue.job_id, {"type": "job", "status": "failed"})
        # Best effort: the job has ended either way (and Cancel-After bounds the prediction).
        await asyncio.gather(
            *(
                cancel_prediction(
                    _of(self.providers, o.provider, self.provider),
                    o.job_id,
                    o.prediction_id,
                    within=self.lease_seconds / 2,
                )
                for o in expired
                if o.prediction_id is not None
            )
        )
        ended = await end_unheld(
            self.db,
            self.provider,
            lease_seconds=self.lease_seconds,
            batch=self.end_batch,
            notifier=self.notifier,
            providers=self.providers,
            prices=self.prices,
        )
        stale = await jobs.take_stale(self.db, stale_seconds=self.stale_seconds, batch=self.batch)
        waiting = [s.job_id for s in stale if s.status != "running"]
        orphans = [s.job_id for s in stale if s.status == "running"]
        if waiting:
            present = await self.dispatcher.pending(waiting)
            lost = [job_id for job_id, live in zip(waiting, present, strict=True) if not live]
        else:
            lost = []
        resend = lost + orphans
        if resend:
            await self.dispatcher.send(resend)
            for job_id in lost:
                log_event("job.redispatched", job_id=str(job_id), reason="message_lost")
            for job_id in orphans:
                log_event("job.redispatched", job_id=str(job_id), reason="lease_expired")
        return {"expired": len(expired), "ended": ended, "lost": len(lost), "orphaned": len(orphans)}

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log_event("worker.sweep.failed", logging.WARNING, exc_info=True)
            await asyncio.sleep(self.interval)
