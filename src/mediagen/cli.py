"""`mediagen`: an operator's look at jobs, straight from the database.

    mediagen job <id>                       a job's timeline: every attempt, its error, the wait after it
    mediagen jobs [--status failed] [--since 1h] [--limit 50]
    mediagen retry <id>                     run a failed (or canceled) job again, on a fresh prediction
    mediagen usage [--since 24h]            what the predictions cost: per model, API key, day, provider
    mediagen prune [--days N]               delete finished jobs older than N days (MEDIAGEN_RETENTION_DAYS)
                                            with their media; their spend stays in usage
    mediagen keys create NAME [--rate-per-minute N] [--max-unfinished-jobs N] [--daily-spend-cap-usd X]
                                            an API key and its webhook secret, printed this once
    mediagen keys list [--all]              keys: name, id, prefix, limits, created, last used (revoked too)
    mediagen keys revoke NAME|ID            the key gets 401 within a second, no restart
    mediagen keys rotate NAME|ID            a new value for the key; the old one stops working at once
    mediagen keys rotate-webhook-secret NAME|ID [--overlap 24h]
                                            a new webhook secret; the old one keeps signing for the overlap

Uses DATABASE_URL (and REDIS_URL for `retry`); without them, the embedded servers `make run` keeps in
MEDIAGEN_DATA_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from mediagen.core import jobs, keys
from mediagen.core.db import Database
from mediagen.core.usage import parse_duration, usage
from mediagen.devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from mediagen.settings import Settings, get_settings

RETRY_HELP = """\
Run a failed or canceled job again, whatever it failed of, including a prediction that failed at
Replicate (flagged content, a model error): the job gets MEDIAGEN_MAX_ATTEMPTS more attempts and a
new deadline, and its next attempt creates a fresh prediction (which Replicate bills again); no
earlier prediction of the job is resumed: one that may still be running is canceled at Replicate
first (if Replicate cannot be reached, the job is not retried). A job that is queued, running,
retrying or succeeded cannot be retried. The job is sent to the workers through Redis; if Redis cannot take it, a
worker's recovery sweep picks it up within seconds.
"""


def parse_since(value: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a duration such as 30m, 1h, 2d") from None


def _time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _seconds(start: datetime | None, end: datetime | None) -> str:
    return f"{(end - start).total_seconds():.1f}s" if start and end else "-"


def timeline(detail: jobs.JobDetail) -> list[str]:
    job = detail.job
    lines = [
        f"job {job.id}  {job.status.upper()}  ({job.attempts} of at most {job.max_attempts} attempts)",
        f"  prompt   {job.prompt!r}",
        f"  model    {job.model}  {dict(job.parameters)}",
        f"  created  {_time(job.created_at)}   finished {_time(job.finished_at)}",
    ]
    if job.error_message:
        lines.append(f"  error    {job.error_class}: {job.error_message}")
    for attempt in detail.attempts:
        outcome = attempt.outcome or "running"
        status = f" HTTP {attempt.http_status}" if attempt.http_status else ""
        line = (
            f"  #{attempt.number} {_time(attempt.started_at)} {outcome:<9} "
            f"{_seconds(attempt.started_at, attempt.finished_at):>7}{status}"
        )
        if attempt.prediction_id:
            line += f"  prediction {attempt.prediction_id}{' (resumed)' if attempt.resumed else ''}"
        if attempt.gone_prediction_id:
            line += f"  (replaced {attempt.gone_prediction_id}, gone at Replicate)"
        lines.append(line)
        if attempt.error_class:
            lines.append(f"      {attempt.error_class}: {attempt.error_message}")
        if attempt.retry_delay_seconds is not None:
            lines.append(f"      then waited {attempt.retry_delay_seconds:.2f}s before the next attempt")
    for output in detail.outputs:
        lines.append(f"  output {output.index}: {output.storage_key} {output.size_bytes} bytes sha256 {output.sha256}")
    for delivery in detail.webhook_deliveries:
        lines.append(
            f"  webhook {delivery['id']} {delivery['event']:<9} {delivery['state']} after {delivery['tries']} tries"
        )
        for attempt in delivery["history"]:
            answer = f"HTTP {attempt['status_code']}" if attempt.get("status_code") else "no answer"
            line = f"      try {attempt['try']} {attempt['at'][:19].replace('T', ' ')} {answer} {attempt['ms']}ms"
            if attempt.get("error"):
                line += f"  {attempt['error']}"
            if attempt.get("next_try_at"):
                line += f"  next try {attempt['next_try_at'][:19].replace('T', ' ')}"
            lines.append(line)
    return lines


async def show_job(db: Database, job_id: uuid.UUID) -> int:
    async with db.connect() as conn:
        detail = await jobs.get_detail(conn, job_id)
    if detail is None:
        print(f"no job {job_id}", file=sys.stderr)
        return 1
    print("\n".join(timeline(detail)))
    return 0


async def list_jobs(db: Database, status: str | None, since: timedelta | None, limit: int) -> int:
    async with db.connect() as conn:
        rows = await jobs.list_jobs(conn, status=status or None, limit=limit, before=None, since=since)
    for row in rows:
        error = f"  {row.error_class}: {row.error_message}" if row.error_class else ""
        print(f"{row.id}  {row.status:<9} {row.attempts:>2}  {_time(row.created_at)}  {row.prompt[:40]!r}{error}")
    print(f"{len(rows)} job(s)", file=sys.stderr)
    return 0


async def retry_job(db: Database, settings: Settings, job_id: uuid.UUID) -> int:
    async with db.connect() as conn:
        earlier = await jobs.left_running(conn, job_id)
    canceled = None
    if earlier is not None:
        if not await _cancel_earlier(settings, job_id, *earlier):
            return 1
        canceled = earlier[0]
    async with db.transaction() as conn:
        attempts = await jobs.retry_finished(
            conn,
            job_id,
            budget=settings.max_attempts,
            deadline_seconds=settings.job_deadline_seconds,
            canceled_prediction=canceled,
        )
    if attempts is None:
        print(f"job {job_id} is not failed or canceled (or does not exist)", file=sys.stderr)
        return 1
    redis_url = settings.redis_url or EmbeddedRedis.running_url(settings.data_dir / "redis")
    if redis_url:
        from mediagen import services

        redis = services.redis_client(settings.model_copy(update={"redis_url": redis_url}))
        try:
            await services.dispatcher(settings, redis).send([job_id])
        except Exception as error:
            print(
                f"could not send the job through Redis ({type(error).__name__}: {error}): "
                "a worker's recovery sweep will pick it up",
                file=sys.stderr,
            )
        finally:
            await redis.aclose()
    print(f"job {job_id} queued again: attempt {attempts + 1} is next, on a fresh prediction")
    return 0


async def _cancel_earlier(settings: Settings, job_id: uuid.UUID, prediction_id: str, runs_at: str) -> bool:
    """Cancel at its provider (`runs_at`) the prediction the job's last attempt left running, so that the
    retry's fresh one is not paid for on top of it. False: it may still run, so the job is not retried."""
    from mediagen import services
    from mediagen.core.errors import MediagenError

    provider = services.fal_provider(settings) if runs_at == "fal" else services.provider(settings)
    try:
        await provider.cancel(prediction_id)
    except MediagenError as error:
        if error.http_status == 404:  # Replicate no longer knows it: nothing runs to be paid for
            return True
        print(
            f"could not cancel the earlier prediction {prediction_id} of job {job_id}, which may still be "
            f"running ({error.message}): not retried, so that it is not paid for twice; try again",
            file=sys.stderr,
        )
        return False
    finally:
        await provider.aclose()
    print(f"canceled the earlier prediction {prediction_id}, which may still have been running")
    return True


async def show_usage(db: Database, since: timedelta) -> int:
    report = await usage(db, datetime.now(UTC) - since)
    print(f"since {_time(report.since)} UTC")
    header = f"{'':<44} {'predictions':>11} {'images':>7} {'seconds':>9} {'USD':>11} {'unpriced':>8}"
    groups: list[tuple[str, dict[Any, Any]]] = [
        ("model", report.by_model),
        ("api key", report.by_api_key),
        ("day", report.by_day),
        ("provider", report.by_provider),
    ]
    for title, group in groups:
        print(f"\nby {title}\n{header}")
        for name, totals in group.items():
            print(_usage_line(str(name), totals))
    print(f"\n{_usage_line('total', report.total)}")
    return 0


async def prune_jobs(db: Database, settings: Settings, days: float | None, batch: int) -> int:
    days = days if days is not None else settings.retention_days
    if days is None:
        print("how old? set MEDIAGEN_RETENTION_DAYS or pass --days", file=sys.stderr)
        return 2
    from mediagen import services

    started = time.monotonic()
    storage = services.storage(settings)
    pruned = await jobs.prune(db, older_than=timedelta(days=days), delete_media=storage.delete, batch=batch)
    print(
        f"deleted {pruned.jobs} jobs finished more than {days:g} days ago and {pruned.media_files} media files, "
        f"in {pruned.batches} batches, {time.monotonic() - started:.1f} s; their spend stays in usage"
    )
    return 0


def _limit(value: object, default: object) -> str:
    return f"{value}" if value is not None else f"{default} (default)"


async def manage_keys(db: Database, settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            async with db.connect() as conn:
                found = await keys.list_keys(conn, include_revoked=args.all)
            for key in found:
                state = f"revoked {_time(key.revoked_at)}" if key.revoked_at else f"last used {_time(key.last_used_at)}"
                print(
                    f"{key.name:<24} {key.id}  {key.prefix}…  created {_time(key.created_at)}  {state}  "
                    f"rate/min {_limit(key.rate_per_minute, settings.rate_limit_per_minute)}, "
                    f"unfinished {_limit(key.max_unfinished_jobs, settings.max_unfinished_jobs)}, "
                    f"spend/day {_limit(key.daily_spend_cap_usd, settings.daily_spend_cap_usd or 'none')}"
                )
            print(f"{len(found)} key(s)", file=sys.stderr)
            return 0
        async with db.transaction() as conn:
            if args.action == "create":
                issued = await keys.create(
                    conn,
                    args.name,
                    rate_per_minute=args.rate_per_minute,
                    max_unfinished_jobs=args.max_unfinished_jobs,
                    daily_spend_cap_usd=args.daily_spend_cap_usd,
                )
            elif args.action == "revoke":
                revoked = await keys.revoke(conn, args.key)
                print(f"revoked {revoked.name} ({revoked.id}): refused within a second; its jobs stay")
                return 0
            elif args.action == "rotate":
                issued = await keys.rotate(conn, args.key)
            else:
                issued = await keys.rotate_webhook_secret(conn, args.key, overlap=args.overlap)
    except (keys.KeyNotFound, keys.KeyNameTaken) as error:
        print(error, file=sys.stderr)
        return 1
    record = issued.record
    print(f"{args.action} {record.name} ({record.id}): shown this once, keep it now")
    if issued.key:
        print(f"api key         {issued.key}")
    if issued.webhook_secret:
        print(f"webhook secret  {issued.webhook_secret}")
    if args.action == "rotate-webhook-secret":
        print(f"the previous secret signs too until {_time(record.previous_webhook_secret_until)} UTC")
    return 0


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("0 or more (0: no limit)")
    return number


def _usd(value: str) -> Decimal:
    try:
        usd = Decimal(value)
    except ArithmeticError:
        raise argparse.ArgumentTypeError("an amount of USD, such as 5 or 2.50") from None
    if not usd > 0:
        raise argparse.ArgumentTypeError("more than 0")
    return usd


def _keys_parser(commands: Any) -> None:
    group = commands.add_parser("keys", help="API keys: create, list, revoke, rotate; webhook secrets")
    actions = group.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key and its webhook secret, printed this once")
    create.add_argument("name")
    create.add_argument("--rate-per-minute", type=_count, help="default: MEDIAGEN_RATE_LIMIT_PER_MINUTE")
    create.add_argument("--max-unfinished-jobs", type=_count, help="default: MEDIAGEN_MAX_UNFINISHED_JOBS")
    create.add_argument("--daily-spend-cap-usd", type=_usd, help="default: MEDIAGEN_DAILY_SPEND_CAP_USD")
    listing = actions.add_parser("list", help="the live keys")
    listing.add_argument("--all", action="store_true", help="revoked ones too")
    for action, text in (
        ("revoke", "the key is refused within a second (no restart); its jobs and usage stay"),
        ("rotate", "a new value for the key; the old one stops working at once; owner, jobs, limits stay"),
        ("rotate-webhook-secret", "a new webhook secret; the old one keeps signing during --overlap"),
    ):
        command = actions.add_parser(action, help=text)
        command.add_argument("key", metavar="NAME|ID")
    actions.choices["rotate-webhook-secret"].add_argument(
        "--overlap", type=parse_since, default=timedelta(hours=24), help="e.g. 24h (default), 7d"
    )


def _usage_line(name: str, totals: Any) -> str:
    return (
        f"{name[:44]:<44} {totals.predictions:>11} {totals.images:>7} {totals.predict_seconds:>9.1f} "
        f"{totals.cost_usd:>11.4f} {totals.unpriced_predictions:>8}"
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="mediagen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True)
    job = commands.add_parser("job", help="a job's timeline")
    job.add_argument("job_id", type=uuid.UUID)
    listing = commands.add_parser("jobs", help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "retrying", "succeeded", "failed", "canceled"])
    listing.add_argument("--since", type=parse_since, help="e.g. 30m, 1h, 2d")
    listing.add_argument("--limit", type=int, default=50)
    retry = commands.add_parser(
        "retry",
        help="run a failed or canceled job again, on a fresh prediction",
        description=RETRY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retry.add_argument("job_id", type=uuid.UUID)
    spend = commands.add_parser(
        "usage", help="what the predictions cost, per model, per API key, per day and per provider"
    )
    spend.add_argument("--since", type=parse_since, default=timedelta(hours=24), help="e.g. 24h (default), 7d")
    prune = commands.add_parser("prune", help="delete old finished jobs and their media, in small batches")
    prune.add_argument("--days", type=float, help="older than this (default: MEDIAGEN_RETENTION_DAYS)")
    prune.add_argument("--batch", type=int, default=None, help="jobs per transaction (MEDIAGEN_RETENTION_BATCH)")
    _keys_parser(commands)
    return root


async def run(args: argparse.Namespace, settings: Settings) -> int:
    embedded = None
    url = settings.database_url
    if not url:
        embedded = EmbeddedPostgres(settings.data_dir / "postgres")
        url = embedded.url
    db = Database(url, pool_size=1)
    try:
        if args.command == "job":
            return await show_job(db, args.job_id)
        if args.command == "jobs":
            return await list_jobs(db, args.status, args.since, args.limit)
        if args.command == "usage":
            return await show_usage(db, args.since)
        if args.command == "keys":
            return await manage_keys(db, settings, args)
        if args.command == "prune":
            return await prune_jobs(db, settings, args.days, args.batch or settings.retention_batch)
        return await retry_job(db, settings, args.job_id)
    finally:
        await db.dispose()
        if embedded is not None:
            embedded.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(run(args, get_settings()))


if __name__ == "__main__":
    sys.exit(main())
