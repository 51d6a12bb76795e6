"""The fal adapter (mediagen.providers.fal) against the fake fal over real HTTP: the attempt protocol's
calls (submit, resume by id, cancel) and every fault mapped onto mediagen's typed errors."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from fake_fal.config import FakeFalConfig
from fal_live import LiveFake, live_fake
from mediagen.core.errors import PermanentProviderError, TransientProviderError, UnknownCreateOutcome
from mediagen.providers.base import Prediction
from mediagen.providers.fal import FalProvider, prediction_id, split_prediction_id
from mediagen.worker.progress import parse
from mediagen.worker.runner import _prediction_failure

DEV = "fal-ai/flux/dev"
SCHNELL = "fal-ai/flux/schnell"


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.3, seed=3)) as running:
        yield running


@pytest.fixture
async def fal(fake: LiveFake) -> AsyncIterator[FalProvider]:
    provider = FalProvider(key="test", base_url=fake.url, timeout_seconds=5)
    yield provider
    await provider.aclose()


def unique(text: str = "a red fox") -> str:
    return f"{text} {uuid.uuid4().hex[:10]}"


async def until_done(fal: FalProvider, pid: str, seen: list[Prediction] | None = None) -> Prediction:
    deadline = time.monotonic() + 10
    while True:
        prediction = await fal.get(pid)
        if seen is not None:
            seen.append(prediction)
        if prediction.done:
            return prediction
        assert time.monotonic() < deadline, f"{pid} never ended"
        await asyncio.sleep(0.03)


# --------------------------------------------------------------------------- the attempt protocol


async def test_a_submitted_prediction_runs_to_succeeded_with_its_images(fal: FalProvider) -> None:
    prompt = unique("[[queue=0.4]] [[latency=1.2]]")  # long enough phases to be seen on a busy machine
    created = await fal.create(DEV, {"prompt": prompt, "num_images": 2, "image_size": "square"})
    assert created.status == "starting" and created.id.startswith("fal-ai/flux/")
    seen: list[Prediction] = []
    done = await until_done(fal, created.id, seen)
    assert {"starting", "processing"} <= {p.status for p in seen}
    assert any(parse(p.logs) is not None for p in seen if p.status == "processing"), "no progress in the logs"
    assert done.status == "succeeded" and len(done.output) == 2
    assert done.metrics is not None and done.metrics["image_count"] == 2 and done.metrics["predict_time"] > 0
    async with httpx.AsyncClient() as http:
        image = await http.get(done.output[0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


async def test_an_attempt_resumes_its_prediction_from_the_id_alone(fake: LiveFake) -> None:
    """A worker that crashed after submit: a new process, a new client, only the recorded id."""
    first = FalProvider(key="test", base_url=fake.url)
    created = await first.create(SCHNELL, {"prompt": unique()})
    await first.aclose()
    second = FalProvider(key="test", base_url=fake.url)
    try:
        assert (await until_done(second, created.id)).status == "succeeded"
    finally:
        await second.aclose()


async def test_cancel_a_running_prediction_and_leave_a_finished_one(fal: FalProvider) -> None:
    running = await fal.create(SCHNELL, {"prompt": unique("[[latency=30]]")})
    await fal.cancel(running.id)
    assert (await fal.get(running.id)).status == "canceled"
    finished = await until_done(fal, (await fal.create(SCHNELL, {"prompt": unique()})).id)
    await fal.cancel(finished.id)  # no error: it is left as it is
    assert (await fal.get(finished.id)).status == "succeeded"


async def test_an_unknown_request_is_a_404_the_worker_treats_as_gone(fal: FalProvider) -> None:
    with pytest.raises(PermanentProviderError) as gone:
        await fal.get(prediction_id(DEV, str(uuid.uuid4())))
    assert gone.value.http_status == 404
    with pytest.raises(PermanentProviderError) as bad:
        await fal.get("not-a-fal-id")
    assert bad.value.http_status == 404
    assert split_prediction_id(prediction_id("fal-ai/flux-pro/v1.1", "r-1")) == ("fal-ai/flux-pro", "r-1")


async def test_an_unknown_submit_cannot_be_reconciled_by_listing(fal: FalProvider) -> None:
    with pytest.raises(PermanentProviderError):
        await fal.find_recent(DEV, {"prompt": "p"}, datetime.now(UTC))


# --------------------------------------------------------------------------- how predictions end


async def test_bad_input_fails_for_good(fal: FalProvider) -> None:
    done = await until_done(fal, (await fal.create(SCHNELL, {"prompt": unique(), "num_images": 9})).id)
    assert done.status == "failed" and done.retryable is False
    assert done.error is not None and "num_images" in done.error and "422" in done.error
    assert isinstance(_prediction_failure(done), PermanentProviderError)


async def test_a_runner_failure_is_worth_another_attempt(fal: FalProvider) -> None:
    done = await until_done(fal, (await fal.create(DEV, {"prompt": unique("[[fail*1]]")})).id)
    assert done.status == "failed" and done.retryable is True
    assert isinstance(_prediction_failure(done), TransientProviderError)


async def test_flagged_images_are_dropped_and_all_flagged_fails(fal: FalProvider) -> None:
    some = await until_done(fal, (await fal.create(DEV, {"prompt": unique("[[nsfw:1]]"), "num_images": 2})).id)
    assert (
        some.status == "succeeded"
        and len(some.output) == 1
        and some.metrics
        == {
            "image_count": 1,
            # What fal bills: both images made, the flagged one too, each 1024x768 rounded up to 1 MP.
            "megapixels": 2,
            "predict_time": some.metrics["predict_time"] if some.metrics else None,
        }
    )
    every = await until_done(fal, (await fal.create(DEV, {"prompt": unique("[[nsfw:1]]")})).id)
    assert every.status == "failed" and every.retryable is False
    refused = await until_done(fal, (await fal.create("fal-ai/flux-pro/v1.1", {"prompt": unique("[[nsfw:1]]")})).id)
    assert refused.status == "failed" and refused.retryable is False and "flagged" in (refused.error or "")


# --------------------------------------------------------------------------- faults


async def test_a_refused_submit_is_transient_and_surely_enqueued_nothing(fal: FalProvider, fake: LiveFake) -> None:
    prompt = unique("[[submit:500*1]]")
    with pytest.raises(TransientProviderError) as refused:
        await fal.create(SCHNELL, {"prompt": prompt})
    assert refused.value.http_status == 500 and refused.value.create_rejected
    assert not isinstance(refused.value, UnknownCreateOutcome)
    assert prompt not in fake.stats()["by_prompt"]


async def test_a_throttled_submit_keeps_its_retry_after_and_is_not_retried_by_the_client(
    fal: FalProvider, fake: LiveFake
) -> None:
    prompt = unique("[[submit:429*1:retry_after=7]]")
    with pytest.raises(TransientProviderError) as throttled:
        await fal.create(SCHNELL, {"prompt": prompt})
    assert throttled.value.http_status == 429 and throttled.value.retry_after == 7
    assert throttled.value.create_rejected
    assert prompt not in fake.stats()["by_prompt"]  # fal-client would have retried it into a success
    assert (await fal.create(SCHNELL, {"prompt": prompt})).status == "starting"


@pytest.mark.parametrize("fault", ["[[submit:502*1:enqueued]]", "[[submit:504*1:enqueued]]", "[[submit:drop*1]]"])
async def test_an_ambiguous_submit_is_an_unknown_outcome_and_no_duplicate(
    fal: FalProvider, fake: LiveFake, fault: str
) -> None:
    """The request was enqueued and no answer came: fal-client alone would submit again and pay twice."""
    prompt = unique(fault)
    with pytest.raises(UnknownCreateOutcome):
        await fal.create(SCHNELL, {"prompt": prompt})
    assert fake.stats()["by_prompt"][prompt] == 1


async def test_a_submit_that_hangs_past_the_timeout_is_an_unknown_outcome(fake: LiveFake) -> None:
    fal = FalProvider(key="test", base_url=fake.url, timeout_seconds=0.5)
    try:
        with pytest.raises(UnknownCreateOutcome):
            await fal.create(SCHNELL, {"prompt": unique("[[hang_submit=2*1]]")})
    finally:
        await fal.aclose()


async def test_an_unreachable_fal_is_transient_and_enqueued_nothing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    fal = FalProvider(key="test", base_url=closed, timeout_seconds=2)
    try:
        with pytest.raises(TransientProviderError) as down:
            await fal.create(SCHNELL, {"prompt": "p"})
        assert not isinstance(down.value, UnknownCreateOutcome)
    finally:
        await fal.aclose()


async def test_an_outage_is_transient_for_submits_and_reads(fal: FalProvider, fake: LiveFake) -> None:
    created = await fal.create(SCHNELL, {"prompt": unique()})
    httpx.post(f"{fake.url}/_fake/outage", json={"seconds": 1.0, "status": 503}).raise_for_status()
    with pytest.raises(TransientProviderError) as submit:
        await fal.create(SCHNELL, {"prompt": unique()})
    assert submit.value.http_status == 503 and submit.value.create_rejected
    with pytest.raises(TransientProviderError):
        await fal.get(created.id)
    await asyncio.sleep(1.1)
    assert (await until_done(fal, created.id)).status == "succeeded"


async def test_a_status_read_fault_is_transient_and_the_next_read_works(fal: FalProvider) -> None:
    created = await fal.create(SCHNELL, {"prompt": unique("[[status:503*1]]")})
    with pytest.raises(TransientProviderError) as failed:
        await fal.get(created.id)
    assert failed.value.http_status == 503
    assert (await until_done(fal, created.id)).status == "succeeded"


async def test_a_wrong_key_is_permanent(fake: LiveFake) -> None:
    fake.configure(api_key="right")
    fal = FalProvider(key="wrong", base_url=fake.url)
    try:
        with pytest.raises(PermanentProviderError) as refused:
            await fal.create(SCHNELL, {"prompt": "p"})
        assert refused.value.http_status == 401
    finally:
        fake.configure(api_key=None)
        await fal.aclose()


async def test_a_webhook_url_reaches_fal(fal: FalProvider, fake: LiveFake) -> None:
    received: list[bytes] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    try:
        hook = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/webhooks/fal?job=j&attempt=1"
        created = await fal.create(SCHNELL, {"prompt": unique()}, webhook=hook)
        deadline = time.monotonic() + 10
        while not received:
            assert time.monotonic() < deadline, "no webhook came"
            await asyncio.sleep(0.02)
        assert created.id.endswith(httpx.Response(200, content=received[0]).json()["request_id"])
    finally:
        server.close()


async def test_a_call_past_the_jobs_deadline_sends_nothing(fal: FalProvider, fake: LiveFake) -> None:
    prompt = unique()
    with pytest.raises(TransientProviderError) as late:
        await fal.create(SCHNELL, {"prompt": prompt}, deadline=datetime.now(UTC) - timedelta(seconds=1))
    assert not isinstance(late.value, UnknownCreateOutcome) and prompt not in fake.stats()["by_prompt"]
    soon = datetime.now(UTC) + timedelta(seconds=30)
    created = await fal.create(SCHNELL, {"prompt": prompt}, deadline=soon)
    assert (await fal.get(created.id, deadline=soon)).status in ("starting", "processing", "succeeded")


async def test_a_failed_read_of_a_finished_result_is_no_failed_prediction(fal: FalProvider) -> None:
    """A 503 on reading a succeeded request's result is the read's fault: the next look finds the images."""
    created = await fal.create(SCHNELL, {"prompt": unique("[[result:503*1]] [[latency=0.1]]")})
    await asyncio.sleep(0.2)
    with pytest.raises(TransientProviderError) as failed:
        await fal.get(created.id)
    assert failed.value.http_status == 503
    assert (await fal.get(created.id)).status == "succeeded"
