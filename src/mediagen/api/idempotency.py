"""Retry-safe submits (`Idempotency-Key`): the same key and body get the job the first request made,
the same key with another body a 409.

The key is unique per owner in the `jobs` table, so of two requests racing with one key exactly one
inserts; the other finds the job here and compares the hash of its body with the one recorded.
"""

from __future__ import annotations

import hashlib
import uuid

import orjson

from mediagen.api.schemas import GenerateRequest
from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.core.errors import JobConflict


def request_hash(body: GenerateRequest) -> str:
    data = body.model_dump()
    for key in ("webhook_url", "webhook_events"):  # absent: hashed as before these fields existed
        if data[key] is None:
            del data[key]
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def earlier_job(db: Database, job: jobs.NewJob) -> tuple[uuid.UUID, str]:
    """(id, status) of the job an earlier request made with `job`'s key and the same body; JobConflict
    when the body differs."""
    async with db.connect() as conn:
        earlier = await jobs.find_by_idempotency_key(conn, job.owner, job.idempotency_key or "")
    if earlier is None:  # the key's job was deleted in between: extremely unlikely, but honest
        raise JobConflict("this Idempotency-Key is being used by another request; try again")
    earlier_id, earlier_hash, earlier_status = earlier
    if earlier_hash != job.request_hash:
        raise JobConflict("this Idempotency-Key was already used with a different request body")
    return earlier_id, earlier_status
