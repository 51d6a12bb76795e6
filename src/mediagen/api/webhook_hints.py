"""A provider's webhook passed on as a hint: each delivery once, to the worker waiting on its job.

Both webhook routes (mediagen.api.routes.replicate_webhooks, mediagen.api.routes.fal_webhooks) verify
and read their provider's body, then hand the hint here: a delivery already seen (Redis `SET NX` with a
TTL) does nothing; otherwise the event is published on the job's channel (mediagen.notify). Nothing here
writes to the database: the worker holding the job reads the prediction itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Final

from mediagen.api.state import ApiState
from mediagen.notify import Event

SEEN_TTL_SECONDS: Final = 3600


async def relay(
    state: ApiState, provider: str, delivery: str, job: uuid.UUID | None, event: Callable[[], Event]
) -> str:
    """Publish `event()` on `job`'s channel unless `provider`'s `delivery` was seen; what came of it:
    "duplicate", "no job", "relayed" or "nobody waits on this job" (no listener: an unknown or
    finished job)."""
    key = f"{state.settings.redis_namespace}:{provider}-webhook-seen:{delivery}"
    if not await state.redis.set(key, 1, nx=True, ex=SEEN_TTL_SECONDS):
        return "duplicate"
    if job is None:
        return "no job"
    listeners = await state.notifier.publish_now(job, event())
    return "relayed" if listeners else "nobody waits on this job"
