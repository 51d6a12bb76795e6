"""The Replicate adapter (mediagen.providers.replicate) against the fake Replicate, over real HTTP.

What the attempt protocol relies on: which answers to a create prove nothing was made and which leave
a paid prediction possible; that every call ends by its bound however long Replicate asks it to wait;
and that a prediction is found in Replicate's list however many pages down its window reaches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import FakeReplicate, private_fake
from mediagen.core.errors import PermanentProviderError, TransientProviderError, UnknownCreateOutcome
from mediagen.providers.replicate import ReplicateProvider, cancel_after

MODEL = "acme/stand-in"  # the fake's generic model: any prompt, seed, width and height


@pytest.fixture(scope="module")
def fake(workdir: Path) -> Iterator[FakeReplicate]:
    with private_fake(workdir, "fake-adapter", latency=0.2) as fake:
        yield fake


@pytest.fixture
async def provider(fake: FakeReplicate) -> AsyncIterator[ReplicateProvider]:
    made = ReplicateProvider(api_token="test", base_url=fake.url, timeout_seconds=1.0)
    yield made
    await made.aclose()


def an_input(note: str = "") -> dict[str, object]:
    return {"prompt": f"a kite {note} #{uuid.uuid4().hex[:8]}", "seed": 1234, "width": 64, "height": 64}


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422, 429, 503])
async def test_a_create_refused_made_nothing(provider: ReplicateProvider, status: int) -> None:
    data = an_input(f"[[create:{status}*1]]")

    with pytest.raises((TransientProviderError, PermanentProviderError)) as raised:
        await provider.create(MODEL, data)

    assert raised.value.http_status == status
    assert raised.value.create_rejected
    assert not isinstance(raised.value, UnknownCreateOutcome)


@pytest.mark.parametrize("status", [500, 502, 504, 408])
async def test_a_create_answered_by_a_server_error_may_have_made_a_prediction(
    provider: ReplicateProvider, status: int
) -> None:
    data = an_input(f"[[create:{status}*1]]")

    with pytest.raises(UnknownCreateOutcome) as raised:
        await provider.create(MODEL, data)

    assert raised.value.http_status == status
    assert not raised.value.create_rejected


@pytest.mark.parametrize("answer", ["502", "504", "drop"])
async def test_a_create_that_made_its_prediction_then_failed_to_answer_is_found_in_the_list(
    provider: ReplicateProvider, answer: str
) -> None:
    data = an_input(f"[[create_ambiguous:{answer}*1]]")
    since = datetime.now(UTC) - timedelta(seconds=1)

    with pytest.raises(UnknownCreateOutcome):
        await provider.create(MODEL, data)
    found = await provider.find_recent(MODEL, data, since)

    assert len(found) == 1 and found[0].status in ("starting", "processing", "succeeded")


async def test_a_create_that_hangs_past_the_jobs_deadline_ends_as_an_unknown_outcome(
    provider: ReplicateProvider,
) -> None:
    data = an_input("[[hang_create=5]]")
    started = time.monotonic()

    with pytest.raises(UnknownCreateOutcome):
        await provider.create(MODEL, data, deadline=datetime.now(UTC) + timedelta(seconds=0.5))

    assert time.monotonic() - started < 0.9  # the job's deadline, sooner than the call's own 1 s bound


async def test_a_get_through_the_clients_retries_ends_by_its_bound(provider: ReplicateProvider) -> None:
    created = await provider.create(MODEL, an_input("[[get:503]]"))  # every GET: 503, which the client retries
    started = time.monotonic()

    with pytest.raises(TransientProviderError) as raised:
        await provider.get(created.id)

    assert time.monotonic() - started < 3  # 1 s, and some room for a loaded machine; not the client's ~48 s
    assert (raised.value.error_class, raised.value.http_status) == ("ReadTimeout", None)


async def test_a_get_held_in_a_429_wait_comes_back_as_throttled(
    provider: ReplicateProvider, fake: FakeReplicate
) -> None:
    created = await provider.create(MODEL, an_input("[[get:429]]"))
    fake.configure(retry_after=30)  # the client's RetryTransport would sleep 30 s, nine times over
    try:
        started = time.monotonic()
        with pytest.raises(TransientProviderError) as raised:
            await provider.get(created.id)
        elapsed = time.monotonic() - started
    finally:
        fake.configure(retry_after=1)

    assert elapsed < 3
    # Throttled, not failed: the runner waits the Retry-After where it sees cancel and the deadline.
    assert (raised.value.http_status, raised.value.retry_after) == (429, 30)


async def test_the_list_is_read_down_to_the_window_however_many_pages(
    provider: ReplicateProvider, fake: FakeReplicate
) -> None:
    wanted = an_input("lost")
    since = datetime.now(UTC) - timedelta(seconds=1)
    lost = await provider.create(MODEL, wanted)
    for _ in range(230):  # 100 to a page: the lost one is on the third
        await provider.create(MODEL, an_input("later"))
    lists_before = fake.stats()["requests"].get("lists", 0)

    found = await provider.find_recent(MODEL, wanted, since)

    assert [prediction.id for prediction in found] == [lost.id]
    assert fake.stats()["requests"].get("lists", 0) - lists_before >= 3


async def test_the_list_is_not_read_past_the_window(provider: ReplicateProvider, fake: FakeReplicate) -> None:
    for _ in range(120):
        await provider.create(MODEL, an_input("older"))
    since = datetime.now(UTC) + timedelta(seconds=0.5)
    time.sleep(0.6)
    wanted = an_input("new")
    made = await provider.create(MODEL, wanted)
    lists_before = fake.stats()["requests"].get("lists", 0)

    found = await provider.find_recent(MODEL, wanted, since)

    assert [prediction.id for prediction in found] == [made.id]
    assert fake.stats()["requests"].get("lists", 0) - lists_before == 1


async def test_a_prediction_that_has_not_started_by_the_jobs_deadline_is_aborted_by_replicate(
    provider: ReplicateProvider,
) -> None:
    data = an_input("[[starting=5]]")  # queued 5 s before it could start
    made = await provider.create(MODEL, data, deadline=datetime.now(UTC) + timedelta(seconds=1))
    await asyncio.sleep(1.5)  # no worker looks, cancels or waits meanwhile

    seen = await provider.get(made.id)
    [listed] = await provider.find_recent(MODEL, data, datetime.now(UTC) - timedelta(seconds=10))

    assert seen.status == "aborted" and seen.done  # read, though the replicate client cannot parse it
    assert listed.status == "aborted"


async def test_a_prediction_still_running_at_the_jobs_deadline_is_canceled_by_replicate(
    provider: ReplicateProvider,
) -> None:
    made = await provider.create(MODEL, an_input("[[latency=5]]"), deadline=datetime.now(UTC) + timedelta(seconds=1))
    await asyncio.sleep(1.5)

    assert (await provider.get(made.id)).status == "canceled"


def test_cancel_after_is_the_jobs_remaining_time_rounded_up() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert cancel_after(now + timedelta(seconds=899.2), now) == "900s"
    assert cancel_after(now - timedelta(seconds=5), now) == "1s"
