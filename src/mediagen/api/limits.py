"""Per-key limits, enforced in Redis so that every API process shares them.

Each API key has its own limits: a key made with `mediagen keys create --rate-per-minute N ...` those it
was given, anything else (and each limit it was not given) the settings below (`Policies`). The anonymous
caller counts as one key when `MEDIAGEN_LIMIT_ANONYMOUS` is on. Two limits per key:

* requests a minute (`MEDIAGEN_RATE_LIMIT_PER_MINUTE`): a GCRA bucket (one key holding its
  "theoretical arrival time"; mediagen.gcra, the maths the Replicate budget runs too), so a client
  may spend its minute's quota in a burst, then one request every 60/q seconds;
* unfinished jobs at once (`MEDIAGEN_MAX_UNFINISHED_JOBS`): a sorted set of the key's job ids. Jobs
  leave it lazily: only when a key is at its limit are its members looked up in PostgreSQL (the
  truth), and finished ones removed. Members older than the job deadline expire on their own.

Both are decided by one Lua script, in one round trip, and neither is charged when the other refuses.

Optionally a daily spend cap per key (`MEDIAGEN_DAILY_SPEND_CAP_USD`), from what the key's predictions
cost today (UTC; mediagen.core.usage). That sum is read from PostgreSQL at most every
`SPEND_CACHE_SECONDS` per key and shared through Redis; a key at its cap gets no new job until
midnight UTC (jobs already running may take it a little over: costs are known once they end).
A refusal is a `RateLimited` error: 429 with `Retry-After`, and the IETF draft's `RateLimit-Policy`
and `RateLimit` headers, which every answer to a limited caller carries.

Redis unreachable: the limits fail open, for reads and submits alike (PostgreSQL holds every answer,
and a submit is committed and dispatched by the sweep once Redis is back, as it is without keys).
Each request let through so counts in `mediagen_rate_limit_failed_open_total`, and `limits.failed_open`
is logged at most once a minute. The daily spend cap still holds: its sum is then read from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mediagen import gcra, metrics
from mediagen.api.auth import ANONYMOUS, current_owner
from mediagen.core import jobs, keys, usage
from mediagen.core.db import Database
from mediagen.core.errors import MediagenError
from mediagen.logging import log_event

WINDOW_SECONDS = 60
SPEND_CACHE_SECONDS = 15
# A job counted but not yet committed (its batch is being written) is not "finished" when unseen.
UNCOMMITTED_GRACE_SECONDS = 30.0
# Redis unreachable: `limits.failed_open` is logged at most this often per process.
FAILED_OPEN_LOG_SECONDS = 60.0

# KEYS: rate bucket, active set. ARGV: now ms, rate quota (0: none), window ms, job limit (0: none),
# job id ("": a request that starts no job), active member lifetime ms.
# Returns {allowed (1/0), refused limit ("" / "requests" / "jobs"), remaining requests, reset ms,
#          retry after ms, unfinished jobs}.
_ADMIT = gcra.script("""
local now, quota, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local job_limit, job, lifetime = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local remaining, reset, new_tat = -1, 0, 0
if quota > 0 then
  -- the minute's quota may come in a burst: `quota` slots, one every window / quota ms
  local interval = window / quota
  local tat = gcra_tat(KEYS[1], now)
  local wait = gcra_wait(tat, now, interval, quota)
  if wait > 0 then
    return {0, 'requests', 0, math.ceil(tat - now), math.ceil(wait), -1}
  end
  new_tat = tat + interval
  remaining = gcra_left(new_tat, now, interval, quota)
  reset = math.ceil(new_tat - now)
end
local unfinished = -1
if job ~= '' and job_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - lifetime)
  unfinished = redis.call('ZCARD', KEYS[2])
  if unfinished >= job_limit then
    return {0, 'jobs', remaining, reset, 1000, unfinished}
  end
  redis.call('ZADD', KEYS[2], now, job)
  redis.call('PEXPIRE', KEYS[2], lifetime)
  unfinished = unfinished + 1
end
if quota > 0 then
  gcra_store(KEYS[1], new_tat, now)
end
return {1, '', remaining, reset, 0, unfinished}
""")

_UNFINISHED = frozenset({"queued", "running", "retrying"})

_NAMES = {"requests": "requests_per_minute", "jobs": "unfinished_jobs", "spend": "daily_spend"}


class RateLimited(MediagenError):
    """A per-key limit refused the request (429)."""

    def __init__(self, limit: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.limit = limit
        self.headers = headers


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    refused: str
    remaining: int
    reset_seconds: int
    retry_after_seconds: int
    unfinished: int


@dataclass(frozen=True)
class Policy:
    """One key's limits (0 / None: no such limit)."""

    per_minute: int
    max_unfinished: int
    daily_spend_cap: Decimal | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.per_minute or self.max_unfinished or self.daily_spend_cap is not None)

    @cached_property
    def header(self) -> str:
        """Its `RateLimit-Policy`."""
        policies = []
        if self.per_minute:
            policies.append(f'"requests";q={self.per_minute};w={WINDOW_SECONDS}')
        if self.max_unfinished:
            policies.append(f'"jobs";q={self.max_unfinished}')
        if self.daily_spend_cap is not None:
            policies.append(f'"spend";q={_micro_usd(self.daily_spend_cap)};qu="usd-micros";w=86400')
        return ", ".join(policies)


class Policies:
    """The `Policy` of each owner: a key of the table has its own limits over the settings' defaults;
    the keys of MEDIAGEN_API_KEYS have the defaults; the anonymous caller none, unless limited."""

    def __init__(
        self, default: Policy, *, limit_anonymous: bool, caller_of: Callable[[str], keys.Caller | None]
    ) -> None:
        self.default = default
        self.anonymous = default if limit_anonymous else None
        self.caller_of = caller_of
        self._own: dict[str, tuple[keys.Caller, Policy]] = {}

    def __call__(self, owner: str) -> Policy | None:
        if owner == ANONYMOUS:
            return self.anonymous
        caller = self.caller_of(owner)
        if caller is None:
            return self.default
        known = self._own.get(owner)
        if known is not None and known[0] == caller:
            return known[1]
        cap = caller.daily_spend_cap_usd
        policy = Policy(
            self.default.per_minute if caller.rate_per_minute is None else caller.rate_per_minute,
            self.default.max_unfinished if caller.max_unfinished_jobs is None else caller.max_unfinished_jobs,
            self.default.daily_spend_cap if cap is None else cap.normalize(),
        )
        self._own[owner] = (caller, policy)
        return policy


class Limits:
    """Admits or refuses each caller by its own `Policy`: `policy_of(owner)` (None: not limited)."""

    def __init__(
        self,
        redis: Redis,
        db: Database,
        *,
        namespace: str,
        policy_of: Callable[[str], Policy | None],
        job_lifetime_seconds: float,
    ) -> None:
        self.redis = redis
        self.db = db
        self.namespace = namespace
        self.policy_of = policy_of
        self.job_lifetime_ms = int(job_lifetime_seconds * 1000) + 60_000
        self._script = redis.register_script(_ADMIT)
        self._failed_open_logged = -math.inf

    def _keys(self, owner: str) -> list[str]:
        tag = owner or "anonymous"
        return [f"{self.namespace}:limits:{{{tag}}}:requests", f"{self.namespace}:limits:{{{tag}}}:jobs"]

    async def _run(self, owner: str, policy: Policy, job_id: uuid.UUID | None) -> Verdict:
        raw = await self._script(
            keys=self._keys(owner),
            args=[
                int(time.time() * 1000),
                policy.per_minute,
                WINDOW_SECONDS * 1000,
                policy.max_unfinished,
                str(job_id) if job_id else "",
                self.job_lifetime_ms,
            ],
        )
        allowed, refused, remaining, reset, retry, unfinished = raw
        return Verdict(
            bool(allowed),
            refused.decode() if isinstance(refused, bytes) else str(refused),
            int(remaining),
            math.ceil(int(reset) / 1000),
            max(1, math.ceil(int(retry) / 1000)),
            int(unfinished),
        )

    async def admit(self, owner: str, job_id: uuid.UUID | None = None) -> dict[str, str]:
        """Charge one request (and, with `job_id`, one unfinished job); the headers to answer with
        (none for a caller with no limits).

        Raises RateLimited when a limit refuses: then nothing is charged. Redis unreachable: the
        request is let through (see the module's docstring).
        """
        policy = self.policy_of(owner)
        if policy is None or not policy.enabled:
            return {}
        if job_id is not None and policy.daily_spend_cap is not None:
            await self._check_spend(owner, policy)
        if not (policy.per_minute or (job_id is not None and policy.max_unfinished)):
            return {"RateLimit-Policy": policy.header}
        try:
            verdict = await self._run(owner, policy, job_id)
            if not verdict.allowed and verdict.refused == "jobs" and await self._prune(owner):
                verdict = await self._run(owner, policy, job_id)
        except RedisError as error:
            self._failed_open(error, submit=job_id is not None)
            return {"RateLimit-Policy": policy.header}
        headers = self._headers(policy, verdict)
        if verdict.allowed:
            return headers
        headers["Retry-After"] = str(verdict.retry_after_seconds)
        if verdict.refused == "requests":
            message = f"more than {policy.per_minute} requests a minute; try again in {verdict.retry_after_seconds} s"
        else:
            message = f"{policy.max_unfinished} jobs are unfinished already; wait for one to end"
        raise RateLimited(_NAMES[verdict.refused], message, headers)

    def _failed_open(self, error: RedisError, *, submit: bool) -> None:
        metrics.rate_limit_failed_open.labels("submit" if submit else "read").inc()
        now = time.monotonic()
        if now - self._failed_open_logged >= FAILED_OPEN_LOG_SECONDS:
            self._failed_open_logged = now
            log_event("limits.failed_open", logging.WARNING, error=f"{type(error).__name__}: {error}")

    def _headers(self, policy: Policy, verdict: Verdict) -> dict[str, str]:
        items = []
        if policy.per_minute:
            remaining = 0 if verdict.refused == "requests" else max(verdict.remaining, 0)
            items.append(f'"requests";r={remaining};t={verdict.reset_seconds}')
        if policy.max_unfinished and verdict.unfinished >= 0:
            items.append(f'"jobs";r={max(policy.max_unfinished - verdict.unfinished, 0)}')
        headers = {"RateLimit-Policy": policy.header}
        if items:
            headers["RateLimit"] = ", ".join(items)
        return headers

    async def _check_spend(self, owner: str, policy: Policy) -> None:
        assert policy.daily_spend_cap is not None
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        key = f"{self._keys(owner)[0].rsplit(':', 1)[0]}:spend:{midnight.date().isoformat()}"
        try:
            cached = await self.redis.get(key)
        except RedisError:
            cached = None
        if cached is None:
            spent = (await usage.usage(self.db, midnight, owner)).total.cost_usd
            with contextlib.suppress(RedisError):
                await self.redis.set(key, str(spent), ex=SPEND_CACHE_SECONDS)
        else:
            spent = Decimal(cached.decode() if isinstance(cached, bytes) else cached)
        if spent < policy.daily_spend_cap:
            return
        until_midnight = int((midnight + timedelta(days=1) - now).total_seconds()) + 1
        headers = {
            "RateLimit-Policy": policy.header,
            "RateLimit": f'"spend";r=0;t={until_midnight}',
            "Retry-After": str(until_midnight),
        }
        message = f"this key spent ${spent} today, its cap is ${policy.daily_spend_cap}; new jobs resume at 00:00 UTC"
        raise RateLimited(_NAMES["spend"], message, headers)

    async def forget(self, owner: str, job_ids: Sequence[uuid.UUID]) -> None:
        """Jobs counted but never created (an idempotent replay, a failed insert)."""
        if job_ids:
            with contextlib.suppress(RedisError):  # unreachable: the member expires on its own
                await self.redis.zrem(self._keys(owner)[1], *(str(job_id) for job_id in job_ids))

    async def _prune(self, owner: str) -> bool:
        """Drop the key's finished jobs from its set (PostgreSQL is the truth); True if any left."""
        key = self._keys(owner)[1]
        members: list[tuple[bytes, float]] = await self.redis.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
        if not members:
            return False
        ids = [uuid.UUID(member.decode()) for member, _ in members]
        async with self.db.connect() as conn:
            statuses = await jobs.statuses(conn, ids)
        uncommitted_since = time.time() * 1000 - UNCOMMITTED_GRACE_SECONDS * 1000
        gone = [
            str(job_id)
            for job_id, (_, added) in zip(ids, members, strict=True)
            if (job_id in statuses and statuses[job_id] not in _UNFINISHED)
            or (job_id not in statuses and added < uncommitted_since)
        ]
        if gone:
            await self.redis.zrem(key, *gone)
        return bool(gone)


def _micro_usd(usd: Decimal) -> int:
    return int((usd * 1_000_000).to_integral_value())


class RateLimitHeaders:
    """Adds the headers a limit check left in the request's state to the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get("ratelimit")
                if extra:
                    raw = list(message.get("headers", []))
                    names = {name.lower() for name, _ in raw}
                    raw += [
                        (name.lower().encode(), value.encode())
                        for name, value in extra.items()
                        if name.lower().encode() not in names
                    ]
                    message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, with_headers)


async def limited_owner(request: Request) -> str:
    """The caller (see mediagen.api.auth), charged one request against its limits."""
    owner = await current_owner(request)
    limits: Limits | None = request.app.state.api.limits
    if limits is not None:
        headers = await limits.admit(owner)
        if headers:
            request.state.ratelimit = headers
    return owner


LimitedOwner = Annotated[str, Depends(limited_owner)]
