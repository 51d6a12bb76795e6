"""`Prefer: wait=N` on submit: hold the answer until the job ends or N seconds pass (N at most 60).

The request waits on mediagen.notify (Redis pub/sub), subscribed before the job is submitted, so the
worker's announcement of the end reaches whichever API process holds the request. Waiting holds no
thread and no database connection: the row is read once before, once per terminal event, once after.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from mediagen.core import jobs
from mediagen.core.models import TERMINAL

FINISHED = frozenset(status.value for status in TERMINAL)
MAX_WAIT_SECONDS = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)


def prefer_wait(header: str | None) -> int | None:
    """Seconds asked for by `Prefer: wait=N` (at most 60), or None."""
    if not header:
        return None
    match = _PREFER_WAIT.search(header)
    if match is None:
        return None
    return min(int(match[1]), MAX_WAIT_SECONDS) or None


async def wait_for_end(db: Any, job_id: uuid.UUID, events: Any, seconds: float) -> jobs.JobStatusView | None:
    """The job once it has ended, or None after `seconds` (`events`: a subscription taken before submit)."""
    deadline = time.monotonic() + seconds
    view = await jobs.get_status(db, job_id)
    while view is None or view.status not in FINISHED:
        remaining = deadline - time.monotonic()
        event = await events.next(remaining) if remaining > 0 else None
        if event is None:  # time is up (or the end was announced while Redis was away): one last look
            view = await jobs.get_status(db, job_id)
            return view if view is not None and view.status in FINISHED else None
        if event.get("status") in FINISHED:
            view = await jobs.get_status(db, job_id)
    return view
