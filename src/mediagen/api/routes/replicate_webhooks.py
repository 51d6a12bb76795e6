"""`POST /webhooks/replicate`: Replicate tells us about a prediction; we wake whoever waits on it.

The webhook is a hint, never the truth: nothing here writes to the database. The worker holding the job
wakes (mediagen.notify, whichever API replica took the webhook and whichever worker holds the job) and
GETs the prediction itself. So the route:

A body may be up to `MAX_BODY_BYTES` (1 MiB, not the public routes' limit: a prediction's `logs` can be
long); over that it is a 413 before it is read. Then the route:

1. verifies the signature on the raw body (mediagen.providers.replicate_signatures): anything else is a 401;
2. keeps each `webhook-id` once (Redis `SET NX` with a TTL): a duplicate or retried delivery is a 200
   that does nothing;
3. publishes `{"type": "prediction", "prediction_id", "status", "progress"}` on the channel of the job
   the URL names (`?job=...`, set when the prediction was created). Nobody listens to the channel of
   an unknown or finished job (Redis's PUBLISH says how many did), so such a webhook is a 200 that
   does nothing; no database read, so a busy PostgreSQL cannot slow the answer.

Whatever happens behind steps 2 and 3 (Redis slow or down), the answer comes within
`ANSWER_WITHIN` seconds: a lost hint costs the waiting worker one safety-net poll, not a job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, Query, Request
from replicate.prediction import Prediction as ClientPrediction
from starlette.responses import Response

from mediagen.api.http import error
from mediagen.api.schemas import ErrorResponse, WebhookIgnored, WebhookRelayed
from mediagen.api.state import Api
from mediagen.api.webhook_hints import relay
from mediagen.logging import log_event
from mediagen.notify import Event
from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable

router = APIRouter()
ANSWER_WITHIN = 0.3
PATH: Final = "/webhooks/replicate"
MAX_BODY_BYTES: Final = 1024 * 1024


@router.post(
    PATH,
    summary="Replicate reports on a prediction (signed; deduplicated; a hint to the worker waiting on it)",
    response_model=WebhookRelayed | WebhookIgnored,
    responses={
        401: {"model": ErrorResponse, "description": "Not signed by Replicate, or too old"},
        422: {"model": ErrorResponse, "description": "`job` is not a job id"},
        503: {"model": ErrorResponse, "description": "The signing secret is not known yet; see Retry-After"},
    },
)
async def replicate_webhook(
    request: Request,
    state: Api,
    job: Annotated[uuid.UUID | None, Query(description="The job the prediction was created for")] = None,
) -> WebhookRelayed | WebhookIgnored | Response:
    body = await request.body()
    try:
        await state.webhook_verifier.verify(request.headers, body)
    except WebhookRejected as refused:
        log_event("webhook.rejected", logging.WARNING, reason=refused.message)
        return error(401, "unauthorized", "the webhook's signature does not verify")
    except WebhookSecretUnavailable as unavailable:
        log_event("webhook.secret_unavailable", logging.WARNING, error=unavailable.message)
        return error(503, "service_unavailable", "cannot verify webhooks yet", {"Retry-After": "5"})
    try:
        prediction = orjson.loads(body)
        prediction_id, status = str(prediction["id"]), str(prediction["status"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return WebhookIgnored(ignored="not a prediction")
    try:
        outcome = await asyncio.wait_for(
            relay(
                state,
                "replicate",
                request.headers["webhook-id"],
                job,
                lambda: _event(prediction_id, status, prediction),
            ),
            ANSWER_WITHIN,
        )
    except Exception as failure:  # incl. the timeout: the worker's safety-net poll will see it
        log_event("webhook.relay_failed", logging.WARNING, prediction_id=prediction_id, error=repr(failure))
        outcome = "not relayed"
    log_event("webhook.received", prediction_id=prediction_id, status=status, job_id=str(job), outcome=outcome)
    return WebhookRelayed(relayed=True) if outcome == "relayed" else WebhookIgnored(ignored=outcome)


def _event(prediction_id: str, status: str, prediction: Any) -> Event:
    progress = ClientPrediction.Progress.parse(prediction.get("logs") or "")
    return {
        "type": "prediction",
        "prediction_id": prediction_id,
        "status": status,
        "progress": None
        if progress is None
        else {"percentage": progress.percentage, "current": progress.current, "total": progress.total},
    }
