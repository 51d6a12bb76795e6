"""The job routes: submit (`POST /generate`), status, the full job, the list, cancel.

Each answers with the model it declares (mediagen.api.presentation builds them); a route whose status
code depends on what happened (submit, cancel) sets it on the response FastAPI hands it.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from mediagen.api import cursors, presentation
from mediagen.api.auth import Owner, visible_to
from mediagen.api.http import InvalidField, JSONBodyRoute, ModelResponse
from mediagen.api.idempotency import earlier_job, request_hash
from mediagen.api.limits import LimitedOwner, RateLimited
from mediagen.api.schemas import (
    ERRORS,
    ErrorResponse,
    GenerateAccepted,
    GenerateRequest,
    JobPage,
    JobStatusResponse,
    JobView,
    WaitedJob,
)
from mediagen.api.state import Api, ApiState
from mediagen.api.waiting import prefer_wait, wait_for_end
from mediagen.core import deliveries, jobs
from mediagen.core.errors import JobNotFound
from mediagen.core.models import JobStatus
from mediagen.logging import log_event

router = APIRouter(route_class=JSONBodyRoute)


@router.post(
    "/generate",
    status_code=202,
    response_model=GenerateAccepted,
    responses={
        **ERRORS,
        200: {
            "model": GenerateAccepted | WaitedJob,
            "description": "The job submitted earlier with this Idempotency-Key; or, with `Prefer: wait=N`, "
            "the job finished within N seconds (its status object, as GET /status answers)",
        },
        400: {"model": ErrorResponse, "description": "Malformed JSON, or a key given twice in one object"},
        409: {"model": ErrorResponse, "description": "This Idempotency-Key was used with another body"},
        413: {"model": ErrorResponse},
        415: {"model": ErrorResponse, "description": "The body is not application/json"},
    },
    summary="Submit a prompt; answers at once with the job id",
    openapi_extra={
        "parameters": [
            {
                "name": "Prefer",
                "in": "header",
                "required": False,
                "description": "`wait=N` (N at most 60): hold the answer until the job ends or N seconds pass; "
                "other preferences are ignored (RFC 7240)",
                "schema": {"type": "string"},
            }
        ]
    },
)
async def generate(
    request: Request,
    body: GenerateRequest,
    state: Api,
    owner: Owner,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            pattern=r"^[!-~]+$",
            description="Retry-safe submits: the same key and body return the same job (printable ASCII)",
        ),
    ] = None,
) -> Response:
    settings = state.settings
    params = body.parameters.model_dump()
    model = params.pop("model") or settings.default_model
    if params.get("provider") is None:
        params.pop("provider", None)
    if model not in settings.allowed_models:
        raise InvalidField(
            "parameters.model",
            "not an allowed model",
            summary=f"parameters.model: {model!r} is not allowed; use one of {settings.allowed_models}",
            kind="model",
        )
    lane = params.pop("lane", None)
    routes = state.router.routes(model, body.prompt, params)
    if lane is not None:
        params["lane"] = lane  # stored with the job's parameters, never sent to the model
        if lane == "interactive":
            await _interactive_allowed(state, owner)
    if body.webhook_url is not None:
        refused = (
            "webhooks are off on this server (MEDIAGEN_WEBHOOK_SECRET is not set)"
            if settings.webhook_secret is None and state.keyring.caller(owner) is None  # a table key signs its own
            else deliveries.url_refusal(body.webhook_url, deliveries.networks(settings.webhook_allowed_networks))
        )
        if refused is not None:
            raise InvalidField("webhook_url", refused, kind="webhook_url")
    job = jobs.NewJob(
        id=uuid.uuid4(),
        prompt=body.prompt,
        parameters=params,
        input=routes[0].input,
        provider=routes[0].provider,
        routes=tuple(routes),
        model=model,
        max_attempts=settings.max_attempts,
        deadline_seconds=settings.job_deadline_seconds,
        owner=owner,
        idempotency_key=idempotency_key,
        request_hash=request_hash(body) if idempotency_key is not None else None,
        webhook_url=body.webhook_url,
        webhook_events=tuple(body.webhook_events or deliveries.DEFAULT_EVENTS),
    )
    if state.limits is not None:
        request.state.ratelimit = await state.limits.admit(owner, job.id)
    wait = prefer_wait(request.headers.get("prefer"))
    if wait is None:
        return await _submit(state, job)
    async with state.notifier.listen(job.id) as events:  # before the job exists: its end cannot be missed
        accepted = await _submit(state, job)
        if accepted.status_code != 202:
            return accepted
        view = await wait_for_end(state.db, job.id, events, wait)
    if view is None:
        return accepted
    return ModelResponse(
        presentation.waited_job(settings, view),
        headers={"Location": presentation.status_url(job.id), "Preference-Applied": f"wait={wait}"},
    )


async def _interactive_allowed(state: ApiState, owner: str) -> None:
    """Raises RateLimited when the key has `MEDIAGEN_MAX_INTERACTIVE_JOBS` interactive jobs unfinished.
    Read from PostgreSQL, so submits racing each other may pass it by the few in flight."""
    limit = state.settings.max_interactive_jobs
    if not limit:
        return
    async with state.db.connect() as conn:
        unfinished = await jobs.unfinished_in_lane(conn, owner, "interactive")
    if unfinished >= limit:
        message = f"{limit} interactive jobs are unfinished already; wait for one to end, or submit as batch"
        raise RateLimited("interactive_jobs", message, {"Retry-After": "1"})


async def _submit(state: ApiState, job: jobs.NewJob) -> Response:
    """Commit and enqueue the job: 202; or 200 with the job an earlier request made with its key."""
    inserted = False
    try:
        inserted = await state.submissions.submit(job)
    finally:
        if state.limits is not None and not inserted:
            await state.limits.forget(job.owner, [job.id])
    if inserted:
        log_event("job.submitted", job_id=str(job.id), model=job.model)
        job_id, status, code = job.id, JobStatus.QUEUED.value, 202
    else:
        (job_id, status), code = await earlier_job(state.db, job), 200
    return ModelResponse(
        presentation.accepted(job_id, status), code, headers={"Location": presentation.status_url(job_id)}
    )


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobStatusResponse,
    status_code=202,
    responses={
        **ERRORS,
        200: {"model": JobStatusResponse, "description": "The job was waiting: it is canceled"},
        409: {"model": ErrorResponse, "description": "The job has ended already"},
    },
    summary="Cancel a job: a waiting one at once, a running one by canceling its prediction",
)
async def cancel(job_id: uuid.UUID, state: Api, owner: LimitedOwner, response: Response) -> JobStatusResponse:
    async with state.db.transaction() as conn:
        new_status = await jobs.request_cancel(conn, job_id, visible_to(owner))
    log_event("job.cancel_requested", job_id=str(job_id), status=new_status)
    if new_status == "canceled":
        state.notifier.publish(job_id, {"type": "job", "status": "canceled"})
        response.status_code = 200
    view = await jobs.get_status(state.db, job_id)
    assert view is not None
    return presentation.job_status(state.settings, view)


@router.get(
    "/status/{job_id}",
    response_model=JobStatusResponse,
    responses=ERRORS,
    summary="Where a job is: status, attempts, error, result URLs",
)
async def status(job_id: uuid.UUID, state: Api, owner: LimitedOwner) -> JobStatusResponse:
    view = await jobs.get_status(state.db, job_id, visible_to(owner))
    if view is None:
        raise JobNotFound(f"no job {job_id}")
    return presentation.job_status(state.settings, view)


@router.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS, summary="The full job")
async def job_detail(job_id: uuid.UUID, state: Api, owner: LimitedOwner) -> JobView:
    async with state.db.connect() as conn:
        detail = await jobs.get_detail(conn, job_id, visible_to(owner))
    if detail is None:
        raise JobNotFound(f"no job {job_id}")
    return presentation.job_view(state.settings, detail)


@router.get("/jobs", response_model=JobPage, responses=ERRORS, summary="Jobs, newest first")
async def list_jobs(
    state: Api,
    owner: LimitedOwner,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> JobPage:
    before = None
    if cursor is not None:
        before = cursors.decode(cursor)
        if before is None:
            raise InvalidField("cursor", "invalid", summary="cursor: not a cursor from this API")
    async with state.db.connect() as conn:
        rows = await jobs.list_jobs(
            conn,
            status=status.value if status else None,
            limit=limit + 1,
            before=before,
            owner=visible_to(owner),
        )
        page, more = rows[:limit], len(rows) > limit
        outputs = await jobs.output_keys(conn, [r.id for r in page if r.status == "succeeded"])
    next_cursor = cursors.encode(page[-1].created_at, page[-1].id) if more else None
    return presentation.job_page(state.settings, page, outputs, next_cursor)
