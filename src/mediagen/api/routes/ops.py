"""The service's own routes: is it alive and ready, its metrics, what it offers (`GET /models`) and what
its predictions cost (`GET /usage`, see mediagen.core.usage)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from mediagen.api import presentation
from mediagen.api.auth import Owner, visible_to
from mediagen.api.limits import LimitedOwner
from mediagen.api.schemas import ERRORS, Health, ModelList, Readiness, UsageReport
from mediagen.api.state import Api
from mediagen.core.usage import parse_duration, usage
from mediagen.metrics import exposed

router = APIRouter()

SINCE = (
    r"^(?:\d{1,5}[sm]"
    r"|(?:\d{1,3}|[1-7]\d{3}|8[0-6]\d{2}|87[0-7]\d|878[0-4])h"
    r"|(?:\d{1,2}|[0-2]\d{2}|3[0-5]\d|36[0-6])d)$"
)
"""A duration of a year at most (366 days): a longer window would read every attempt there is, for any
caller. Said in the pattern, so the OpenAPI document says exactly what is accepted."""


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Something is down: `checks` names it; see Retry-After"}},
    summary="The database, the broker and the image store are reachable",
)
async def readyz(state: Api, response: Response) -> Readiness:
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
    if all(value == "ok" for value in checks.values()):
        return Readiness(status="ready", checks=checks)
    response.status_code = 503
    response.headers["Retry-After"] = "5"
    return Readiness(status="not_ready", checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        401: ERRORS[401],
    },
    summary="Prometheus metrics of this API process (with API keys, a key is needed here too)",
)
async def metrics(_: Owner) -> Response:
    # Any key may read them (they count traffic and spend of every key): a scraper is given one.
    return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/models",
    response_model=ModelList,
    responses=ERRORS,
    summary="The allowed models: each one's input schema, defaults, sizes, output kind and price",
)
async def models(state: Api, _: LimitedOwner) -> ModelList:
    return presentation.model_list(state.settings, state.router, state.prices)


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="What the predictions cost since a while ago: per model, per API key (yours only) and per day",
    responses={code: ERRORS[code] for code in (401, 422, 429, 503)},
)
async def get_usage(
    state: Api,
    owner: LimitedOwner,
    since: Annotated[
        str,
        Query(
            max_length=10,
            pattern=SINCE,
            description="How far back: 30m, 24h, 7d; at most a year (366d, 8784h)",
        ),
    ] = "24h",
) -> UsageReport:
    start = datetime.now(UTC) - parse_duration(since)  # the pattern admits nothing it cannot read
    return presentation.usage_report(await usage(state.db, start, visible_to(owner)))
