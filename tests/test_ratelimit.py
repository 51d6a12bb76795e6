"""The Replicate budgets (mediagen.providers.ratelimit) on the real Redis: shared, paced, paused by a 429."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from mediagen.core.errors import TransientProviderError
from mediagen.core.retry import RetryPolicy
from mediagen.providers.ratelimit import RateLimiter


@pytest.fixture
async def two_hosts(redis_url: str, namespace: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    """Two limiters on two Redis connections and one budget: two worker hosts of one account."""
    space = f"{namespace}-budget-{uuid.uuid4().hex[:6]}"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    yield tuple(  # type: ignore[misc]
        RateLimiter(c, namespace=space, creates_per_minute=600, requests_per_minute=0, create_burst=3) for c in clients
    )
    for client in clients:
        await client.aclose()


async def test_hosts_share_one_budget_paced_at_its_rate_after_the_burst(
    two_hosts: tuple[RateLimiter, RateLimiter],
) -> None:
    first, second = two_hosts
    started = time.monotonic()
    times: list[float] = []

    async def take(limiter: RateLimiter) -> None:
        await limiter.acquire("create")
        times.append(time.monotonic() - started)

    await asyncio.gather(*(take(first if i % 2 else second) for i in range(13)))

    times.sort()
    # 600 a minute is one every 0.1 s: a burst of 3 at once, then the other 10 each in its own slot,
    # never earlier (later only when the machine is busy).
    assert times[2] < 0.5
    for k in range(3, 13):
        assert times[k] >= (k - 2) * 0.1 - 0.02, times
    assert times[-1] < 3.0


async def test_a_429_pauses_the_budget_for_every_host(two_hosts: tuple[RateLimiter, RateLimiter]) -> None:
    first, second = two_hosts
    await first.acquire("create")

    first.pause("create", 0.6)
    await asyncio.sleep(0.05)  # the pause is sent to Redis in the background
    waited = await second.acquire("create")

    assert waited >= 0.5


async def test_an_unlimited_budget_never_waits(two_hosts: tuple[RateLimiter, RateLimiter]) -> None:
    first, _ = two_hosts
    assert [await first.acquire("other") for _ in range(100)] == [0.0] * 100


def test_a_429_is_a_wait_not_a_failure_of_the_attempt() -> None:
    policy = RetryPolicy(base_seconds=1.0, retry_after_cap_seconds=600)
    assert policy.throttle_wait(TransientProviderError("429", http_status=429, retry_after=7)) == 7
    assert policy.throttle_wait(TransientProviderError("429", http_status=429)) == 1.0
    assert policy.throttle_wait(TransientProviderError("429", http_status=429, retry_after=86_400)) == 600
    assert policy.throttle_wait(TransientProviderError("503", http_status=503, retry_after=7)) is None
