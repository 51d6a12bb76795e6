"""The API's routes, one module per resource; each route reads its request, calls the domain, and
answers with the model it declares (built by mediagen.api.presentation).

- `jobs`: submit (`POST /generate`), status, the full job, the list, cancel
- `events`: a job's status changes and progress as server-sent events
- `media`: an output's bytes, with byte ranges, from local disk or S3
- `ops`: health, readiness, metrics, the allowed models, usage and cost
- `replicate_webhooks`: Replicate's signed webhooks, relayed to the worker waiting on the prediction
- `fal_webhooks`: fal's signed webhooks, relayed likewise
"""

from __future__ import annotations

from fastapi import APIRouter

from mediagen.api.routes import events, fal_webhooks, jobs, media, ops, replicate_webhooks

ROUTERS: tuple[APIRouter, ...] = (
    jobs.router,
    events.router,
    media.router,
    ops.router,
    replicate_webhooks.router,
    fal_webhooks.router,
)
