"""`POST /webhooks/fal`: a delivery the fake fal really signed wakes the job's listeners once; a forged,
tampered, replayed or oversized one changes nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from redis.asyncio import Redis

from conftest import start_api, stop
from fake_fal.config import FakeFalConfig
from fal_live import LiveFake, captured, live_fake
from mediagen.notify import Notifier, Subscription
from mediagen.providers.fal import FalProvider
from mediagen.providers.fal_webhooks import message

Delivery = tuple[dict[str, str], bytes]


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.05)) as running:
        yield running


@pytest.fixture(scope="module")
def api_url(service_env: dict[str, str], workdir: Path, fake: LiveFake) -> Iterator[str]:
    """An API whose fal is the fake fal (the JWKS it checks webhooks with is the fake's)."""
    process = start_api(service_env, workdir / "fal-webhooks-api.log", MEDIAGEN_FAL_BASE_URL=fake.url)
    yield process.extra["url"]
    stop(process.proc)


@pytest.fixture
async def listener(redis_url: str, namespace: str) -> AsyncIterator[Notifier]:
    client = Redis.from_url(redis_url)
    notifier = Notifier(client, namespace=namespace)
    yield notifier
    await notifier.aclose()
    await client.aclose()


def forwarded(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-fal-") or k == "content-type"}


async def heard(events: Subscription, within: float = 0.5) -> list[dict[str, Any]]:
    found = []
    while (event := await events.next(within)) is not None:
        found.append(event)
    return found


async def test_a_signed_delivery_wakes_the_job_once_and_its_replay_does_nothing(
    fake: LiveFake, api_url: str, listener: Notifier
) -> None:
    headers, body = await captured(fake.url, f"hooked {uuid.uuid4()}")
    request_id = orjson.loads(body)["request_id"]
    job = uuid.uuid4()
    async with httpx.AsyncClient(base_url=api_url) as api, listener.listen(job) as events:
        first = await api.post(f"/webhooks/fal?job={job}", content=body, headers=forwarded(headers))
        replayed = await api.post(f"/webhooks/fal?job={job}", content=body, headers=forwarded(headers))
        events_heard = await heard(events)
    assert first.status_code == 200 and first.json() == {"relayed": True}
    assert replayed.status_code == 200 and replayed.json() == {"ignored": "duplicate"}
    assert [(e["type"], e["prediction_id"], e["status"]) for e in events_heard] == [
        ("prediction", request_id, "succeeded")
    ]


async def test_forged_tampered_or_oversized_deliveries_are_refused_and_wake_nobody(
    fake: LiveFake, api_url: str, listener: Notifier
) -> None:
    headers, body = await captured(fake.url, f"hooked {uuid.uuid4()}")
    job = uuid.uuid4()
    names = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp")
    signed_by_another = eddsa.new(ECC.generate(curve="Ed25519"), "rfc8032").sign(
        message(*(headers[n] for n in names), body)
    )
    stale = {**headers, "x-fal-webhook-timestamp": str(int(time.time()) - 3600)}
    url = f"/webhooks/fal?job={job}"
    async with httpx.AsyncClient(base_url=api_url) as api, listener.listen(job) as events:
        answers = [
            await api.post(
                url, content=body, headers={**forwarded(headers), "x-fal-webhook-signature": signed_by_another.hex()}
            ),
            await api.post(url, content=body.replace(b'"OK"', b'"ERROR"'), headers=forwarded(headers)),
            await api.post(url, content=body, headers=forwarded(stale)),
            await api.post(url, content=body, headers={"content-type": "application/json"}),
            await api.post(url, content=b"x" * (1024 * 1024 + 1), headers=forwarded(headers)),
        ]
        events_heard = await heard(events)
    assert [answer.status_code for answer in answers] == [401, 401, 401, 401, 413]
    assert events_heard == []


async def test_a_result_over_the_apis_own_body_limit_is_still_taken(
    fake: LiveFake, api_url: str, listener: Notifier
) -> None:
    """fal's webhook has its own limit (1 MiB), above the 64 KiB of a client's request."""
    async with httpx.AsyncClient(base_url=api_url) as api:
        answer = await api.post(
            "/webhooks/fal", content=b"x" * (200 * 1024), headers={"content-type": "application/json"}
        )
        client_request = await api.post(
            "/generate", content=b"x" * (200 * 1024), headers={"content-type": "application/json"}
        )
    assert answer.status_code == 401  # read, then refused for its signature: not a 413
    assert client_request.status_code == 413


async def test_the_fake_fals_own_deliveries_reach_the_route_and_its_duplicate_is_dropped(
    fake: LiveFake, api_url: str, listener: Notifier
) -> None:
    job = uuid.uuid4()
    fal = FalProvider(key="test", base_url=fake.url)
    try:
        async with listener.listen(job) as events:
            created = await fal.create(
                "fal-ai/flux/schnell",
                {"prompt": f"[[webhook:duplicate]] hooked {uuid.uuid4()}"},
                webhook=f"{api_url}/webhooks/fal?job={job}",
            )
            first = await events.next(10)
            again = await heard(events, within=1.5)
    finally:
        await fal.aclose()
    assert first is not None and created.id.endswith(f"/{first['prediction_id']}") and first["status"] == "succeeded"
    assert again == []
