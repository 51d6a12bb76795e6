"""Reading jobs: one job in detail, a page of jobs, their outputs, when a retry is due, who recorded a
prediction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core import webhooks
from mediagen.core.models import Attempt, Job, Output


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


async def prediction_owners(conn: AsyncConnection, prediction_id: str) -> list[tuple[uuid.UUID, int]]:
    """(job id, attempt id) of every attempt that recorded this prediction."""
    rows = await conn.execute(select(Attempt.job_id, Attempt.id).where(Attempt.prediction_id == prediction_id))
    return [(row.job_id, row.id) for row in rows]
