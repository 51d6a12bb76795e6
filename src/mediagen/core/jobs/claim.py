"""Claiming a job for an attempt: the one statement that takes the lease and opens the attempt, and
how long until a job the claim found not yet due will be.

SQL style: raw asyncpg (`$1`) through `Database`'s statement pool, as in `attempts`: the claim runs
for every message a worker receives, and it is one statement in its own transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mediagen.core.db import Database
from mediagen.core.routing import REPLICATE, Route


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
    owner: str = ""
    """The job's API key (its owner id; "" for the anonymous caller)."""
    provider: str = REPLICATE
    """Who runs this attempt: the job's route now (its first, or the one it failed over to)."""
    routes: tuple[Route, ...] = ()
    """Every provider that may run the job, in order of preference (empty for a job from before routes:
    Replicate only)."""
    failover_from: str | None = None
    """The provider the job left for this one, when this attempt is its first there."""

    @property
    def route(self) -> Route:
        """The model's name and the exact input at this attempt's provider."""
        for route in self.routes:
            if route.provider == self.provider:
                return route
        return Route(self.provider, self.model, self.input or {})

    @property
    def pinned(self) -> bool:
        """The client chose the provider (`parameters.provider`): the job never leaves it."""
        return self.parameters.get("provider") is not None

    def next_route(self) -> Route | None:
        """Where the job may go when its provider cannot take it: the next route after this one (a job
        never goes back to a provider it left, so a failover costs one attempt at most per route)."""
        names = [route.provider for route in self.routes]
        if self.pinned or self.provider not in names:
            return None
        later = self.routes[names.index(self.provider) + 1 :]
        return later[0] if later else None


_CLAIM_SQL = """
    WITH claimed AS (
        UPDATE jobs SET status = 'running', attempts = attempts + 1, claim_token = $2,
               lease_until = now() + make_interval(secs => $3), started_at = coalesce(started_at, now()),
               next_attempt_at = NULL, waiting_for = NULL, queue_position = NULL,
               updated_at = now()
        WHERE id = $1 AND NOT cancel_requested AND (
              status = 'queued'
           OR (status = 'retrying' AND next_attempt_at <= now() + interval '250 milliseconds')
           OR (status = 'running' AND lease_until < now()))
        RETURNING id, attempts, prompt, parameters, input, model, max_attempts, deadline_at, retried_at, provider,
                  routes, owner
    ), last AS (
        SELECT a.id, a.number, a.prediction_id, a.prediction_status, a.create_sent_at, a.finished_at,
               a.started_at, a.provider
        FROM attempts a JOIN claimed c ON a.job_id = c.id
        ORDER BY a.number DESC LIMIT 1
    ), unrecorded AS (
        -- Creates whose prediction, if any, was never recorded: each may have started one (none from
        -- before an operator's retry, which asked for a fresh prediction).
        SELECT min(a.create_sent_at) AS since
        FROM attempts a JOIN claimed c ON a.job_id = c.id
        WHERE a.prediction_id IS NULL AND a.create_sent_at IS NOT NULL AND a.provider = c.provider
          AND (c.retried_at IS NULL OR a.create_sent_at > c.retried_at)
    ), decided AS (
        SELECT CASE WHEN l.prediction_id IS NOT NULL
                         AND coalesce(l.prediction_status, '') NOT IN ('failed', 'canceled', 'aborted')
                         AND (claimed.retried_at IS NULL OR l.started_at > claimed.retried_at)
                         AND l.provider = claimed.provider
                    THEN l.prediction_id END AS resume,
               CASE WHEN l.prediction_id IS NULL THEN (SELECT since FROM unrecorded) END AS reconcile_since,
               CASE WHEN l.id IS NOT NULL AND l.finished_at IS NULL THEN l.id END AS abandon_id,
               l.number AS last_number,
               CASE WHEN l.provider <> claimed.provider THEN l.provider END AS failover_from
        FROM claimed LEFT JOIN last l ON true
    ), abandoned AS (
        UPDATE attempts SET finished_at = now(), outcome = 'abandoned', error_class = 'WorkerLost',
               error_message = 'the worker running this attempt stopped or lost its lease'
        WHERE id = (SELECT abandon_id FROM decided)
        RETURNING number
    ), opened AS (
        INSERT INTO attempts (job_id, number, prediction_id, resumed, create_sent_at, provider, failover_from)
        SELECT c.id, c.attempts, d.resume, d.resume IS NOT NULL,
               CASE WHEN d.resume IS NULL THEN now() END, c.provider, d.failover_from
        FROM claimed c, decided d
        RETURNING id
    )
    SELECT c.attempts, c.prompt, c.parameters, c.input, c.model, c.max_attempts, c.deadline_at,
           o.id AS attempt_id, d.resume, d.reconcile_since, (SELECT number FROM abandoned) AS abandoned,
           c.provider, c.routes, d.failover_from, c.owner
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
        provider=row["provider"],
        routes=tuple(Route.from_json(item) for item in row["routes"] or ()),
        failover_from=row["failover_from"],
        owner=row["owner"],
    )


_DUE_SQL = """
    SELECT extract(epoch FROM next_attempt_at - now()) FROM jobs
    WHERE id = $1 AND status = 'retrying' AND NOT cancel_requested
"""


async def due_in(db: Database, job_id: uuid.UUID) -> float | None:
    """Seconds until a `retrying` job is due (None unless it is retrying and not yet due): what a worker
    asks when its claim found nothing, as a delayed message may arrive early."""
    due = await db.fetchval(_DUE_SQL, job_id)
    return float(due) if due is not None and due > 0 else None
