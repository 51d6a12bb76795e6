"""An attempt in progress and how it ends: record its prediction, progress and what it waits for, succeed,
fail, hand back, cancel.

The worker's side of the attempt protocol (with `claim`). Every verb is one statement and its own
transaction, guarded by the claim token: it takes the `Database` and the worker never opens a transaction
around it. SQL style: raw asyncpg (`$1`) through `Database`'s statement pool, prepared once per
connection: these run for every attempt, and the pool measured half the CPU of SQLAlchemy's Core
(mediagen.core.db, docs/benchmarks.md). Writing two tables at once is a CTE, not two round trips.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from mediagen.core.db import Database
from mediagen.core.jobs.claim import Claim
from mediagen.core.routing import Route

_RECORD_SQL = """
    UPDATE attempts SET prediction_id = $3, prediction_status = $4
    WHERE id = $1 AND EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND claim_token = $5 AND status = 'running')
"""


async def record_prediction(db: Database, claim: Claim, prediction_id: str, status: str) -> bool:
    """Store the prediction id the moment we have it, before any waiting (no double billing).

    False: the job is no longer ours. Its new holder did not know of this prediction when it
    claimed the job (unless it found it through reconciliation, see `prediction_owner`).
    """
    result = await db.execute(_RECORD_SQL, claim.attempt_id, claim.job_id, prediction_id, status, claim.token)
    return result.endswith(" 1")


_GONE_SQL = """
    UPDATE attempts SET gone_prediction_id = prediction_id, prediction_id = NULL, prediction_status = NULL,
           resumed = false, create_sent_at = now()
    WHERE id = $1 AND prediction_id = $3
      AND EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND claim_token = $4 AND status = 'running')
"""


async def forget_gone_prediction(db: Database, claim: Claim, prediction_id: str) -> bool:
    """The prediction this attempt was to resume is gone (Replicate answered 404): keep its id as
    `gone_prediction_id` and clear the way for a new one, created next (a 404 proves there is nothing
    to be billed twice). The attempt is then a create like any other: sent now, outcome unknown until
    recorded. False: the job is no longer ours.
    """
    result = await db.execute(_GONE_SQL, claim.attempt_id, claim.job_id, prediction_id, claim.token)
    return result.endswith(" 1")


_EXPLAIN_SQL = """
    UPDATE attempts SET error_class = $2, error_message = $3
    WHERE id = $1 AND outcome = 'abandoned' AND error_class = 'WorkerLost'
"""


async def explain_abandoned(db: Database, claim: Claim, error_class: str, message: str) -> bool:
    """Say on an attempt that another worker closed as `WorkerLost` what really happened to it
    (its worker, still alive, knows); False when it is not closed that way."""
    result = await db.execute(_EXPLAIN_SQL, claim.attempt_id, error_class, message)
    return result.endswith(" 1")


@dataclass(frozen=True)
class StoredOutput:
    index: int
    storage_key: str
    content_type: str
    size_bytes: int
    sha256: str
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Spend:
    """What a prediction that ended reported (its `metrics`) and what it cost (None: unknown)."""

    predict_time: float | None = None
    image_count: int | None = None
    cost_usd: Decimal | None = None


NO_SPEND = Spend()


_SUCCEED_SQL = """
    WITH done AS (
        UPDATE jobs SET status = 'succeeded', finished_at = now(), updated_at = now(), lease_until = NULL,
               error_class = NULL, error_message = NULL
        WHERE id = $1 AND claim_token = $2 AND status = 'running'
        RETURNING id
    ), closed AS (
        UPDATE attempts SET finished_at = now(), outcome = 'succeeded', prediction_status = $4,
               predict_time = $12, image_count = $13, cost_usd = $14
        WHERE id = $3 AND EXISTS (SELECT 1 FROM done)
    ), stored AS (
        INSERT INTO outputs (job_id, index, storage_key, content_type, size_bytes, sha256, width, height)
        SELECT $1, o.index, o.storage_key, o.content_type, o.size_bytes, o.sha256, o.width, o.height
        FROM unnest($5::int[], $6::text[], $7::text[], $8::bigint[], $9::text[], $10::int[], $11::int[])
             AS o(index, storage_key, content_type, size_bytes, sha256, width, height)
        WHERE EXISTS (SELECT 1 FROM done)
    )
    SELECT count(*) AS held FROM done
"""


async def succeed(
    db: Database, claim: Claim, outputs: Sequence[StoredOutput], prediction_status: str, spend: Spend = NO_SPEND
) -> bool:
    """Close the attempt and the job as succeeded, with its outputs, in one statement.
    False: the job is no longer ours (another worker took it over), and nothing was written."""
    held = await db.fetchval(
        _SUCCEED_SQL,
        claim.job_id,
        claim.token,
        claim.attempt_id,
        prediction_status,
        [o.index for o in outputs],
        [o.storage_key for o in outputs],
        [o.content_type for o in outputs],
        [o.size_bytes for o in outputs],
        [o.sha256 for o in outputs],
        [o.width for o in outputs],
        [o.height for o in outputs],
        spend.predict_time,
        spend.image_count,
        spend.cost_usd,
    )
    return bool(held)


@dataclass(frozen=True)
class Failure:
    error_class: str
    message: str
    http_status: int | None = None
    prediction_status: str | None = None
    create_rejected: bool = False
    """The create was answered with an error: no prediction exists, nothing to reconcile later."""


_FAIL_SQL = """
    WITH done AS (
        UPDATE jobs SET
            status = CASE WHEN $3::float8 IS NULL THEN 'failed' ELSE 'retrying' END,
            next_attempt_at = CASE WHEN $3::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $3) END,
            dispatched_at = CASE WHEN $3::float8 IS NULL THEN dispatched_at ELSE now() END,
            finished_at = CASE WHEN $3::float8 IS NULL THEN now() END,
            lease_until = NULL, updated_at = now(), error_class = $5, error_message = $6
        WHERE id = $1 AND claim_token = $2 AND status = 'running'
        RETURNING id
    ), closed AS (
        UPDATE attempts SET finished_at = now(), outcome = 'failed', error_class = $5, error_message = $6,
               http_status = $7, retry_delay_seconds = $3,
               prediction_status = coalesce($8, prediction_status),
               create_sent_at = CASE WHEN $9 THEN NULL ELSE create_sent_at END,
               predict_time = $10, image_count = $11, cost_usd = $12
        WHERE id = $4 AND EXISTS (SELECT 1 FROM done)
    )
    SELECT count(*) AS held FROM done
"""


async def fail_attempt(
    db: Database, claim: Claim, failure: Failure, *, retry_delay: float | None, spend: Spend = NO_SPEND
) -> bool:
    """Close the attempt as failed; the job goes `retrying` after `retry_delay` s, or `failed` if None."""
    held = await db.fetchval(
        _FAIL_SQL,
        claim.job_id,
        claim.token,
        None if retry_delay is None else float(retry_delay),
        claim.attempt_id,
        failure.error_class,
        failure.message,
        failure.http_status,
        failure.prediction_status,
        failure.create_rejected,
        spend.predict_time,
        spend.image_count,
        spend.cost_usd,
    )
    return bool(held)


_FAIL_OVER_SQL = """
    WITH moved AS (
        UPDATE jobs SET status = 'retrying', provider = $4, input = $5::jsonb, next_attempt_at = now(),
               dispatched_at = now(), lease_until = NULL, waiting_for = NULL, updated_at = now(),
               error_class = $6, error_message = $7
        WHERE id = $1 AND claim_token = $2 AND status = 'running'
        RETURNING id
    ), closed AS (
        UPDATE attempts SET finished_at = now(), outcome = 'failed', error_class = $6, error_message = $7,
               http_status = $8, retry_delay_seconds = 0, create_sent_at = NULL
        WHERE id = $3 AND EXISTS (SELECT 1 FROM moved)
    )
    SELECT count(*) AS held FROM moved
"""


async def fail_over(db: Database, claim: Claim, to: Route, failure: Failure) -> bool:
    """Move the job to the route `to`: this attempt (which made no prediction: its create was never sent,
    or refused) ends failed with `failure`, the job's provider and input become the route's, and it is due
    at once; the next claim opens an attempt there that says where it came from (`failover_from`).
    False: the job is no longer ours, and nothing was written."""
    held = await db.fetchval(
        _FAIL_OVER_SQL,
        claim.job_id,
        claim.token,
        claim.attempt_id,
        to.provider,
        to.input,
        failure.error_class,
        failure.message,
        failure.http_status,
    )
    return bool(held)


_RELEASE_SQL = """
    WITH released AS (
        UPDATE jobs SET status = 'retrying', next_attempt_at = now(), dispatched_at = now(), lease_until = NULL,
               updated_at = now()
        WHERE id = $1 AND claim_token = $2 AND status = 'running'
        RETURNING id
    ), closed AS (
        UPDATE attempts SET finished_at = now(), outcome = 'abandoned', error_class = 'WorkerShutdown',
               error_message = $4
        WHERE id = $3 AND EXISTS (SELECT 1 FROM released)
    )
    SELECT count(*) AS held FROM released
"""


async def release(db: Database, claim: Claim, reason: str) -> bool:
    """Hand a running job back (worker shutting down): the next attempt resumes its prediction.
    False: the job is no longer ours, and nothing was written."""
    held = await db.fetchval(_RELEASE_SQL, claim.job_id, claim.token, claim.attempt_id, reason)
    return bool(held)


_CANCELED_SQL = """
    WITH done AS (
        UPDATE jobs SET status = 'canceled', finished_at = now(), updated_at = now(), lease_until = NULL,
               error_class = 'JobCanceled', error_message = 'canceled on request'
        WHERE id = $1 AND claim_token = $2 AND status = 'running'
        RETURNING id
    ), closed AS (
        UPDATE attempts SET finished_at = now(), outcome = 'canceled', error_class = 'JobCanceled',
               error_message = 'canceled on request', prediction_status = coalesce($4, prediction_status),
               predict_time = coalesce($5, predict_time), image_count = coalesce($6, image_count),
               cost_usd = coalesce($7, cost_usd)
        WHERE id = $3 AND EXISTS (SELECT 1 FROM done)
    )
    SELECT count(*) AS held FROM done
"""


async def finish_canceled(db: Database, claim: Claim, prediction_status: str | None, spend: Spend = NO_SPEND) -> bool:
    """End the job `canceled` on its client's request, and its attempt with it (`prediction_status`:
    what became of the prediction, when it was canceled; `spend`: what it ran for, once it ended).
    False: the job is no longer ours."""
    held = await db.fetchval(
        _CANCELED_SQL,
        claim.job_id,
        claim.token,
        claim.attempt_id,
        prediction_status,
        spend.predict_time,
        spend.image_count,
        spend.cost_usd,
    )
    return bool(held)


_PROGRESS_SQL = """
    UPDATE jobs SET progress = $3 WHERE id = $1 AND claim_token = $2 AND status = 'running'
      AND progress IS DISTINCT FROM $3
"""


async def record_progress(db: Database, claim: Claim, progress: float) -> None:
    """Store how far the running attempt's prediction is (0 to 1); nothing once the job is not ours."""
    await db.execute(_PROGRESS_SQL, claim.job_id, claim.token, progress)


_WAITING_SQL = """
    UPDATE jobs SET waiting_for = $3
    WHERE id = $1 AND claim_token = $2 AND status = 'running' AND waiting_for IS DISTINCT FROM $3
"""


async def record_waiting(db: Database, claim: Claim, waiting_for: str | None) -> None:
    """What the running attempt waits for besides its prediction (`provider`: an outage), or None once
    it waits no more: shown in the job's status. Changes nothing once the job is no longer ours."""
    await db.execute(_WAITING_SQL, claim.job_id, claim.token, waiting_for)


_PLACE_SQL = """
    UPDATE jobs SET queue_position = $3
    WHERE id = $1 AND claim_token = $2 AND status = 'running' AND queue_position IS DISTINCT FROM $3
"""


async def record_queue_position(db: Database, claim: Claim, place: int | None) -> None:
    """How many creates go before the attempt's in the fair queue of the provider's budget, or None once
    it waits there no more: shown in the job's status. Changes nothing once the job is no longer ours."""
    await db.execute(_PLACE_SQL, claim.job_id, claim.token, place)


async def prediction_owners(db: Database, prediction_id: str) -> list[tuple[uuid.UUID, int]]:
    """(job id, attempt id) of every attempt that recorded this prediction."""
    rows = await db.fetch("SELECT job_id, id FROM attempts WHERE prediction_id = $1", prediction_id)
    return [(row["job_id"], row["id"]) for row in rows]
