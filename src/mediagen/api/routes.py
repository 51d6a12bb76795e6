"""The HTTP API: thin routes over mediagen.core.jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy import text
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from mediagen.api.auth import Owner, visible_to
from mediagen.api.http import FastJSON, JSONBodyRoute, error, invalid_field
from mediagen.api.limits import LimitedOwner
from mediagen.api.schemas import (
    ErrorResponse,
    GenerateAccepted,
    GenerateRequest,
    JobPage,
    JobStatusResponse,
    JobView,
    ModelList,
)
from mediagen.api.waiting import prefer_wait, wait_for_end
from mediagen.core import jobs, webhooks
from mediagen.core.errors import JobConflict, JobNotFound, ModelSchemaUnknown, StorageError
from mediagen.core.models import JobStatus
from mediagen.core.pricing import price_for
from mediagen.core.usage import job_cost
from mediagen.logging import log_event
from mediagen.storage import CONTENT_TYPES, ByteRange, ObjectStream, is_valid_key
from mediagen.storage.local import LocalStorage

router = APIRouter(route_class=JSONBodyRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    429: {"model": ErrorResponse, "description": "A per-key limit; see Retry-After and RateLimit"},
    503: {"model": ErrorResponse},
}


async def api(request: Request) -> Any:
    return request.app.state.api


Api = Annotated[Any, Depends(api)]


def media_url(state: Any, key: str) -> str:
    return f"{state.settings.public_base_url}/media/{key}"


def _request_hash(body: GenerateRequest) -> str:
    data = body.model_dump()
    for key in ("webhook_url", "webhook_events"):  # absent: hashed as before these fields existed
        if data[key] is None:
            del data[key]
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _webhook_refusal(settings: Any, url: str) -> str | None:
    """Why this webhook URL is refused at once: no signing secret, or an address it may not reach.
    (A host name is resolved and checked when each delivery is sent.)"""
    if settings.webhook_secret is None:
        return "webhooks are off on this server (MEDIAGEN_WEBHOOK_SECRET is not set)"
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return webhooks.refusal(host, webhooks.networks(settings.webhook_allowed_networks))


@router.post(
    "/generate",
    status_code=202,
    response_model=GenerateAccepted,
    responses={
        **ERRORS,
        200: {
            "model": GenerateAccepted,
            "description": "The job submitted earlier with this Idempotency-Key; or, with `Prefer: wait=N`, "
            "the job finished within N seconds (its status object, as GET /status answers)",
        },
        400: {"model": ErrorResponse, "description": "Malformed JSON, or a key given twice in one object"},
        401: {"model": ErrorResponse},
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
                "description": "`wait=N` (N at most 60): hold the answer until the job ends or N seconds pass",
                "schema": {"type": "string", "maxLength": 100},
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
    if model not in settings.allowed_models:
        return invalid_field(
            "parameters.model",
            "not an allowed model",
            summary=f"parameters.model: {model!r} is not allowed; use one of {settings.allowed_models}",
            kind="model",
        )
    schema = state.catalog.get(model)
    if schema is None:
        raise ModelSchemaUnknown(f"the input schema of {model} has not been read from Replicate yet; try again shortly")
    model_input = schema.build_input(body.prompt, params, default_output_format=settings.default_output_format)
    if body.webhook_url is not None:
        refused = _webhook_refusal(settings, body.webhook_url)
        if refused is not None:
            return invalid_field("webhook_url", refused, kind="webhook_url")
    request_hash = _request_hash(body) if idempotency_key is not None else None
    job = jobs.NewJob(
        id=uuid.uuid4(),
        prompt=body.prompt,
        parameters=params,
        input=model_input,
        model=model,
        max_attempts=settings.max_attempts,
        deadline_seconds=settings.job_deadline_seconds,
        owner=owner,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        webhook_url=body.webhook_url,
        webhook_events=tuple(body.webhook_events or webhooks.DEFAULT_EVENTS),
    )
    limits = state.limits
    if limits is not None:
        request.state.ratelimit = await limits.admit(owner, job.id)
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
    return FastJSON(
        {**status_body(state, view), "status_url": f"/status/{job.id}"},
        headers={"Location": f"/status/{job.id}", "Preference-Applied": f"wait={wait}"},
    )


async def _submit(state: Any, job: jobs.NewJob) -> Response:
    """Commit and enqueue the job: 202; or 200 with the job an earlier request made with its key."""
    owner, limits = job.owner, state.limits
    inserted = False
    try:
        inserted = await state.submissions.submit(job)
    finally:
        if limits is not None and not inserted:
            await limits.forget(owner, [job.id])
    if not inserted:
        async with state.db.connect() as conn:
            earlier = await jobs.find_by_idempotency_key(conn, owner, job.idempotency_key or "")
        if earlier is None:  # the key's job was deleted in between: extremely unlikely, but honest
            raise JobConflict("this Idempotency-Key is being used by another request; try again")
        earlier_id, earlier_hash, earlier_status = earlier
        if earlier_hash != job.request_hash:
            raise JobConflict("this Idempotency-Key was already used with a different request body")
        return _accepted(earlier_id, earlier_status, 200)
    log_event("job.submitted", job_id=str(job.id), model=job.model)
    return _accepted(job.id, JobStatus.QUEUED.value, 202)


def _accepted(job_id: uuid.UUID, status: str, code: int) -> Response:
    location = f"/status/{job_id}"
    return FastJSON(
        {"job_id": str(job_id), "status": status, "status_url": location},
        status_code=code,
        headers={"Location": location},
    )


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobStatusResponse,
    status_code=202,
    responses={**ERRORS, 200: {"model": JobStatusResponse}, 409: {"model": ErrorResponse}},
    summary="Cancel a job: a waiting one at once, a running one by canceling its prediction",
)
async def cancel(job_id: uuid.UUID, state: Api, owner: LimitedOwner) -> Response:
    async with state.db.transaction() as conn:
        new_status = await jobs.request_cancel(conn, job_id, visible_to(owner))
    log_event("job.cancel_requested", job_id=str(job_id), status=new_status)
    if new_status == "canceled":
        state.notifier.publish(job_id, {"type": "job", "status": "canceled"})
    view = await jobs.get_status(state.db, job_id)
    assert view is not None
    return FastJSON(status_body(state, view), status_code=200 if new_status == "canceled" else 202)


@router.get(
    "/status/{job_id}",
    response_model=JobStatusResponse,
    responses=ERRORS,
    summary="Where a job is: status, attempts, error, result URLs",
)
async def status(job_id: uuid.UUID, state: Api, owner: LimitedOwner) -> Response:
    view = await jobs.get_status(state.db, job_id, visible_to(owner))
    if view is None:
        raise JobNotFound(f"no job {job_id}")
    return FastJSON(status_body(state, view))


def status_body(state: Any, view: jobs.JobStatusView) -> dict[str, Any]:
    urls = [media_url(state, key) for key in view.output_keys]
    return jobs.status_object(view.id, view.status, view.attempts, view.error_message, view.progress, urls)


@router.get("/jobs/{job_id}", response_model=JobView, responses=ERRORS, summary="The full job")
async def job_detail(job_id: uuid.UUID, state: Api, owner: LimitedOwner) -> Response:
    async with state.db.connect() as conn:
        detail = await jobs.get_detail(conn, job_id, visible_to(owner))
    if detail is None:
        raise JobNotFound(f"no job {job_id}")
    job = detail.job
    return FastJSON(
        {
            "job_id": str(job.id),
            "status": job.status,
            "prompt": job.prompt,
            "parameters": job.parameters,
            "input": job.input,
            "model": job.model,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "error_class": job.error_class,
            "error": job.error_message,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "next_attempt_at": job.next_attempt_at,
            "deadline_at": job.deadline_at,
            "progress": jobs.shown_progress(job.status, job.progress),
            "cost_usd": _usd(job_cost(detail.attempts)),
            "attempt_history": [
                {
                    "number": a.number,
                    "started_at": a.started_at,
                    "finished_at": a.finished_at,
                    "outcome": a.outcome,
                    "error_class": a.error_class,
                    "error_message": a.error_message,
                    "http_status": a.http_status,
                    "prediction_id": a.prediction_id,
                    "resumed": a.resumed,
                    "gone_prediction_id": a.gone_prediction_id,
                    "retry_delay_seconds": a.retry_delay_seconds,
                    "predict_time": a.predict_time,
                    "image_count": a.image_count,
                    "cost_usd": _usd(a.cost_usd),
                }
                for a in detail.attempts
            ],
            "outputs": [
                {
                    "index": o.index,
                    "url": media_url(state, o.storage_key),
                    "content_type": o.content_type,
                    "size_bytes": o.size_bytes,
                    "sha256": o.sha256,
                    "width": o.width,
                    "height": o.height,
                }
                for o in detail.outputs
            ],
            "webhook_deliveries": detail.webhook_deliveries,
        }
    )


def _usd(amount: Decimal | None) -> str | None:
    return None if amount is None else str(amount)


@router.get(
    "/models",
    response_model=ModelList,
    responses=ERRORS,
    summary="The allowed models: each one's input schema, defaults, sizes, output kind and price",
)
async def models(state: Api, _: LimitedOwner) -> Response:
    settings = state.settings
    listed = []
    for name in settings.allowed_models:
        schema = state.catalog.get(name)
        if schema is None:
            continue  # not read from Replicate yet: a submit would get a 503 too
        price = price_for(name, state.prices)
        service_defaults = {}
        if settings.default_output_format in schema.properties.get("output_format", {}).get("enum", []):
            service_defaults["output_format"] = settings.default_output_format
        listed.append(
            {
                "model": name,
                "default": name == settings.default_model,
                "version": schema.version,
                "schema_source": schema.source,
                "input_schema": schema.input_schema,
                "defaults": schema.defaults(),
                "service_defaults": service_defaults,
                "sizes": [size.as_json() for size in schema.sizes],
                "output": {"kind": schema.output_kind, "multiple": schema.output_multiple},
                "price": price.as_json() if price else None,
            }
        )
    return FastJSON({"models": listed})


def _encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


@router.get("/jobs", response_model=JobPage, responses=ERRORS, summary="Jobs, newest first")
async def list_jobs(
    state: Api,
    owner: LimitedOwner,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
) -> Response:
    before = None
    if cursor is not None:
        before = _decode_cursor(cursor)
        if before is None:
            return invalid_field("cursor", "invalid", summary="cursor: not a cursor from this API")
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
    return FastJSON(
        {
            "items": [
                {
                    "job_id": str(r.id),
                    "status": r.status,
                    "prompt": r.prompt,
                    "model": r.model,
                    "attempts": r.attempts,
                    "progress": jobs.shown_progress(r.status, r.progress),
                    "result_urls": [media_url(state, key) for key in outputs.get(r.id, ())],
                    "error": r.error_message,
                    "created_at": r.created_at,
                    "finished_at": r.finished_at,
                }
                for r in page
            ],
            "next_cursor": _encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }
    )


@router.get(
    "/media/{key:path}",
    responses={
        200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}, "video/mp4": {}}},
        206: {"description": "The byte range asked for with a Range header"},
        307: {"description": "With MEDIAGEN_MEDIA_REDIRECT on S3: a presigned URL of the image"},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
    summary="An output's bytes (image or video); a Range header gets that part",
)
async def media(
    key: str,
    state: Api,
    owner: LimitedOwner,
    range_header: Annotated[str | None, Header(alias="range", include_in_schema=False)] = None,
) -> Response:
    if not is_valid_key(key):
        return error(404, "not_found", "no such image")
    job_id = uuid.UUID(key.split("/", 1)[0])
    if visible_to(owner) is not None and await jobs.get_status(state.db, job_id, owner) is None:
        return error(404, "not_found", "no such image")
    storage = state.storage
    if isinstance(storage, LocalStorage):  # sendfile, straight from the disk
        path = storage.path(key)
        if not await asyncio.to_thread(path.is_file):
            return error(404, "not_found", "no such image")
        # Starlette's FileResponse answers Range requests itself (206, 416, multipart).
        return FileResponse(path, media_type=CONTENT_TYPES[key.rsplit(".", 1)[1]], headers=_IMMUTABLE)
    settings = state.settings
    try:
        if settings.media_redirect:
            url = await storage.presigned_url(key, settings.media_presign_seconds)
            # A missing object gets a URL too: checking first keeps the 404 ours, not the store's XML.
            if url is not None and await storage.exists(key):
                return RedirectResponse(url, status_code=307)
        byte_range = _byte_range(range_header)
        stream = await storage.open(key, byte_range)
    except StorageError as exc:
        log_event("media.storage_failed", logging.WARNING, key=key, error=exc.error_class, detail=exc.message)
        return error(
            503, "service_unavailable", "the image store is not reachable; try again shortly", {"Retry-After": "5"}
        )
    if stream is None:
        return error(404, "not_found", "no such image")
    headers = {**_IMMUTABLE, "Accept-Ranges": "bytes", "Content-Length": str(stream.size)}
    if byte_range is None:
        return StreamingResponse(_until_closed(stream), media_type=stream.content_type, headers=headers)
    if stream.first >= stream.total:
        await stream.aclose()
        return Response(status_code=416, headers={"Content-Range": f"bytes */{stream.total}"})
    headers["Content-Range"] = f"bytes {stream.first}-{stream.first + stream.size - 1}/{stream.total}"
    return StreamingResponse(_until_closed(stream), status_code=206, media_type=stream.content_type, headers=headers)


_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
_RANGE = re.compile(r"bytes=(\d{1,15})-(\d{1,15})?")


def _byte_range(header: str | None) -> ByteRange | None:
    """One `bytes=first-[last]` range; anything else (several ranges, a suffix) gets the whole object,
    as RFC 9110 allows a server to do."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    first, last = int(match[1]), int(match[2]) if match[2] else None
    return None if last is not None and last < first else (first, last)


async def _until_closed(stream: ObjectStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()  # a client that went away must not hold the store's connection


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from mediagen.metrics import exposed

    return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database and the broker are reachable")
async def readyz(state: Api) -> Response:
    checks: dict[str, str] = {}

    async def database() -> None:
        async with state.db.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def broker() -> None:
        await state.redis.ping()

    for name, probe in (("database", database), ("broker", broker), ("storage", state.storage.check)):
        try:
            await asyncio.wait_for(probe(), timeout=2.0)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return FastJSON(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )
