"""The fair share of the create budget (mediagen.providers.fairshare) on the real Redis, with several
limiters on their own connections as several worker hosts of one account."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from mediagen.providers import fairshare
from mediagen.providers.fairshare import Lane, Share
from mediagen.providers.ratelimit import RateLimiter

PER_MINUTE = 1200  # one slot every 50 ms


@pytest.fixture
async def hosts(redis_url: str, namespace: str) -> AsyncIterator[list[RateLimiter]]:
    space = f"{namespace}-fair-{uuid.uuid4().hex[:6]}"
    clients = [Redis.from_url(redis_url) for _ in range(3)]
    yield [
        RateLimiter(c, namespace=space, creates_per_minute=PER_MINUTE, requests_per_minute=0, create_burst=1)
        for c in clients
    ]
    for client in clients:
        await client.aclose()


async def create_as(limiter: RateLimiter, owner: str, served: list[str], lane: Lane = "batch") -> None:
    fairshare.current.set(Share(owner=owner, lane=lane))
    await limiter.reserve("create")
    served.append(owner)


async def test_a_second_keys_create_goes_next_not_after_the_first_keys_backlog(hosts: list[RateLimiter]) -> None:
    served: list[str] = []
    backlog = [asyncio.create_task(create_as(hosts[i % 3], "a", served)) for i in range(30)]
    await asyncio.sleep(0.3)  # a's creates are waiting, each host holding some
    joined = len(served)
    await create_as(hosts[1], "b", served)

    # b is served within two slots of asking, not after the 25-odd creates of a still waiting.
    assert served.index("b") <= joined + 2, served
    await asyncio.gather(*backlog)
    assert served.count("a") == 30


async def test_keys_with_creates_waiting_take_turns(hosts: list[RateLimiter]) -> None:
    served: list[str] = []
    tasks = [asyncio.create_task(create_as(hosts[i % 3], owner, served)) for owner in "abc" for i in range(6)]
    await asyncio.gather(*tasks)

    # While all three keys wait, no key is served more than a turn ahead of another (the first create,
    # served before anyone waited, aside).
    for n in range(1, 16):
        counts = [served[:n].count(owner) for owner in "abc"]
        assert max(counts) - min(counts) <= 2, served


async def test_interactive_creates_go_before_batch_ones(hosts: list[RateLimiter]) -> None:
    served: list[str] = []
    batch = [asyncio.create_task(create_as(hosts[i % 3], "batch", served, "batch")) for i in range(10)]
    await asyncio.sleep(0.12)
    joined = len(served)
    await asyncio.gather(*(create_as(hosts[i % 3], "interactive", served, "interactive") for i in range(2)))

    assert served[joined : joined + 3].count("interactive") == 2, served
    await asyncio.gather(*batch)


async def test_a_waiter_that_died_gives_its_place_up(hosts: list[RateLimiter]) -> None:
    limiter = hosts[0]
    served: list[str] = []
    await create_as(limiter, "a", served)  # the burst's one slot is taken: the next create must wait
    # A worker of key b joins the queue and dies before asking again: b's next create is behind it.
    interval = 60 / PER_MINUTE
    await limiter._run("create", interval, 1, fair=[uuid.uuid4().hex, "b", 1, 1.0, 300.0])
    started = time.monotonic()
    await create_as(hosts[1], "b", served)

    # b waited for the dead waiter's slot and its grace (300 ms), not forever.
    assert served == ["a", "b"]
    assert 0.25 < time.monotonic() - started < 2.0


async def test_a_canceled_waiter_leaves_the_queue_at_once(hosts: list[RateLimiter]) -> None:
    served: list[str] = []
    await create_as(hosts[0], "a", served)
    blocked = [asyncio.create_task(create_as(hosts[0], "gone", served)) for _ in range(20)]
    await asyncio.sleep(0.01)
    for task in blocked:
        task.cancel()
    await asyncio.gather(*blocked, return_exceptions=True)
    await asyncio.sleep(0.05)  # the leaving is sent in the background
    started = time.monotonic()
    await create_as(hosts[1], "b", served)

    # Behind 20 places that expire only after their grace (2 s), b would wait seconds.
    assert time.monotonic() - started < 0.5
    assert served[-1] == "b" and served.count("gone") <= 1, served


async def test_with_a_slot_free_and_nobody_waiting_a_create_costs_one_call(hosts: list[RateLimiter]) -> None:
    limiter = RateLimiter(
        hosts[0].redis, namespace=hosts[0].namespace + "-free", creates_per_minute=600, requests_per_minute=0
    )
    calls = 0
    script = limiter._script

    async def counted(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await script(**kwargs)

    limiter._script = counted  # type: ignore[assignment]
    fairshare.current.set(Share(owner="a"))
    for _ in range(5):  # within the burst of 10: each has a slot free
        await limiter.acquire("create")

    assert calls == 5


async def test_a_waiting_create_is_told_its_place(hosts: list[RateLimiter]) -> None:
    slow = [  # one slot every 0.25 s, so that a loaded machine still sees the queue as it was
        RateLimiter(
            h.redis, namespace=h.namespace + "-slow", creates_per_minute=240, requests_per_minute=0, create_burst=1
        )
        for h in hosts[:2]
    ]
    served: list[str] = []
    await create_as(slow[0], "a", served)
    ahead = [asyncio.create_task(create_as(slow[0], "a", served)) for _ in range(3)]
    while await slow[0].redis.zcard(slow[0].key("create") + ":fair:queue") < 3:
        await asyncio.sleep(0.005)
    places: list[int] = []

    async def placed(place: int) -> None:
        places.append(place)

    fairshare.current.set(Share(owner="a", placed=placed))
    await slow[1].reserve("create")

    assert places[0] >= 2 and places == sorted(places, reverse=True), places
    await asyncio.gather(*ahead)
