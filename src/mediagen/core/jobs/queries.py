"""Reading jobs for people: one job in detail, a page of jobs, their outputs, the statuses of a few.

Used by the API and the operator's CLI, inside a connection the caller opened (one connection for a
page and its outputs). SQL style: SQLAlchemy Core expressions, because these queries are composed
from optional filters (status, owner, cursor, age) that string-built SQL would splice by hand, and
they return whole rows of the tables mapped in mediagen.core.models. None is on a hot path that the
statement pool would pay for; the one that is, the status clients poll, lives in `status`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core import deliveries
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
    hooks = await deliveries.for_job(conn, job_id)
    return JobDetail(job, list(attempts), list(outputs), hooks)


async def list_jobs(
    conn: AsyncConnection,
    *,
    status: str | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
    owner: str | None = None,
    since: timedelta | None = None,
) -> list[Row[Any]]:
    """Newest first, keyset-paginated on (created_at, id); `since`: created within that long ago."""
    query = select(Job.__table__).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if before is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(*before))
    if since is not None:
        query = query.where(Job.created_at >= func.now() - since)
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


async def statuses(conn: AsyncConnection, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The status of each of these jobs that exists."""
    if not job_ids:
        return {}
    rows = await conn.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids)))
    return {row.id: row.status for row in rows}


async def unfinished_in_lane(conn: AsyncConnection, owner: str, lane: str) -> int:
    """How many of the key's jobs that asked for `lane` (`parameters.lane`) are queued, running or retrying
    (read through the small index of active jobs)."""
    query = (
        select(func.count())
        .select_from(Job)
        .where(
            Job.status.in_(("queued", "running", "retrying")),
            Job.owner == owner,
            Job.parameters["lane"].astext == lane,
        )
    )
    return int((await conn.execute(query)).scalar_one())


FINAL_PREDICTION = ("succeeded", "failed", "canceled", "aborted")
"""A prediction's statuses after which it runs (and bills) no more."""


async def left_running(conn: AsyncConnection, job_id: uuid.UUID) -> tuple[str, str] | None:
    """The prediction a failed or canceled job's last attempt started and that may still run at the
    provider (its last status known to us is not final), if any, and who runs it: what `mediagen retry`
    cancels first."""
    query = (
        select(Attempt.prediction_id, Attempt.provider)
        .join(Job, and_(Attempt.job_id == Job.id, Attempt.number == Job.attempts))
        .where(
            Job.id == job_id,
            Job.status.in_(("failed", "canceled")),
            Attempt.prediction_id.is_not(None),
            func.coalesce(Attempt.prediction_status, "").not_in(FINAL_PREDICTION),
        )
    )
    row = (await conn.execute(query)).first()
    return (str(row.prediction_id), str(row.provider)) if row is not None else None
