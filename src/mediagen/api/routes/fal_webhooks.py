"""`POST /webhooks/fal`: fal says a request finished; we wake whoever waits on it.

As Replicate's (mediagen.api.routes.replicate_webhooks), the webhook is a hint, never the truth:
nothing here writes to the database, and the worker holding the job GETs the request's status and
result itself. So the route:

1. verifies fal's ED25519 signature on the raw body against fal's JWKS (mediagen.providers.fal_webhooks):
   anything else is a 401; a body over `MAX_BODY_BYTES` is a 413 before it is read (its own limit,
   above the API's: a result carries every image's URL and fal's extras);
2. keeps each delivery once: the signed request id and the body's hash, Redis `SET NX` with a TTL (fal
   signs each retry of a delivery anew, with the same body): a duplicate, retried or replayed delivery
   is a 200 that does nothing;
3. publishes `{"type": "prediction", "prediction_id": <fal's request id>, "status": "succeeded" | "failed"}`
   on the channel of the job the URL names (`?job=...`, set when the request was submitted).

The answer comes within `ANSWER_WITHIN` seconds whatever Redis does: a lost hint costs the waiting
worker one safety-net look, not a job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Annotated, Final

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from mediagen.api.http import error
from mediagen.api.schemas import ErrorResponse, WebhookIgnored, WebhookRelayed
from mediagen.api.state import Api
from mediagen.api.webhook_hints import relay
from mediagen.logging import log_event
from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable

router = APIRouter()
PATH: Final = "/webhooks/fal"
MAX_BODY_BYTES: Final = 1024 * 1024
ANSWER_WITHIN: Final = 0.3
STATUSES: Final = {"OK": "succeeded", "ERROR": "failed"}
"""fal's webhook `status` as the worker's prediction status (fal sends one webhook, when the request ends)."""


@router.post(
    PATH,
    summary="fal reports a finished request (signed; deduplicated; a hint to the worker waiting on it)",
    response_model=WebhookRelayed | WebhookIgnored,
    responses={
        401: {"model": ErrorResponse, "description": "Not signed by fal, or signed too long ago"},
        413: {"model": ErrorResponse, "description": "A body over 1 MiB"},
        422: {"model": ErrorResponse, "description": "`job` is not a job id"},
        503: {"model": ErrorResponse, "description": "fal's keys (JWKS) cannot be fetched now; see Retry-After"},
    },
)
async def fal_webhook(
    request: Request,
    state: Api,
    job: Annotated[uuid.UUID | None, Query(description="The job the request was submitted for")] = None,
) -> WebhookRelayed | WebhookIgnored | Response:
    body = await request.body()
    try:
        request_id = await state.fal_webhook_verifier.verify(request.headers, body)
    except WebhookRejected as refused:
        log_event("webhook.rejected", logging.WARNING, provider="fal", reason=refused.message)
        return error(401, "unauthorized", "the webhook's signature does not verify")
    except WebhookSecretUnavailable as unavailable:
        log_event("webhook.secret_unavailable", logging.WARNING, provider="fal", error=unavailable.message)
        return error(503, "service_unavailable", "cannot verify webhooks yet", {"Retry-After": "5"})
    try:
        status = STATUSES[orjson.loads(body)["status"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return WebhookIgnored(ignored="not a fal result")
    seen = f"{request_id}:{hashlib.sha256(body).hexdigest()[:32]}"
    try:
        event = {"type": "prediction", "prediction_id": request_id, "status": status, "progress": None}
        outcome = await asyncio.wait_for(relay(state, "fal", seen, job, lambda: event), ANSWER_WITHIN)
    except Exception as failure:  # incl. the timeout: the worker's safety-net look will see it
        log_event(
            "webhook.relay_failed", logging.WARNING, provider="fal", prediction_id=request_id, error=repr(failure)
        )
        outcome = "not relayed"
    log_event(
        "webhook.received", provider="fal", prediction_id=request_id, status=status, job_id=str(job), outcome=outcome
    )
    return WebhookRelayed(relayed=True) if outcome == "relayed" else WebhookIgnored(ignored=outcome)
