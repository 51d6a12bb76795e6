"""Submitting jobs and the requests made about them afterwards: create (with idempotency), cancel, an
operator's retry.

The API's and the CLI's writes. Each verb takes the caller's `AsyncConnection`, inside its unit of work:
the API's group commit writes a batch of jobs and their webhook subscriptions in one transaction
(mediagen.api.submissions). SQL style: `text()` with named parameters, because these statements are
PostgreSQL's own (a batch through `unnest`, `ON CONFLICT` for idempotency, a status-dependent cancel
in one `UPDATE`) and read best as the SQL they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core.errors import JobConflict, JobNotFound
from mediagen.core.routing import REPLICATE, Route


@dataclass(frozen=True)
class NewJob:
    id: uuid.UUID
    prompt: str
    parameters: dict[str, Any]
    model: str
    max_attempts: int
    deadline_seconds: float
    owner: str = ""
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()
    input: dict[str, Any] | None = None
    """The exact model input to send to the first route's provider (None: built from `parameters` by the worker)."""
    provider: str = REPLICATE
    """The first route's provider: where the job runs unless it fails over."""
    routes: tuple[Route, ...] = ()
    """Every provider that may run the job, in order, with its exact input (mediagen.core.routing)."""


_CREATE_SQL = text(
    """
    INSERT INTO jobs (id, status, prompt, parameters, input, model, owner, idempotency_key, request_hash,
                      max_attempts, deadline_at, dispatched_at, provider, routes)
    SELECT n.id, 'queued', n.prompt, CAST(n.parameters AS jsonb), CAST(n.input AS jsonb), n.model, n.owner,
           n.idempotency_key, n.request_hash, n.max_attempts, now() + make_interval(secs => n.deadline), now(),
           n.provider, CAST(n.routes AS jsonb)
    FROM unnest(CAST(:ids AS uuid[]), CAST(:prompts AS text[]), CAST(:parameters AS text[]),
                CAST(:inputs AS text[]), CAST(:models AS text[]), CAST(:owners AS text[]), CAST(:keys AS text[]),
                CAST(:hashes AS text[]), CAST(:max_attempts AS int[]), CAST(:deadlines AS float8[]),
                CAST(:providers AS text[]), CAST(:routes AS text[]))
         AS n(id, prompt, parameters, input, model, owner, idempotency_key, request_hash, max_attempts, deadline,
              provider, routes)
    ON CONFLICT (owner, idempotency_key) DO NOTHING
    RETURNING id
    """
)


async def create_jobs(conn: AsyncConnection, jobs: Sequence[NewJob]) -> set[uuid.UUID]:
    """Insert new `queued` jobs (one statement for any number), marked as dispatched now.

    Returns the ids inserted: a job whose (owner, idempotency key) exists already is not.
    """
    result = await conn.execute(
        _CREATE_SQL,
        {
            "ids": [job.id for job in jobs],
            "prompts": [job.prompt for job in jobs],
            "parameters": [orjson.dumps(job.parameters).decode() for job in jobs],
            "inputs": [None if job.input is None else orjson.dumps(job.input).decode() for job in jobs],
            "models": [job.model for job in jobs],
            "owners": [job.owner for job in jobs],
            "keys": [job.idempotency_key for job in jobs],
            "hashes": [job.request_hash for job in jobs],
            "max_attempts": [job.max_attempts for job in jobs],
            "deadlines": [float(job.deadline_seconds) for job in jobs],
            "providers": [job.provider for job in jobs],
            "routes": [
                orjson.dumps([route.as_json() for route in job.routes]).decode() if job.routes else None for job in jobs
            ],
        },
    )
    return {row.id for row in result}


_KEY_SQL = text("SELECT id, request_hash, status FROM jobs WHERE owner = :owner AND idempotency_key = :key")


async def find_by_idempotency_key(
    conn: AsyncConnection, owner: str, key: str
) -> tuple[uuid.UUID, str | None, str] | None:
    """(job id, request hash, status) of the job submitted earlier with this key."""
    row = (await conn.execute(_KEY_SQL, {"owner": owner, "key": key})).first()
    return (row.id, row.request_hash, row.status) if row is not None else None


# A running job, or a retrying one whose last attempt left a prediction that may still run, is not ended
# here: a worker must cancel that prediction at the provider first (mediagen.core.jobs.sweeps).
_STAYS = """
    (status = 'running' OR (status = 'retrying' AND (SELECT yes FROM live)))
"""

_CANCEL_SQL = text(
    f"""
    WITH live AS (
        SELECT EXISTS (
            SELECT 1 FROM jobs j JOIN attempts a ON a.job_id = j.id AND a.number = j.attempts
            WHERE j.id = :id AND a.prediction_id IS NOT NULL
              AND coalesce(a.prediction_status, '') NOT IN ('succeeded', 'failed', 'canceled', 'aborted')
        ) AS yes
    )
    UPDATE jobs SET cancel_requested = true, updated_at = now(),
           status = CASE WHEN {_STAYS} THEN status ELSE 'canceled' END,
           finished_at = CASE WHEN {_STAYS} THEN finished_at ELSE now() END,
           error_class = CASE WHEN {_STAYS} THEN error_class ELSE 'JobCanceled' END,
           error_message = CASE WHEN {_STAYS} THEN error_message ELSE 'canceled on request' END
    WHERE id = :id AND status IN ('queued', 'retrying', 'running')
      AND (CAST(:owner AS text) IS NULL OR owner = :owner)
    RETURNING status
    """
)


_STATUS_SQL = text("SELECT status FROM jobs WHERE id = :id AND (CAST(:owner AS text) IS NULL OR owner = :owner)")


async def request_cancel(conn: AsyncConnection, job_id: uuid.UUID, owner: str | None = None) -> str:
    """Cancel a job: a waiting one ends `canceled` now; a running one is asked to stop (its worker, or
    the sweep if its worker is gone, cancels the prediction at the provider and ends it). So is a
    retrying one whose last attempt left a prediction that may still run: the API never calls the
    provider itself, and a worker's sweep cancels that prediction and ends the job. Returns the job's
    status after the request (`canceled` when it ended now)."""
    row = (await conn.execute(_CANCEL_SQL, {"id": job_id, "owner": owner})).first()
    if row is not None:
        return str(row.status)
    status = (await conn.execute(_STATUS_SQL, {"id": job_id, "owner": owner})).scalar()
    if status is None:
        raise JobNotFound(f"no job {job_id}")
    raise JobConflict(f"job {job_id} is already {status}")


_RETRY_SQL = text(
    """
    WITH retried AS (
        UPDATE jobs SET status = 'queued', max_attempts = attempts + :budget, error_class = NULL,
               error_message = NULL, finished_at = NULL, cancel_requested = false, claim_token = NULL,
               lease_until = NULL, next_attempt_at = NULL, dispatched_at = now(), updated_at = now(),
               retried_at = now(), deadline_at = now() + make_interval(secs => :deadline)
        WHERE id = :id AND status IN ('failed', 'canceled')
        RETURNING attempts
    ), noted AS (
        UPDATE attempts SET prediction_status = 'canceled'
        WHERE job_id = :id AND prediction_id = CAST(:canceled AS text) AND EXISTS (SELECT 1 FROM retried)
    )
    SELECT attempts FROM retried
    """
)


async def retry_finished(
    conn: AsyncConnection,
    job_id: uuid.UUID,
    *,
    budget: int,
    deadline_seconds: float,
    canceled_prediction: str | None = None,
) -> int | None:
    """An operator runs a failed or canceled job again: `budget` more attempts, a new deadline, and a
    fresh prediction (the job's earlier predictions are neither resumed nor adopted, whatever became
    of them; the caller cancels first one that may still run, see `left_running`, and names it as
    `canceled_prediction` to have it recorded so). Returns the number of attempts made so far, or None
    when the job is not failed or canceled.
    """
    params = {"id": job_id, "budget": budget, "deadline": deadline_seconds, "canceled": canceled_prediction}
    row = (await conn.execute(_RETRY_SQL, params)).first()
    return int(row.attempts) if row is not None else None
