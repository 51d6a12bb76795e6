"""Retention: finished jobs older than MEDIAGEN_RETENTION_DAYS are deleted, with all that hangs off them.

A job goes with its attempts, outputs, webhook and webhook deliveries (ON DELETE CASCADE) and its media
files (through `delete_media`: core knows no storage). Its spend stays behind in `daily_usage`
(mediagen.core.usage.roll_up), in the transaction that deletes it, so `/usage` reads the same after.

The work goes in small batches, each its own short transaction: it takes `batch` finished jobs with
`FOR UPDATE SKIP LOCKED` (two prunes at once, the sweeps of several workers say, take different jobs),
deletes their media, rolls their spend up and deletes them. The row locks are on jobs nobody uses; the
tables only get the ROW EXCLUSIVE locks any write takes, so requests never wait on a prune. Media go
first: a prune that fails after them leaves jobs that the next prune deletes (a missing file is no
error), never files that no job names.

A job is taken when created *and* finished before the cutoff: `created_at` lets the batch come off
ix_jobs_status_created_at_id without reading the jobs it will not take.

SQL style: `text()` through SQLAlchemy's engine: one batch statement per few hundred jobs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text

from mediagen.core.db import Database
from mediagen.core.usage import roll_up

_TAKE_SQL = text(
    """
    SELECT j.id, array_remove(array_agg(o.storage_key), NULL) AS keys
    FROM (SELECT id FROM jobs
          WHERE status IN ('succeeded', 'failed', 'canceled')
            AND created_at < now() - make_interval(secs => :seconds)
            AND finished_at < now() - make_interval(secs => :seconds)
          LIMIT :batch FOR UPDATE SKIP LOCKED) j
    LEFT JOIN outputs o ON o.job_id = j.id
    GROUP BY j.id
    """
)

_DELETE_SQL = text("DELETE FROM jobs WHERE id = ANY(:ids)")

DeleteMedia = Callable[[Sequence[str]], Awaitable[None]]


@dataclass
class Pruned:
    jobs: int = 0
    media_files: int = 0
    batches: int = 0


async def prune_batch(db: Database, *, older_than: timedelta, delete_media: DeleteMedia, batch: int) -> Pruned:
    """Delete up to `batch` finished jobs older than `older_than`: what was deleted (jobs 0: none left)."""
    async with db.transaction() as conn:
        rows = (await conn.execute(_TAKE_SQL, {"seconds": older_than.total_seconds(), "batch": batch})).all()
        if not rows:
            return Pruned()
        ids: list[uuid.UUID] = [row.id for row in rows]
        keys: list[str] = [key for row in rows for key in row.keys]
        await delete_media(keys)
        await roll_up(conn, ids)
        await conn.execute(_DELETE_SQL, {"ids": ids})
    return Pruned(jobs=len(ids), media_files=len(keys), batches=1)


async def prune(
    db: Database,
    *,
    older_than: timedelta,
    delete_media: DeleteMedia,
    batch: int = 500,
    pause_seconds: float = 0.0,
) -> Pruned:
    """Batches of `prune_batch` until none is left (`pause_seconds` between them); the totals."""
    total = Pruned()
    while True:
        done = await prune_batch(db, older_than=older_than, delete_media=delete_media, batch=batch)
        total.jobs += done.jobs
        total.media_files += done.media_files
        total.batches += done.batches
        if done.jobs < batch:
            return total
        await asyncio.sleep(pause_seconds)
