"""A job's events as server-sent events (`GET /jobs/{id}/events`).

The stream waits on mediagen.notify (Redis pub/sub): whichever API process holds the stream or the request
hears the worker's announcement, then re-reads the job row, which stays the truth. Waiting holds no
thread and no database connection: one coroutine, woken by an event or a timeout.

Event ids are the job's state (`<attempts>.<status>.<progress %>`), so a client that reconnects with
`Last-Event-ID` gets only what changed since, and a lost connection costs nothing but its socket.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from mediagen.api import presentation
from mediagen.api.auth import visible_to
from mediagen.api.limits import LimitedOwner
from mediagen.api.schemas import ERRORS, JobStatusResponse
from mediagen.api.state import Api, ApiState
from mediagen.api.waiting import FINISHED
from mediagen.core import jobs
from mediagen.core.errors import JobNotFound

router = APIRouter()

RECHECK_SECONDS = 30.0
"""A stream re-reads the row this often even without an event (an event may be lost)."""


EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["status", "progress"]},
        "id": {"type": "string", "description": "`<attempts>.<status>.<progress %>`: send it back as Last-Event-ID"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/JobStatusResponse"},
        },
    },
}
"""One event of the stream (OpenAPI 3.2's `itemSchema`, as FastAPI writes it for its own streams)."""


def event_id(job: JobStatusResponse) -> str:
    progress = job.progress
    return f"{job.attempts}.{job.status}.{'-' if progress is None else round(progress * 100)}"


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {"itemSchema": EVENT_SCHEMA}},
            "description": "`status` and `progress` events (data: the job's status object) until the job ends",
        },
    },
    summary="A job's status changes and progress as server-sent events, until it ends",
)
async def job_events(
    job_id: uuid.UUID,
    state: Api,
    owner: LimitedOwner,
    last_event_id: Annotated[
        str | None, Header(max_length=100, description="Resume: only what changed since this event")
    ] = None,
) -> Response:
    view = await jobs.get_status(state.db, job_id, visible_to(owner))
    if view is None:
        raise JobNotFound(f"no job {job_id}")
    return EventSourceResponse(
        _stream(state, job_id, visible_to(owner), last_event_id),
        ping=state.settings.sse_heartbeat_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(
    state: ApiState, job_id: uuid.UUID, owner: str | None, last: str | None
) -> AsyncIterator[ServerSentEvent]:
    last_status = last.split(".")[1] if last and last.count(".") == 2 else None
    async with state.notifier.listen(job_id) as events:
        while True:
            # Read after subscribing: a change from now on is either in this read or in an event.
            view = await jobs.get_status(state.db, job_id, owner)
            if view is None:  # deleted meanwhile
                return
            job = presentation.job_status(state.settings, view)
            current = event_id(job)
            if current != last:
                kind = "progress" if job.status == last_status == "running" else "status"
                yield ServerSentEvent(job.model_dump_json(), event=kind, id=current)
                last, last_status = current, job.status
            if job.status in FINISHED:
                return
            await events.next(RECHECK_SECONDS)
