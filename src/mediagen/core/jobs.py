"""The domain verbs on jobs, shared by the API and the worker.

Every state change is one conditional UPDATE, so a duplicate or late message changes nothing and two
workers can never both hold a job:

    queued ──claim──▶ running ──ok──▶ succeeded
       ▲                 │  └──permanent error, attempts exhausted, deadline──▶ failed
       └──due── retrying ◀┘ transient error
    queued | retrying | running ──cancel──▶ canceled

`running` carries a lease (`lease_until`, renewed in bulk by each worker, see mediagen.worker.leases) and a
`claim_token`; a worker's writes count only while its token is the job's. Functions take a connection
inside a transaction and never commit (see mediagen.core.db).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Row, and_, func, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core import webhooks
from mediagen.core.db import Database
from mediagen.core.errors import JobConflict, JobNotFound
from mediagen.core.models import Attempt, AttemptOutcome, Job, JobStatus, Output

# --- submit and read ----------------------------------------------------------------------------


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
    """The exact model input to send to Replicate (None: built from `parameters` by the worker)."""


_CREATE_SQL = text(
    """
    INSERT INTO jobs (id, status, prompt, parameters, input, model, owner, idempotency_key, request_hash,
                      max_attempts, deadline_at, dispatched_at)
    SELECT n.id, 'queued', n.prompt, CAST(n.parameters AS jsonb), CAST(n.input AS jsonb), n.model, n.owner,
           n.idempotency_key, n.request_hash, n.max_attempts, now() + make_interval(secs => n.deadline), now()
    FROM unnest(CAST(:ids AS uuid[]), CAST(:prompts AS text[]), CAST(:parameters AS text[]),
                CAST(:inputs AS text[]), CAST(:models AS text[]), CAST(:owners AS text[]), CAST(:keys AS text[]),
                CAST(:hashes AS text[]), CAST(:max_attempts AS int[]), CAST(:deadlines AS float8[]))
         AS n(id, prompt, parameters, input, model, owner, idempotency_key, request_hash, max_attempts, deadline)
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
        },
    )
    return {row.id for row in result}


async def find_by_idempotency_key(
    conn: AsyncConnection, owner: str, key: str
) -> tuple[uuid.UUID, str | None, str] | None:
    """(job id, request hash, status) of the job submitted earlier with this key."""
    row = (
        await conn.execute(
            select(Job.id, Job.request_hash, Job.status).where(Job.owner == owner, Job.idempotency_key == key)
        )
    ).first()
    return (row.id, row.request_hash, row.status) if row is not None else None


_CANCEL_SQL = text(
    """
    UPDATE jobs SET cancel_requested = true, updated_at = now(),
           status = CASE WHEN status = 'running' THEN status ELSE 'canceled' END,
           finished_at = CASE WHEN status = 'running' THEN finished_at ELSE now() END,
           error_class = CASE WHEN status = 'running' THEN error_class ELSE 'JobCanceled' END,
           error_message = CASE WHEN status = 'running' THEN error_message ELSE 'canceled on request' END
    WHERE id = :id AND status IN ('queued', 'retrying', 'running')
      AND (CAST(:owner AS text) IS NULL OR owner = :owner)
    RETURNING status
    """
)


async def request_cancel(conn: AsyncConnection, job_id: uuid.UUID, owner: str | None = None) -> str:
    """Cancel a job: waiting ones end `canceled` now; a running one is asked to stop (its worker
    cancels the prediction at Replicate). Returns the job's status after the request."""
    row = (await conn.execute(_CANCEL_SQL, {"id": job_id, "owner": owner})).first()
    if row is not None:
        return str(row.status)
    query = select(Job.status).where(Job.id == job_id)
    if owner is not None:
        query = query.where(Job.owner == owner)
    status = (await conn.execute(query)).scalar()
    if status is None:
        raise JobNotFound(f"no job {job_id}")
    raise JobConflict(f"job {job_id} is already {status}")


@dataclass(frozen=True)
class JobStatusView:
    id: uuid.UUID
    status: str
    attempts: int
    error_class: str | None
    error_message: str | None
    output_keys: list[str]
    progress: float | None = None


def shown_progress(status: str, progress: float | None) -> float | None:
    """Progress as clients see it: the running attempt's, 1 once succeeded, else none."""
    return 1.0 if status == "succeeded" else (progress if status == "running" else None)


def status_object(
    job_id: uuid.UUID, status: str, attempts: int, error: str | None, progress: float | None, urls: list[str]
) -> dict[str, Any]:
    """The job's status object, as `GET /status/{id}` answers it."""
    return {
        "job_id": str(job_id),
        "status": status,
        "attempts": attempts,
        "error": error if status in ("failed", "canceled") else None,
        "result_urls": urls,
        "progress": shown_progress(status, progress),
    }


STATUS_SQL = """
    SELECT j.id, j.status, j.attempts, j.error_class, j.error_message, j.progress,
           CASE WHEN j.status = 'succeeded' THEN
             ARRAY(SELECT o.storage_key FROM outputs o WHERE o.job_id = j.id ORDER BY o.index)
           END AS output_keys
    FROM jobs j WHERE j.id = $1 AND ($2::text IS NULL OR j.owner = $2::text)
"""


async def get_status(db: Database, job_id: uuid.UUID, owner: str | None = None) -> JobStatusView | None:
    """The status of one job, through the raw driver: the route clients poll (see Database)."""
    row = await db.fetchrow(STATUS_SQL, job_id, owner)
    if row is None:
        return None
    return JobStatusView(
        row["id"],
        row["status"],
        row["attempts"],
        row["error_class"],
        row["error_message"],
        row["output_keys"] or [],
        row["progress"],
    )


@dataclass
class JobDetail:
    job: Row[Any]
    attempts: list[Row[Any]] = field(default_factory=list)
    outputs: list[Row[Any]] = field(default_factory=list)
    webhook_deliveries: list[dict[str, Any]] = field(default_factory=list)


async def get_detail(conn: AsyncConnection, job_id: uuid.UUID, owner: str | None = None) -> JobDetail | None:
    query = select(Job.__table__).where(Job.id == job_id)
    if owner is not None:
        query = query.where(Job.owner == owner)
    job = (await conn.execute(query)).first()
    if job is None:
        return None
    attempts = (
        await conn.execute(select(Attempt.__table__).where(Attempt.job_id == job_id).order_by(Attempt.number))
    ).all()
    outputs = (await conn.execute(select(Output.__table__).where(Output.job_id == job_id).order_by(Output.index))).all()
    deliveries = await webhooks.for_job(conn, job_id)
    return JobDetail(job, list(attempts), list(outputs), deliveries)


async def list_jobs(
    conn: AsyncConnection,
    *,
    status: str | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
    owner: str | None = None,
) -> list[Row[Any]]:
    """Newest first, keyset-paginated on (created_at, id)."""
    query = select(Job.__table__).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if before is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(*before))
    return list((await conn.execute(query)).all())


async def output_keys(conn: AsyncConnection, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    """The storage keys of each job's outputs, in order (one query for a page of jobs)."""
    if not job_ids:
        return {}
    rows = await conn.execute(
        select(Output.job_id, Output.storage_key)
        .where(Output.job_id.in_(job_ids))
        .order_by(Output.job_id, Output.index)
    )
    found: dict[uuid.UUID, list[str]] = {}
    for row in rows:
        found.setdefault(row.job_id, []).append(row.storage_key)
    return found


# --- the worker's side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A job this worker now holds, for attempt number `attempt`."""

    job_id: uuid.UUID
    token: uuid.UUID
    attempt: int
    attempt_id: int
    prompt: str
    parameters: dict[str, Any]
    model: str
    max_attempts: int
    deadline_at: datetime
    input: dict[str, Any] | None
    """The exact model input decided at submit (None for jobs submitted before it was recorded)."""
    resume_prediction_id: str | None
    """A prediction an earlier attempt started and that has not failed: wait on it, do not create."""
    reconcile_since: datetime | None
    """An earlier create's outcome is unknown: look for its prediction before creating again."""
    abandoned_attempt: int | None
    """The number of an earlier attempt whose worker vanished, closed by this claim."""


_CLAIM_SQL = """
    WITH claimed AS (
        UPDATE jobs SET status = 'running', attempts = attempts + 1, claim_token = $2,
               lease_until = now() + make_interval(secs => $3), started_at = coalesce(started_at, now()),
               next_attempt_at = NULL, updated_at = now()
        WHERE id = $1 AND NOT cancel_requested AND (
              status = 'queued'
           OR (status = 'retrying' AND next_attempt_at <= now() + interval '250 milliseconds')
           OR (status = 'running' AND lease_until < now()))
        RETURNING id, attempts, prompt, parameters, input, model, max_attempts, deadline_at, retried_at
    ), last AS (
        SELECT a.id, a.number, a.prediction_id, a.prediction_status, a.create_sent_at, a.finished_at,
               a.started_at
        FROM attempts a JOIN claimed c ON a.job_id = c.id
        ORDER BY a.number DESC LIMIT 1
    ), unrecorded AS (
        -- Creates whose prediction, if any, was never recorded: each may have started one (none from
        -- before an operator's retry, which asked for a fresh prediction).
        SELECT min(a.create_sent_at) AS since
        FROM attempts a JOIN claimed c ON a.job_id = c.id
        WHERE a.prediction_id IS NULL AND a.create_sent_at IS NOT NULL
          AND (c.retried_at IS NULL OR a.create_sent_at > c.retried_at)
    ), decided AS (
        SELECT CASE WHEN l.prediction_id IS NOT NULL
                         AND coalesce(l.prediction_status, '') NOT IN ('failed', 'canceled', 'aborted')
                         AND (claimed.retried_at IS NULL OR l.started_at > claimed.retried_at)
                    THEN l.prediction_id END AS resume,
               CASE WHEN l.prediction_id IS NULL THEN (SELECT since FROM unrecorded) END AS reconcile_since,
               CASE WHEN l.id IS NOT NULL AND l.finished_at IS NULL THEN l.id END AS abandon_id,
               l.number AS last_number
        FROM claimed LEFT JOIN last l ON true
    ), abandoned AS (
        UPDATE attempts SET finished_at = now(), outcome = 'abandoned', error_class = 'WorkerLost',
               error_message = 'the worker running this attempt stopped or lost its lease'
        WHERE id = (SELECT abandon_id FROM decided)
        RETURNING number
    ), opened AS (
        INSERT INTO attempts (job_id, number, prediction_id, resumed, create_sent_at)
        SELECT c.id, c.attempts, d.resume, d.resume IS NOT NULL,
               CASE WHEN d.resume IS NULL THEN now() END
        FROM claimed c, decided d
        RETURNING id
    )
    SELECT c.attempts, c.prompt, c.parameters, c.input, c.model, c.max_attempts, c.deadline_at,
           o.id AS attempt_id, d.resume, d.reconcile_since, (SELECT number FROM abandoned) AS abandoned
    FROM claimed c, decided d, opened o
"""


async def claim(db: Database, job_id: uuid.UUID, *, lease_seconds: float) -> Claim | None:
    """Take the job for a new attempt, or None when it is not ours to run (finished, held, not due).

    One statement, so one round trip and its own transaction: claim the row, close an attempt whose
    worker vanished, and open the new attempt, resuming the last prediction unless it failed.
    """
    token = uuid.uuid4()
    row = await db.fetchrow(_CLAIM_SQL, job_id, token, float(lease_seconds))
    if row is None:
        return None
    return Claim(
        job_id=job_id,
        token=token,
        attempt=row["attempts"],
        attempt_id=row["attempt_id"],
        prompt=row["prompt"],
        parameters=row["parameters"],
        model=row["model"],
        max_attempts=row["max_attempts"],
        deadline_at=row["deadline_at"],
        input=row["input"],
        resume_prediction_id=row["resume"],
        reconcile_since=row["reconcile_since"],
        abandoned_attempt=row["abandoned"],
    )


_RETRY_SQL = text(
    """
    UPDATE jobs SET status = 'queued', max_attempts = attempts + :budget, error_class = NULL,
           error_message = NULL, finished_at = NULL, cancel_requested = false, claim_token = NULL,
           lease_until = NULL, next_attempt_at = NULL, dispatched_at = now(), updated_at = now(),
           retried_at = now(), deadline_at = now() + make_interval(secs => :deadline)
    WHERE id = :id AND status IN ('failed', 'canceled')
    RETURNING attempts
    """
)


async def retry_finished(
    conn: AsyncConnection, job_id: uuid.UUID, *, budget: int, deadline_seconds: float
) -> int | None:
    """An operator runs a failed or canceled job again: `budget` more attempts, a new deadline, and a
    fresh prediction (the job's earlier predictions are neither resumed nor adopted, whatever became
    of them). Returns the number of attempts made so far, or None when the job is not failed or canceled.
    """
    row = (await conn.execute(_RETRY_SQL, {"id": job_id, "budget": budget, "deadline": deadline_seconds})).first()
    return int(row.attempts) if row is not None else None


async def due_in(conn: AsyncConnection, job_id: uuid.UUID) -> float | None:
    """Seconds until a `retrying` job is due (None unless it is retrying and not yet due)."""
    row = (
        await conn.execute(
            text(
                "SELECT extract(epoch FROM next_attempt_at - now()) AS due FROM jobs "
                "WHERE id = :id AND status = 'retrying' AND NOT cancel_requested"
            ),
            {"id": job_id},
        )
    ).first()
    return float(row.due) if row is not None and row.due is not None and row.due > 0 else None


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


def _held(claim: Claim) -> Any:
    return and_(Job.id == claim.job_id, Job.claim_token == claim.token, Job.status == JobStatus.RUNNING.value)


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


async def release(conn: AsyncConnection, claim: Claim, reason: str) -> bool:
    """Hand a running job back (worker shutting down): the next attempt resumes its prediction."""
    done = await conn.execute(
        update(Job)
        .where(_held(claim))
        .values(
            status=JobStatus.RETRYING.value,
            next_attempt_at=func.now(),
            dispatched_at=func.now(),
            lease_until=None,
            updated_at=func.now(),
        )
    )
    if done.rowcount != 1:
        return False
    await _close_attempt(conn, claim, AttemptOutcome.ABANDONED, error_class="WorkerShutdown", error_message=reason)
    return True


async def finish_canceled(conn: AsyncConnection, claim: Claim, prediction_status: str | None) -> bool:
    done = await conn.execute(
        update(Job)
        .where(and_(Job.id == claim.job_id, Job.claim_token == claim.token, Job.status == "running"))
        .values(
            status=JobStatus.CANCELED.value,
            finished_at=func.now(),
            updated_at=func.now(),
            lease_until=None,
            error_class="JobCanceled",
            error_message="canceled on request",
        )
    )
    if done.rowcount != 1:
        return False
    await _close_attempt(
        conn,
        claim,
        AttemptOutcome.CANCELED,
        error_class="JobCanceled",
        error_message="canceled on request",
        prediction_status=prediction_status,
    )
    return True


async def _close_attempt(conn: AsyncConnection, claim: Claim, outcome: AttemptOutcome, **values: Any) -> None:
    values = {key: value for key, value in values.items() if value is not None}
    await conn.execute(
        update(Attempt)
        .where(Attempt.id == claim.attempt_id)
        .values(finished_at=func.now(), outcome=outcome.value, **values)
    )


async def prediction_owners(conn: AsyncConnection, prediction_id: str) -> list[tuple[uuid.UUID, int]]:
    """(job id, attempt id) of every attempt that recorded this prediction."""
    rows = await conn.execute(select(Attempt.job_id, Attempt.id).where(Attempt.prediction_id == prediction_id))
    return [(row.job_id, row.id) for row in rows]


__all__ = [
    "Claim",
    "Failure",
    "JobDetail",
    "JobStatusView",
    "NewJob",
    "Spend",
    "StoredOutput",
    "claim",
    "create_jobs",
    "due_in",
    "explain_abandoned",
    "fail_attempt",
    "find_by_idempotency_key",
    "finish_canceled",
    "forget_gone_prediction",
    "get_detail",
    "get_status",
    "list_jobs",
    "output_keys",
    "prediction_owners",
    "record_prediction",
    "release",
    "request_cancel",
    "retry_finished",
    "shown_progress",
    "status_object",
    "succeed",
]
