"""What the predictions cost: per job, and totals per model, per API key, per day and per provider.

Each attempt that saw its prediction end records the prediction's `metrics` (`predict_time`,
`image_count`) and its cost by the price table (mediagen.core.pricing), NULL when the price or the
metric it needs is unknown. A prediction is counted once, however many attempts saw it end (a
retried download resumes the same prediction): the latest attempt's record wins. A cost is never
guessed: a job or a total with an unpriced prediction says so (`cost_usd` null for a job,
`unpriced_predictions` in totals, whose `cost_usd` sums what is known).

The jobs retention deletes leave their spend behind in `daily_usage`, one row per UTC day, model,
owner and provider (`roll_up`, in the transaction that deletes them), and totals add it: history stays
the same after a prune. Rolled-up spend counts by whole days: a window that starts within a day counts all of
that day's rolled-up spend.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from mediagen.core.db import Database

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(value: str) -> timedelta:
    """`30m`, `24h`, `7d` as a timedelta; ValueError otherwise."""
    match = _DURATION.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration such as 30m, 1h, 2d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


_PREDICTIONS_CTE = """
    predictions AS (
        SELECT DISTINCT ON (a.prediction_id) a.job_id, a.provider, a.finished_at, a.image_count, a.cost_usd,
               a.predict_time
        FROM attempts a
        WHERE {where} AND a.prediction_id IS NOT NULL
          AND (a.predict_time IS NOT NULL OR a.image_count IS NOT NULL OR a.cost_usd IS NOT NULL)
        ORDER BY a.prediction_id, a.number DESC
    )
"""
_TOTALS = """
    SELECT j.model, j.owner, (p.finished_at AT TIME ZONE 'UTC')::date AS day, p.provider,
           count(*) AS predictions, count(DISTINCT p.job_id) AS jobs,
           coalesce(sum(p.image_count), 0) AS images, coalesce(sum(p.predict_time), 0) AS predict_seconds,
           coalesce(sum(p.cost_usd), 0) AS cost_usd, count(*) FILTER (WHERE p.cost_usd IS NULL) AS unpriced
    FROM predictions p JOIN jobs j ON j.id = p.job_id
"""

# Live predictions, then the days retention rolled up (the jobs of a row are either live or rolled up,
# never both, so adding the two rows of one group is exact).
_USAGE_SQL = f"""
    WITH {_PREDICTIONS_CTE.format(where="a.finished_at >= $1")}
    {_TOTALS}
    WHERE ($2::text IS NULL OR j.owner = $2::text)
    GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT model, owner, day, provider, predictions, jobs, images, predict_seconds, cost_usd, unpriced
    FROM daily_usage
    WHERE day >= ($1::timestamptz AT TIME ZONE 'UTC')::date AND ($2::text IS NULL OR owner = $2::text)
    ORDER BY 3, 1, 2
"""

_ROLL_UP_SQL = text(
    f"""
    INSERT INTO daily_usage AS d (model, owner, day, provider, predictions, jobs, images, predict_seconds, cost_usd,
                                  unpriced)
    WITH {_PREDICTIONS_CTE.format(where="a.job_id = ANY(:job_ids)")}
    {_TOTALS}
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (day, model, owner, provider) DO UPDATE SET
        predictions = d.predictions + excluded.predictions, jobs = d.jobs + excluded.jobs,
        images = d.images + excluded.images, predict_seconds = d.predict_seconds + excluded.predict_seconds,
        cost_usd = d.cost_usd + excluded.cost_usd, unpriced = d.unpriced + excluded.unpriced
    """
)


async def roll_up(conn: AsyncConnection, job_ids: Sequence[uuid.UUID]) -> None:
    """Add what these jobs' predictions cost to `daily_usage`, in the caller's transaction: the one
    that deletes them (mediagen.core.jobs.retention), so their spend is counted once, before and after."""
    await conn.execute(_ROLL_UP_SQL, {"job_ids": list(job_ids)})


@dataclass
class Totals:
    predictions: int = 0
    jobs: int = 0
    images: int = 0
    predict_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)
    unpriced_predictions: int = 0

    def add(self, row: Any) -> None:
        self.predictions += row["predictions"]
        self.jobs += row["jobs"]
        self.images += row["images"]
        self.predict_seconds += float(row["predict_seconds"])
        self.cost_usd += row["cost_usd"]
        self.unpriced_predictions += row["unpriced"]

    def as_json(self) -> dict[str, Any]:
        return {
            "predictions": self.predictions,
            "jobs": self.jobs,
            "images": self.images,
            "predict_seconds": round(self.predict_seconds, 3),
            "cost_usd": str(self.cost_usd),
            "unpriced_predictions": self.unpriced_predictions,
        }


@dataclass
class Usage:
    since: datetime
    total: Totals
    by_model: dict[str, Totals]
    by_api_key: dict[str, Totals]
    by_day: dict[date, Totals]
    by_provider: dict[str, Totals]

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "total": self.total.as_json(),
            "by_model": [{"model": k, **v.as_json()} for k, v in self.by_model.items()],
            "by_api_key": [{"api_key": k, **v.as_json()} for k, v in self.by_api_key.items()],
            "by_day": [{"day": k.isoformat(), **v.as_json()} for k, v in self.by_day.items()],
            "by_provider": [{"provider": k, **v.as_json()} for k, v in self.by_provider.items()],
        }


async def usage(db: Database, since: datetime, owner: str | None = None) -> Usage:
    """Predictions that ended since `since` (of `owner`'s jobs only, when given), summed four ways
    (per model, API key, day and provider).

    A job's predictions count toward every group by their own end, so a job can span two days. The
    `jobs` of a total count each job once per group row: summed across days they may count one twice.
    """
    rows = await db.fetch(_USAGE_SQL, since, owner)
    result = Usage(since, Totals(), {}, {}, {}, {})
    for row in rows:
        result.total.add(row)
        result.by_model.setdefault(row["model"], Totals()).add(row)
        result.by_api_key.setdefault(row["owner"] or "anonymous", Totals()).add(row)
        result.by_day.setdefault(row["day"], Totals()).add(row)
        result.by_provider.setdefault(row["provider"], Totals()).add(row)
    return result


def job_cost(attempts: Iterable[Any]) -> Decimal | None:
    """What one job's predictions cost: None if none ended yet, or if one's price is unknown."""
    latest: dict[str, Any] = {}
    for attempt in sorted(attempts, key=lambda a: a.number):
        ended = attempt.predict_time is not None or attempt.image_count is not None or attempt.cost_usd is not None
        if attempt.prediction_id is not None and ended:
            latest[attempt.prediction_id] = attempt
    if not latest or any(a.cost_usd is None for a in latest.values()):
        return None
    return sum((a.cost_usd for a in latest.values()), Decimal(0))


__all__: Sequence[str] = ["Totals", "Usage", "job_cost", "parse_duration", "roll_up", "usage"]
