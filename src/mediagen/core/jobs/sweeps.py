"""What the recovery sweep changes in the jobs table: jobs past their deadline, and jobs to send again.

Each verb takes a small batch with `FOR UPDATE SKIP LOCKED`, so sweeps in many worker processes at once
never take the same job, and is its own transaction: it takes the `Database`. The broker side of the
sweep (is a message still there? send it again) is mediagen.worker.recovery's.

SQL style: `text()` with named parameters through SQLAlchemy's engine: a batch statement every sweep
interval per process, not per job, so the statement pool's saving does not matter here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text

from mediagen.core.db import Database

_EXPIRE_SQL = text(
    """
    UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(),
           error_class = 'JobDeadlineExceeded',
           error_message = 'the job did not finish before its deadline'
    WHERE id IN (SELECT id FROM jobs
                 WHERE status IN ('queued', 'retrying') AND deadline_at < now()
                 LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)


async def fail_overdue(db: Database, *, batch: int) -> list[uuid.UUID]:
    """End `failed` (`JobDeadlineExceeded`) the waiting jobs (queued, retrying) whose deadline has
    passed, up to `batch` of them: the ids so ended."""
    async with db.transaction() as conn:
        return [row.id for row in await conn.execute(_EXPIRE_SQL, {"batch": batch})]


_STALE_SQL = text(
    """
    UPDATE jobs SET dispatched_at = now()
    WHERE id IN (
        SELECT id FROM jobs
        WHERE status IN ('queued', 'retrying', 'running')
          AND dispatched_at < now() - make_interval(secs => :stale)
          AND (status = 'queued'
               OR (status = 'retrying' AND next_attempt_at < now() - make_interval(secs => :stale))
               OR (status = 'running' AND lease_until < now()))
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
    closes its attempt as abandoned)."""
    async with db.transaction() as conn:
        rows = await conn.execute(_STALE_SQL, {"stale": stale_seconds, "batch": batch})
        return [Stale(row.id, row.status) for row in rows]
