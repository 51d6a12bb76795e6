"""Replicate's webhooks: a signed one wakes the waiting attempt at once; anything else changes nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from conftest import FakeReplicate, private_fake, start_api, stop, submit, unique, wait_for_job
from mediagen.notify import Notifier


def signed(secret: str, body: bytes, *, webhook_id: str | None = None, at: int | None = None) -> dict[str, str]:
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if at is None else at
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
        "content-type": "application/json",
    }


@pytest.fixture
async def listener(redis_url: str, namespace: str) -> AsyncIterator[Notifier]:
    client = Redis.from_url(redis_url)
    notifier = Notifier(client, namespace=namespace)
    yield notifier
    await notifier.aclose()
    await client.aclose()


@pytest.fixture
def secret(fake_replicate: FakeReplicate) -> str:
    answer = httpx.get(f"{fake_replicate.url}/v1/webhooks/default/secret", headers={"Authorization": "Bearer x"})
    key: str = answer.json()["key"]
    return key


def prediction_body(prediction_id: str, status: str = "succeeded") -> bytes:
    return orjson.dumps({"id": prediction_id, "status": status, "logs": " 50%|█████     | 2/4 [00:00<00:00]"})


@pytest.mark.usefixtures("worker")
async def test_forged_stale_or_tampered_webhooks_are_refused_and_change_nothing(
    api: httpx.AsyncClient, listener: Notifier, secret: str
) -> None:
    job_id = await submit(api, unique("a long wait [[latency=4]]"), width=512, height=512)
    await wait_for_job(api, job_id, until=("running",))
    body = prediction_body("p-forged")
    url = f"/webhooks/replicate?job={job_id}"
    other_key = "whsec_" + base64.b64encode(b"not our secret at all, no").decode()
    genuine = signed(secret, body)

    async with listener.listen(job_id) as events:
        answers = [
            await api.post(url, content=body, headers=signed(other_key, body)),  # forged
            await api.post(url, content=body, headers=signed(secret, body, at=int(time.time()) - 3600)),  # stale
            await api.post(url, content=prediction_body("p-other"), headers=genuine),  # tampered replay
            await api.post(url, content=body, headers={**genuine, "webhook-signature": ""}),  # unsigned
        ]
        heard = [event async for event in _drain(events) if event["type"] == "prediction"]

    assert [answer.status_code for answer in answers] == [401, 401, 401, 401]
    assert heard == []
    assert (await api.get(f"/status/{job_id}")).json()["status"] == "running"


@pytest.mark.usefixtures("worker")
async def test_a_duplicated_webhook_is_relayed_once(api: httpx.AsyncClient, listener: Notifier, secret: str) -> None:
    job_id = await submit(api, unique("a long wait [[latency=4]]"), width=512, height=512)
    await wait_for_job(api, job_id, until=("running",))
    body = prediction_body("p-duplicated", status="processing")
    headers = signed(secret, body)

    async with listener.listen(job_id) as events:
        first = await api.post(f"/webhooks/replicate?job={job_id}", content=body, headers=headers)
        second = await api.post(f"/webhooks/replicate?job={job_id}", content=body, headers=headers)
        relayed = [event async for event in _drain(events) if event["type"] == "prediction"]

    assert first.status_code == second.status_code == 200
    assert first.json() == {"relayed": True} and second.json() == {"ignored": "duplicate"}
    assert [(e["prediction_id"], e["status"]) for e in relayed] == [("p-duplicated", "processing")]
    assert relayed[0]["progress"] == {"percentage": 0.5, "current": 2, "total": 4}


@pytest.mark.usefixtures("worker")
async def test_a_webhook_for_an_unknown_or_finished_job_is_answered_and_ignored(
    api: httpx.AsyncClient, secret: str
) -> None:
    finished = await submit(api, unique("done already"), width=512, height=512)
    before = await wait_for_job(api, finished)
    body = prediction_body("p-nobody")
    unknown = await api.post(f"/webhooks/replicate?job={uuid.uuid4()}", content=body, headers=signed(secret, body))
    late = await api.post(f"/webhooks/replicate?job={finished}", content=body, headers=signed(secret, body))
    no_job = await api.post("/webhooks/replicate", content=body, headers=signed(secret, body))

    assert unknown.status_code == late.status_code == no_job.status_code == 200
    assert unknown.json() == late.json() == {"ignored": "nobody waits on this job"}
    assert no_job.json() == {"ignored": "no job"}
    assert await wait_for_job(api, finished) == before


async def test_a_webhook_with_long_logs_is_taken_under_its_own_larger_body_limit(
    api: httpx.AsyncClient, secret: str
) -> None:
    logs = "step\n" * 40_000  # ~200 KiB: over the public routes' 64 KiB
    long = orjson.dumps({"id": "p-long-logs", "status": "processing", "logs": logs})
    huge = orjson.dumps({"id": "p-huge", "status": "processing", "logs": "x" * (1024 * 1024)})

    taken = await api.post(f"/webhooks/replicate?job={uuid.uuid4()}", content=long, headers=signed(secret, long))
    refused = await api.post(f"/webhooks/replicate?job={uuid.uuid4()}", content=huge, headers=signed(secret, huge))
    public = await api.post("/generate", content=long, headers={"content-type": "application/json"})

    assert taken.status_code == 200 and taken.json() == {"ignored": "nobody waits on this job"}
    assert refused.status_code == 413
    assert public.status_code == 413


def test_a_rotated_secret_is_refetched_once_and_then_verifies(service_env: dict[str, str], workdir: Path) -> None:
    with private_fake(workdir, "rotating-fake", latency=0.1) as fake:
        api = start_api(service_env, workdir / "api-rotating.log", REPLICATE_BASE_URL=fake.url)
        try:
            url = f"{api.extra['url']}/webhooks/replicate?job={uuid.uuid4()}"
            body = prediction_body("p-rotated")
            old = httpx.get(f"{fake.url}/v1/webhooks/default/secret", headers={"Authorization": "Bearer x"})
            before = httpx.post(url, content=body, headers=signed(old.json()["key"], body))
            # When Replicate's secret is rotated
            new = httpx.post(f"{fake.url}/_fake/webhook-secret", json={}).json()["key"]
            after = httpx.post(url, content=body, headers=signed(new, body))
            fetches = fake.stats()["requests"]["webhook_secrets"]
            with_old = httpx.post(url, content=body, headers=signed(old.json()["key"], body))
            forged = httpx.post(url, content=body, headers=signed(new[:-8] + "AAAAAAA=", body))
            # Then a webhook signed with the new one verifies, with one refetch; later failures (within
            # the minute) fetch nothing more
            assert before.status_code == after.status_code == 200, after.text
            assert new != old.json()["key"]
            assert fetches == 3  # ours above, the API's first fetch, its one refetch
            assert with_old.status_code == forged.status_code == 401
            assert fake.stats()["requests"]["webhook_secrets"] == fetches
            assert [line["event"] for line in api.log_lines()].count("webhook.secret_refetched") == 1
        finally:
            stop(api.proc)


def test_a_malformed_configured_secret_is_reported_once_at_start(
    service_env: dict[str, str], workdir: Path, secret: str
) -> None:
    api = start_api(
        service_env, workdir / "api-bad-secret.log", MEDIAGEN_REPLICATE_WEBHOOK_SECRET="not-a-standard-webhooks-key"
    )
    try:
        body = prediction_body("p-bad-secret")
        answers = [
            httpx.post(
                f"{api.extra['url']}/webhooks/replicate?job={uuid.uuid4()}", content=body, headers=signed(secret, body)
            )
            for _ in range(3)
        ]
        events = [line.get("event") for line in api.log_lines()]
        # The secret is fetched from Replicate instead; the bad setting is reported once, not per webhook
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        assert events.count("webhook.secret_invalid") == 1
        assert "webhook.rejected" not in events
    finally:
        stop(api.proc)


async def _drain(events: Any) -> AsyncIterator[dict[str, Any]]:
    while (event := await events.next(timeout=0.5)) is not None:
        yield event


async def test_with_webhooks_the_attempt_wakes_when_the_prediction_ends_and_polls_only_as_a_safety_net(
    make_stack: Any, fake_replicate: FakeReplicate
) -> None:
    stack = make_stack(MEDIAGEN_REPLICATE_WEBHOOK_POLL_SECONDS="4")
    api_url = stack.start_api()
    stack.start_worker(MEDIAGEN_REPLICATE_WEBHOOKS="true", MEDIAGEN_REPLICATE_WEBHOOK_BASE_URL=api_url)
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
        started = time.monotonic()
        woken = await submit(api, unique("a lark [[latency=1]]"), width=512, height=512)
        twice = await submit(api, unique("a lark [[latency=1]] [[webhook:duplicate]]"), width=512, height=512)
        lost = await submit(api, unique("a lark [[latency=1]] [[webhook:drop]]"), width=512, height=512)
        done = {job_id: await wait_for_job(api, job_id, timeout=20) for job_id in (woken, twice)}
        woken_after = time.monotonic() - started
        done[lost] = await wait_for_job(api, lost, timeout=20)
        lost_after = time.monotonic() - started
        details = {job_id: (await api.get(f"/jobs/{job_id}")).json() for job_id in done}

    assert all(view["status"] == "succeeded" and view["attempts"] == 1 for view in done.values())
    # The 1 s predictions are seen done long before the 4 s safety poll, but for the one whose webhooks
    # were dropped: the safety poll finds it.
    assert woken_after < 3.5
    assert lost_after >= 4.0
    assert all(len(detail["attempt_history"]) == 1 for detail in details.values())
    log = (stack.workdir / "api.log").read_text()
    assert '"outcome":"duplicate"' in log
