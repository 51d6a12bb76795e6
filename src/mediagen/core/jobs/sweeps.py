"""What the recovery sweep changes in the jobs table: jobs past their deadline, jobs to send again, and
jobs nobody holds that must end with a call to the provider (canceled, or past their deadline).

Each verb takes a small batch with `FOR UPDATE SKIP LOCKED`, so sweeps in many worker processes at once
never take the same job, and is its own transaction: it takes the `Database`. The broker's and the
provider's side of the sweep (is a message still there? send it again; cancel a prediction) is
mediagen.worker.recovery's: a job that ends with a prediction that may still run is handed back to it
with that prediction, as nothing here calls the provider.

SQL style: `text()` with named parameters through SQLAlchemy's engine: a batch statement every sweep
interval per process, not per job, so the statement pool's saving does not matter here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import text

from mediagen.core.db import Database
from mediagen.core.jobs.attempts import NO_SPEND, Spend

# A prediction its attempt may still be running at the provider (billed until it ends or is canceled).
_LIVE_PREDICTION = """
    CASE WHEN coalesce(a.prediction_status, '') NOT IN ('succeeded', 'failed', 'canceled', 'aborted')
         THEN a.prediction_id END
"""
_LAST_ATTEMPT = """
    LEFT JOIN LATERAL (SELECT id, number, prediction_id, prediction_status, provider FROM attempts
                       WHERE job_id = t.id ORDER BY number DESC LIMIT 1) a ON true
"""

_EXPIRE_SQL = text(
    f"""
    WITH t AS (
        UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(),
               error_class = 'JobDeadlineExceeded',
               error_message = 'the job did not finish before its deadline'
        WHERE id IN (SELECT id FROM jobs
                     WHERE status IN ('queued', 'retrying') AND deadline_at < now() AND NOT cancel_requested
                     LIMIT :batch FOR UPDATE SKIP LOCKED)
        RETURNING id
    )
    SELECT t.id, {_LIVE_PREDICTION} AS prediction_id, a.provider FROM t {_LAST_ATTEMPT}
    """
)


@dataclass(frozen=True)
class Overdue:
    """A waiting job the deadline ended, and the prediction an earlier attempt left running (to cancel)."""

    job_id: uuid.UUID
    prediction_id: str | None
    provider: str | None = field(default=None, compare=False)
    """Who runs that prediction."""
    model: str | None = field(default=None, compare=False)
    """The job's model (as the client named it)."""
    route_model: str | None = field(default=None, compare=False)
    """That prediction's model at its provider (what its spend is priced by)."""


async def fail_overdue(db: Database, *, batch: int) -> list[Overdue]:
    """End `failed` (`JobDeadlineExceeded`) the waiting jobs (queued, retrying) whose deadline has
    passed, up to `batch` of them: those so ended, each with the prediction its last attempt left
    running, if any (a retry waits to resume it), which the caller cancels at the provider."""
    async with db.transaction() as conn:
        rows = await conn.execute(_EXPIRE_SQL, {"batch": batch})
        return [Overdue(row.id, row.prediction_id, row.provider) for row in rows]


_STALE_SQL = text(
    """
    UPDATE jobs SET dispatched_at = now()
    WHERE id IN (
        SELECT id FROM jobs
        WHERE status IN ('queued', 'retrying', 'running')
          AND dispatched_at < now() - make_interval(secs => :stale)
          AND (status = 'queued'
               OR (status = 'retrying' AND next_attempt_at < now() - make_interval(secs => :stale)
                   AND NOT cancel_requested)
               OR (status = 'running' AND lease_until < now() AND NOT cancel_requested AND deadline_at >= now()))
        ORDER BY dispatched_at
        LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id, status
    """
)


@dataclass(frozen=True)
class Stale:
    """A job that should be running and may have no message to run it: its id and status."""

    job_id: uuid.UUID
    status: str


async def take_stale(db: Database, *, stale_seconds: float, batch: int) -> list[Stale]:
    """The jobs due for `stale_seconds` that a message may never deliver, stamped as dispatched now (so
    the next sweep leaves them for `stale_seconds`), oldest dispatch first: `queued` ones, `retrying`
    ones past their time, and `running` ones whose lease expired (their worker died; the next claim
    closes its attempt as abandoned), unless they must end instead (see `take_unheld`)."""
    async with db.transaction() as conn:
        rows = await conn.execute(_STALE_SQL, {"stale": stale_seconds, "batch": batch})
        return [Stale(row.id, row.status) for row in rows]


_TAKE_UNHELD_SQL = text(
    f"""
    WITH t AS (
        UPDATE jobs SET claim_token = :token, lease_until = now() + make_interval(secs => :lease),
               updated_at = now()
        WHERE id IN (SELECT id FROM jobs
                     WHERE (status = 'running' AND lease_until < now()
                            AND (cancel_requested OR deadline_at < now()))
                        OR (status = 'retrying' AND cancel_requested
                            AND (lease_until IS NULL OR lease_until < now()))
                     ORDER BY lease_until LIMIT :batch FOR UPDATE SKIP LOCKED)
        RETURNING id, status, cancel_requested, model, routes
    )
    SELECT t.id, t.status, t.cancel_requested, a.id AS attempt_id, a.number AS attempt,
           {_LIVE_PREDICTION} AS prediction_id, a.provider, t.model,
           -- the model's name at the attempt's provider (its route's), or the job's own (from before routes)
           coalesce((SELECT r->>'model' FROM jsonb_array_elements(coalesce(t.routes, '[]'::jsonb)) r
                     WHERE r->>'provider' = a.provider LIMIT 1), t.model) AS route_model
    FROM t {_LAST_ATTEMPT}
    """
)


@dataclass(frozen=True)
class Unheld:
    """A job nobody holds that must end, now held by the sweep that took it: a running one whose worker
    is gone, or a retrying one canceled with a prediction that may still run."""

    job_id: uuid.UUID
    token: uuid.UUID
    status: str
    """`running`: its last attempt is open, its worker lost; `retrying`: its last attempt has ended."""
    canceled: bool
    """True: its cancel was requested, it ends `canceled`; False: its deadline passed, it ends `failed`."""
    attempt_id: int | None
    attempt: int | None
    prediction_id: str | None
    """The prediction its last attempt started and that may still run: to cancel at the provider."""
    provider: str | None = field(default=None, compare=False)
    """Who runs that prediction."""
    model: str | None = field(default=None, compare=False)
    """The job's model (as the client named it)."""
    route_model: str | None = field(default=None, compare=False)
    """That prediction's model at its provider (what its spend is priced by)."""


async def take_unheld(db: Database, *, lease_seconds: float, batch: int) -> list[Unheld]:
    """Take the jobs nobody holds that must end rather than run again: running ones whose lease expired
    and whose cancel was requested (a claim refuses them) or whose deadline passed, and retrying ones
    whose cancel was requested (see `request_cancel`). Each is held for
    `lease_seconds` with a token of the taker's, as a claim would hold it, so that no claim or other
    sweep takes it while the taker cancels its prediction; should the taker die, it is taken again."""
    token = uuid.uuid4()
    async with db.transaction() as conn:
        rows = await conn.execute(_TAKE_UNHELD_SQL, {"token": token, "lease": lease_seconds, "batch": batch})
        return [
            Unheld(
                row.id,
                token,
                row.status,
                row.cancel_requested,
                row.attempt_id,
                row.attempt,
                row.prediction_id,
                row.provider,
                row.model,
                row.route_model,
            )
            for row in rows
        ]


_END_UNHELD_SQL = text(
    """
    WITH ended AS (
        UPDATE jobs SET finished_at = now(), updated_at = now(), lease_until = NULL,
               status = CASE WHEN :canceled THEN 'canceled' ELSE 'failed' END,
               error_class = CASE WHEN :canceled THEN 'JobCanceled' ELSE 'JobDeadlineExceeded' END,
               error_message = CASE WHEN :canceled THEN 'canceled on request'
                                    ELSE 'the job did not finish before its deadline' END
        WHERE id = :id AND claim_token = :token AND status IN ('running', 'retrying')
        RETURNING id
    ), closed AS (
        -- An open attempt (its worker lost) is closed; one that had ended only learns of its prediction.
        UPDATE attempts SET finished_at = coalesce(finished_at, now()),
               outcome = CASE WHEN finished_at IS NULL THEN 'abandoned' ELSE outcome END,
               error_class = CASE WHEN finished_at IS NULL THEN 'WorkerLost' ELSE error_class END,
               error_message = CASE WHEN finished_at IS NULL
                                    THEN 'the worker running this attempt stopped or lost its lease'
                                    ELSE error_message END,
               prediction_status = coalesce(CAST(:prediction_status AS text), prediction_status),
               predict_time = coalesce(CAST(:predict_time AS double precision), predict_time),
               image_count = coalesce(CAST(:image_count AS integer), image_count),
               cost_usd = coalesce(CAST(:cost_usd AS numeric), cost_usd)
        WHERE id = :attempt_id AND EXISTS (SELECT 1 FROM ended)
    )
    SELECT count(*) AS ended FROM ended
    """
)


async def end_unheld(db: Database, job: Unheld, *, prediction_status: str | None, spend: Spend = NO_SPEND) -> bool:
    """End a job taken by `take_unheld`: `canceled` or `failed` by its deadline, its open attempt closed
    as abandoned by its lost worker (`prediction_status`: what became of its prediction, if known;
    `spend`: what it ran for, once it ended). False: the job was not ours any more (the take outlived
    its lease and another took it)."""
    async with db.transaction() as conn:
        ended = (
            await conn.execute(
                _END_UNHELD_SQL,
                {
                    "id": job.job_id,
                    "token": job.token,
                    "canceled": job.canceled,
                    "attempt_id": job.attempt_id,
                    "prediction_status": prediction_status,
                    "predict_time": spend.predict_time,
                    "image_count": spend.image_count,
                    "cost_usd": spend.cost_usd,
                },
            )
        ).scalar()
        return bool(ended)
