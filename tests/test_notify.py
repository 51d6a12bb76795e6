"""Wake-ups between processes (mediagen.notify) on the real Redis: hints that arrive, and only where asked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from conftest import submit, unique, wait_for_job
from mediagen.notify import Notifier


@pytest.fixture
async def notifiers(redis_url: str, namespace: str) -> AsyncIterator[tuple[Notifier, Notifier]]:
    """Two notifiers on two connections pools, as two processes would have."""
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    pair = (Notifier(clients[0], namespace=namespace), Notifier(clients[1], namespace=namespace))
    yield pair
    for notifier, client in zip(pair, clients, strict=True):
        await notifier.aclose()
        await client.aclose()


async def test_a_listener_gets_every_event_published_after_it_subscribed(notifiers: tuple[Notifier, Notifier]) -> None:
    publisher, listener = notifiers
    job_id = uuid.uuid4()

    async with listener.listen(job_id) as events:
        for status in ("running", "retrying", "running", "succeeded"):
            publisher.publish(job_id, {"type": "job", "status": status})
        received = [await events.next(timeout=5) for _ in range(4)]

    assert [event and event["status"] for event in received] == ["running", "retrying", "running", "succeeded"]
    assert all(event and event["job_id"] == str(job_id) for event in received)


async def test_many_waiters_share_one_connection_and_each_hears_its_own_job(
    notifiers: tuple[Notifier, Notifier],
) -> None:
    publisher, listener = notifiers
    jobs = [uuid.uuid4() for _ in range(200)]

    async def waiter(job_id: uuid.UUID) -> str | None:
        async with listener.listen(job_id) as events:
            ready.release()
            event = await events.next(timeout=10)
            return None if event is None else str(event["job_id"])

    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(waiter(job_id)) for job_id in jobs]
    for _ in jobs:
        await ready.acquire()
    for job_id in reversed(jobs):
        publisher.publish(job_id, {"type": "job", "status": "succeeded"})

    assert await asyncio.gather(*tasks) == [str(job_id) for job_id in jobs]
    assert listener._pubsub.connection is not None  # one pub/sub connection served all 200 waiters
    assert not listener._queues  # and every channel was unsubscribed when its last waiter left


async def test_wait_returns_none_when_nothing_comes(notifiers: tuple[Notifier, Notifier]) -> None:
    publisher, listener = notifiers
    publisher.publish(uuid.uuid4(), {"type": "job", "status": "running"})  # another job's event

    started = asyncio.get_running_loop().time()
    assert await listener.wait(uuid.uuid4(), timeout=0.3) is None
    assert asyncio.get_running_loop().time() - started >= 0.25


async def test_publish_never_raises_when_redis_is_unreachable(namespace: str) -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    notifier = Notifier(client, namespace=namespace)
    notifier.publish(uuid.uuid4(), {"type": "job", "status": "running"})
    await notifier.flush()
    assert notifier.dropped == 1 and notifier.published == 0
    await client.aclose()


@pytest.mark.usefixtures("worker")
async def test_the_worker_announces_each_state_change_of_a_job(
    api: httpx.AsyncClient, notifiers: tuple[Notifier, Notifier]
) -> None:
    _, listener = notifiers
    prompt = unique("a heron [[create:500*1]]")
    # The first attempt fails and the next comes at least a second later, so listening right after
    # the submit surely hears the second attempt start and the job succeed.
    job_id = await submit(api, prompt, width=512, height=512)
    async with listener.listen(job_id) as events:
        await wait_for_job(api, job_id)
        seen: list[str] = []
        while (event := await events.next(timeout=2)) is not None:
            seen.append(event["status"])
            if event["status"] == "succeeded":
                break

    assert seen[-2:] == ["running", "succeeded"]
