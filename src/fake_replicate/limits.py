"""Replicate's account rate limits, in the fake: creates and other API requests, each a budget a minute.

An ASGI middleware in front of the fake's routes. Off by default (`create_rate_per_minute` and
`request_rate_per_minute` 0); with a rate, each budget allows a burst of `create_burst` /
`request_burst` requests, then one every 60/rate seconds. A request over budget is answered the way
Replicate does (shared/replicate-models.md §5): 429, a JSON body with `detail`, `status` and an integer
`retry_after`, no `title`, and a `Retry-After` header. Control routes (`/_fake/...`) and output files
are never limited. Refusals are counted in `/_fake/stats` under `faults` as `rate_limited_create` and
`rate_limited_request`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send


class Bucket:
    """GCRA: `tat` is when the budget would be empty again; a request fits while now >= tat - burst."""

    def __init__(self) -> None:
        self.tat = 0.0

    def take(self, now: float, per_minute: int, burst: int) -> float:
        """0 when a request fits (and is counted), else the seconds until one would."""
        interval = 60.0 / per_minute
        tat = max(self.tat, now)
        allowed_at = tat + interval - max(burst, 1) * interval
        if now < allowed_at:
            return allowed_at - now
        self.tat = tat + interval
        return 0.0


class RateLimits:
    def __init__(self, app: ASGIApp, fake: Any) -> None:
        self.app = app
        self.fake = fake
        self.buckets = {"create": Bucket(), "request": Bucket()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        config = self.fake.config
        is_create = scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/predictions")
        budget = "create" if is_create else "request"
        per_minute, burst = (
            (config.create_rate_per_minute, config.create_burst)
            if is_create
            else (config.request_rate_per_minute, config.request_burst)
        )
        if per_minute > 0:
            wait = self.buckets[budget].take(time.monotonic(), per_minute, burst)
            if wait > 0:
                self.fake.faults.counts[f"rate_limited_{budget}"] += 1
                await _throttled(send, max(1, math.ceil(wait)), per_minute, burst)
                return
        await self.app(scope, receive, send)


async def _throttled(send: Send, retry_after: int, per_minute: int, burst: int) -> None:
    body = orjson.dumps(
        {
            "detail": f"Request was throttled. Your rate limit is {per_minute} requests per minute with a burst "
            f"of {burst} requests. Your rate limit resets in ~{retry_after}s.",
            "status": 429,
            "retry_after": retry_after,
        }
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
