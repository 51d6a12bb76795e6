"""`GET /usage`: what the predictions cost, per model, per API key and per day (see mediagen.core.usage)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from mediagen.api.auth import visible_to
from mediagen.api.http import FastJSON, invalid_field
from mediagen.api.limits import LimitedOwner
from mediagen.api.schemas import ErrorResponse
from mediagen.core.usage import parse_duration, usage

router = APIRouter()


class UsageTotals(BaseModel):
    predictions: int
    jobs: int
    images: int
    predict_seconds: float
    cost_usd: str
    """USD, as a decimal string: the sum of the known costs."""
    unpriced_predictions: int
    """Predictions whose cost is unknown (no price for the model, or no metric to price): not in `cost_usd`."""


class UsageReport(BaseModel):
    since: datetime
    total: UsageTotals
    by_model: list[dict[str, Any]]
    by_api_key: list[dict[str, Any]]
    by_day: list[dict[str, Any]]


async def _state(request: Request) -> Any:
    return request.app.state.api


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="What the predictions cost since a while ago: per model, per API key (yours only) and per day",
    responses={422: {"model": ErrorResponse}},
)
async def get_usage(
    state: Annotated[Any, Depends(_state)],
    owner: LimitedOwner,
    since: Annotated[
        str, Query(max_length=10, pattern=r"^\d{1,5}[smhd]$", description="How far back: 30m, 24h, 7d")
    ] = "24h",
) -> Response:
    try:
        start = datetime.now(UTC) - parse_duration(since)
    except (ValueError, OverflowError) as invalid:
        return invalid_field("since", "a duration like 24h", summary=f"since: {invalid}")
    report = await usage(state.db, start, visible_to(owner))
    return FastJSON(report.as_json())
