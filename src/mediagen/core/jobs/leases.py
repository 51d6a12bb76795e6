"""Holding running jobs: each worker process renews the leases of all it holds at once, and watches for
cancel requests.

One statement per worker process per renewal, not per job. A job missing from a renewal's answer is
no longer held by the token given (its lease expired and another worker claimed it, or it ended).

Each verb takes the `Database` and is its own transaction. SQL style: `text()` with named parameters
through SQLAlchemy's engine, not the statement pool: these run once a second per process, not per job,
so their CPU does not matter, and the lease keeper reads an outage from the errors of that engine
(mediagen.core.db.is_unreachable, mediagen.worker.leases).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text

from mediagen.core.db import Database

_RENEW_SQL = text(
    """
    UPDATE jobs AS j SET lease_until = now() + make_interval(secs => :lease)
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS held(id, token)
    WHERE j.id = held.id AND j.claim_token = held.token AND j.status = 'running'
    RETURNING j.id, j.cancel_requested
    """
)


async def renew_leases(
    db: Database, held: Sequence[tuple[uuid.UUID, uuid.UUID]], *, lease_seconds: float
) -> dict[uuid.UUID, bool]:
    """Extend by `lease_seconds` the lease of each (job id, claim token) still held: for each of those,
    whether its cancel was requested. A job left out is no longer held with that token."""
    if not held:
        return {}
    async with db.transaction() as conn:
        rows = await conn.execute(
            _RENEW_SQL,
            {"lease": lease_seconds, "ids": [job_id for job_id, _ in held], "tokens": [token for _, token in held]},
        )
        return {row.id: row.cancel_requested for row in rows}


_CANCELED_SQL = text("SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND cancel_requested")


async def cancel_requested(db: Database, job_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """Those of these jobs whose cancel was requested (a cheap read, done every second)."""
    if not job_ids:
        return []
    async with db.connect() as conn:
        return [row.id for row in await conn.execute(_CANCELED_SQL, {"ids": list(job_ids)})]
