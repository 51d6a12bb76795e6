"""A job's status as clients see it: the hot read (`GET /status/{id}` polls it), and what of it a client
may see (its error once it ended, its progress while it runs). The API's answers, its server-sent
events and the webhook bodies sent to clients all show a status by these rules."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from mediagen.core.db import Database


@dataclass(frozen=True)
class JobStatusView:
    id: uuid.UUID
    status: str
    attempts: int
    error_class: str | None
    error_message: str | None
    output_keys: list[str]
    progress: float | None = None
    waiting_for: str | None = None
    queue_position: int | None = None


def shown_progress(status: str, progress: float | None) -> float | None:
    """Progress as clients see it: the running attempt's, 1 once succeeded, else none."""
    return 1.0 if status == "succeeded" else (progress if status == "running" else None)


def shown_error(status: str, error: str | None) -> str | None:
    """The error as clients see it: only once the job failed or was canceled (a retrying job's last
    error is in its attempts)."""
    return error if status in ("failed", "canceled") else None


def shown_waiting_for(status: str, waiting_for: str | None) -> str | None:
    """What a job waits for besides its prediction (`provider`: an outage), as clients see it: only while
    it runs (the next claim clears it; a job that left `running` waits for nothing)."""
    return waiting_for if status == "running" else None


def shown_queue_position(status: str, queue_position: int | None) -> int | None:
    """How many creates go before the job's in the fair queue of the provider's budget: only while it
    runs and waits there (known only then; a queued job has not asked for a slot yet)."""
    return queue_position if status == "running" else None


STATUS_SQL = """
    SELECT j.id, j.status, j.attempts, j.error_class, j.error_message, j.progress, j.waiting_for,
           j.queue_position,
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
        row["waiting_for"],
        row["queue_position"],
    )
