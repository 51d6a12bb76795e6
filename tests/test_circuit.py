"""The account's circuit breaker (mediagen.providers.circuit) on the real Redis: shared by every worker,
read with the budget's own reservation, one probe at a time."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from mediagen import metrics
from mediagen.core.errors import ProviderOutage, TransientProviderError
from mediagen.core.retry import RetryPolicy
from mediagen.providers.circuit import Circuit
from mediagen.providers.ratelimit import RateLimiter

FAILURES = 3
OPEN_SECONDS = 0.4


@dataclass
class Host:
    """One worker host: its limiter, its circuit, and how many times it wrote to the circuit."""

    limiter: RateLimiter
    circuit: Circuit
    writes: list[str]


def host(redis: Redis, space: str, *, creates_per_minute: int = 6000) -> Host:
    circuit = Circuit(redis, namespace=space, failures=FAILURES, open_seconds=OPEN_SECONDS, probe_seconds=5)
    writes: list[str] = []
    outcome = circuit._outcome

    async def counted(*, keys: list[str], args: list[Any]) -> Any:
        writes.append(args[0])
        return await outcome(keys=keys, args=args)

    circuit._outcome = counted  # type: ignore[assignment]
    limiter = RateLimiter(
        redis, namespace=space, creates_per_minute=creates_per_minute, requests_per_minute=0, circuit=circuit
    )
    return Host(limiter, circuit, writes)


@pytest.fixture
async def two_hosts(redis_url: str, namespace: str) -> AsyncIterator[tuple[Host, Host]]:
    """Two worker hosts of one account, each with its own Redis connection."""
    space = f"{namespace}-circuit-{uuid.uuid4().hex[:6]}"
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    yield host(clients[0], space), host(clients[1], space)
    for client in clients:
        await client.aclose()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    caplog.set_level(logging.INFO, logger="mediagen")
    yield lambda name: [record for record in caplog.records if record.getMessage() == name]


async def open_it(first: Host, second: Host) -> None:
    """Given failures in a row on both hosts, enough to open the circuit."""
    for turn in range(FAILURES):
        await (first if turn % 2 else second).circuit.failed()


async def test_failures_in_a_row_across_hosts_open_the_circuit_for_every_host(
    two_hosts: tuple[Host, Host], logged: Callable[[str], list[logging.LogRecord]]
) -> None:
    first, second = two_hosts
    await first.limiter.acquire("create")

    await open_it(first, second)

    for each in (first, second):
        with pytest.raises(ProviderOutage) as outage:
            await each.limiter.acquire("create")
        assert 0 < (outage.value.retry_after or 0) <= OPEN_SECONDS
    assert len(logged("provider.circuit.opened")) == 1


async def test_the_metrics_say_when_the_circuit_opens_and_closes(two_hosts: tuple[Host, Host]) -> None:
    first, second = two_hosts
    transitions = metrics.replicate_circuit_transitions
    before = {change: transitions.labels("replicate", change)._value.get() for change in ("opened", "closed")}

    await open_it(first, second)
    with pytest.raises(ProviderOutage):
        await first.limiter.acquire("create")
    assert metrics.replicate_circuit_open.labels("replicate")._value.get() == 1
    await asyncio.sleep(OPEN_SECONDS + 0.05)
    await first.limiter.acquire("create")  # the probe
    await first.circuit.succeeded()

    assert metrics.replicate_circuit_open.labels("replicate")._value.get() == 0
    after = {change: transitions.labels("replicate", change)._value.get() for change in ("opened", "closed")}
    assert (after["opened"] - before["opened"], after["closed"] - before["closed"]) == (1, 1)


async def test_an_open_circuit_takes_no_slot_of_the_budget(two_hosts: tuple[Host, Host], redis_url: str) -> None:
    first, second = two_hosts
    await open_it(first, second)
    budget = Redis.from_url(redis_url)
    try:
        before = await budget.get(first.limiter.key("create"))
        for _ in range(5):
            with pytest.raises(ProviderOutage):
                await first.limiter.reserve("create")
        assert await budget.get(first.limiter.key("create")) == before
    finally:
        await budget.aclose()


async def test_a_success_in_between_resets_the_count(two_hosts: tuple[Host, Host]) -> None:
    first, second = two_hosts
    for _ in range(FAILURES - 1):
        await first.circuit.failed()
    await second.limiter.acquire("create")  # the reservation shows the failures counted so far
    await second.circuit.succeeded()

    for _ in range(FAILURES - 1):
        await first.circuit.failed()

    await first.limiter.acquire("create")
    await second.limiter.acquire("create")


async def test_the_happy_path_writes_nothing_to_the_circuit(two_hosts: tuple[Host, Host]) -> None:
    first, _ = two_hosts
    for _ in range(20):
        await first.limiter.acquire("create")
        await first.circuit.succeeded()
    assert first.writes == []


async def test_one_probe_at_a_time_and_its_success_closes_the_circuit(
    two_hosts: tuple[Host, Host], logged: Callable[[str], list[logging.LogRecord]]
) -> None:
    first, second = two_hosts
    await open_it(first, second)
    await asyncio.sleep(OPEN_SECONDS + 0.05)

    await first.limiter.acquire("create")  # the probe
    with pytest.raises(ProviderOutage) as outage:
        await second.limiter.acquire("create")
    assert (outage.value.retry_after or 0) <= 1.0  # asks again soon: the probe may come back any moment

    await first.circuit.succeeded()

    await second.limiter.acquire("create")
    assert len(logged("provider.circuit.closed")) == 1


async def test_a_failed_probe_opens_the_circuit_again(two_hosts: tuple[Host, Host]) -> None:
    first, second = two_hosts
    await open_it(first, second)
    await asyncio.sleep(OPEN_SECONDS + 0.05)
    await first.limiter.acquire("create")  # the probe

    await first.circuit.failed()

    for each in (first, second):
        with pytest.raises(ProviderOutage) as outage:
            await each.limiter.acquire("create")
        assert (outage.value.retry_after or 0) > OPEN_SECONDS / 2


async def test_a_probe_whose_worker_vanished_is_given_up(redis_url: str, namespace: str) -> None:
    space = f"{namespace}-circuit-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(redis_url)
    try:
        hosts = [host(redis, space), host(redis, space)]
        for each in hosts:
            each.circuit.probe_ms = 200
        await open_it(*hosts)
        await asyncio.sleep(OPEN_SECONDS + 0.05)
        await hosts[0].limiter.acquire("create")  # the probe, and then nothing more from it

        await asyncio.sleep(0.25)

        await hosts[1].limiter.acquire("create")  # the next probe
    finally:
        await redis.aclose()


async def test_without_a_budget_the_circuit_is_read_once_this_process_saw_a_failure(
    redis_url: str, namespace: str
) -> None:
    space = f"{namespace}-circuit-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(redis_url)
    try:
        unbudgeted, other = host(redis, space, creates_per_minute=0), host(redis, space)
        await open_it(other, other)

        # All was well here: no Redis call at all, so the open circuit is not seen yet ...
        assert await unbudgeted.limiter.acquire("create") == 0.0
        # ... until this process's own call fails like the others'.
        await unbudgeted.circuit.failed()
        with pytest.raises(ProviderOutage):
            await unbudgeted.limiter.acquire("create")
    finally:
        await redis.aclose()


def test_an_open_circuit_is_a_wait_not_a_failure_of_the_attempt() -> None:
    policy = RetryPolicy(base_seconds=1.0, retry_after_cap_seconds=600)
    assert policy.throttle_wait(ProviderOutage("down", retry_after=4.5)) == 4.5
    assert policy.throttle_wait(TransientProviderError("503", http_status=503)) is None


async def test_the_probe_is_a_call_of_its_own_so_no_job_pays_for_finding_out(two_hosts: tuple[Host, Host]) -> None:
    first, second = two_hosts
    answers = [False, True]
    probes: list[bool] = []

    async def answered() -> bool:
        probes.append(answers.pop(0))
        return probes[-1]

    first.circuit.probe_with(answered)
    await open_it(first, second)
    await asyncio.sleep(OPEN_SECONDS + 0.05)

    # Still down: the caller chosen as the probe sends nothing of its own, and waits like the others.
    with pytest.raises(ProviderOutage) as outage:
        await first.limiter.acquire("create")
    assert (outage.value.retry_after or 0) >= OPEN_SECONDS
    with pytest.raises(ProviderOutage):
        await second.limiter.acquire("create")

    # Back: the next probe closes the circuit, and its caller goes on with its own call.
    await asyncio.sleep(OPEN_SECONDS + 0.05)
    await first.limiter.acquire("create")
    await second.limiter.acquire("create")
    assert probes == [False, True]
