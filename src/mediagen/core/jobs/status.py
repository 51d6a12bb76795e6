"""A job's status as clients poll it: the hot read and its presentation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

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
