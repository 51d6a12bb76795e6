"""fal's webhooks checked the way fal says (mediagen.providers.fal_webhooks), on deliveries the fake fal
really sends, against the JWKS it really serves."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from fake_fal.config import FakeFalConfig
from fal_live import LiveFake, live_fake
from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable
from mediagen.providers.fal import FalProvider
from mediagen.providers.fal_webhooks import FalWebhookVerifier, message

Delivery = tuple[dict[str, str], bytes]


@pytest.fixture(scope="module")
def fake() -> Iterator[LiveFake]:
    with live_fake(FakeFalConfig(latency=0.05)) as running:
        yield running


@pytest.fixture
async def delivery(fake: LiveFake) -> AsyncIterator[Delivery]:
    """One webhook the fake sent for a request the adapter submitted, as the route would receive it."""
    received: list[Delivery] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = (line.partition(":") for line in head.split("\r\n")[1:] if line)
        headers = {name.strip(): value.strip() for name, _, value in lines}
        length = int({k.lower(): v for k, v in headers.items()}["content-length"])
        received.append((headers, await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    fal = FalProvider(key="test", base_url=fake.url)
    try:
        hook = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/webhooks/fal"
        await fal.create("fal-ai/flux/schnell", {"prompt": f"hooked {uuid.uuid4()}"}, webhook=hook)
        deadline = time.monotonic() + 10
        while not received:
            assert time.monotonic() < deadline, "no webhook came"
            await asyncio.sleep(0.02)
        yield received[0]
    finally:
        await fal.aclose()
        server.close()


def verifier(fake: LiveFake, **options: object) -> FalWebhookVerifier:
    return FalWebhookVerifier(jwks_url=f"{fake.url}/.well-known/jwks.json", **options)  # type: ignore[arg-type]


async def test_a_delivery_from_fal_verifies_and_names_its_request(fake: LiveFake, delivery: Delivery) -> None:
    headers, body = delivery
    request_id = await verifier(fake).verify(headers, body)
    assert request_id == httpx.Response(200, content=body).json()["request_id"]
    assert await verifier(fake, user_id="fake-fal-user").verify(headers, body) == request_id


async def test_a_tampered_body_or_header_is_rejected(fake: LiveFake, delivery: Delivery) -> None:
    headers, body = delivery
    check = verifier(fake)
    with pytest.raises(WebhookRejected):
        await check.verify(headers, body.replace(b'"OK"', b'"ERROR"'))
    with pytest.raises(WebhookRejected):
        await check.verify({**headers, "X-Fal-Webhook-Request-Id": str(uuid.uuid4())}, body)
    with pytest.raises(WebhookRejected):
        await check.verify({k: v for k, v in headers.items() if k.lower() != "x-fal-webhook-signature"}, body)
    with pytest.raises(WebhookRejected):
        await verifier(fake, user_id="someone-else").verify(headers, body)


async def test_a_signature_by_a_key_not_in_the_jwks_is_rejected(fake: LiveFake, delivery: Delivery) -> None:
    headers, body = delivery
    lowered = {k.lower(): v for k, v in headers.items()}
    names = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp")
    forged = eddsa.new(ECC.generate(curve="Ed25519"), "rfc8032").sign(message(*(lowered[n] for n in names), body))
    with pytest.raises(WebhookRejected):
        await verifier(fake).verify({**lowered, "x-fal-webhook-signature": forged.hex()}, body)


async def test_a_replay_after_the_tolerance_is_rejected(fake: LiveFake, delivery: Delivery) -> None:
    headers, body = delivery
    check = verifier(fake, tolerance_seconds=300)
    await check.verify(headers, body)
    with pytest.raises(WebhookRejected):
        await check.verify(headers, body, now=time.time() + 301)


async def test_keys_are_fetched_once_and_an_unreachable_jwks_is_transient(fake: LiveFake, delivery: Delivery) -> None:
    headers, body = delivery
    check = verifier(fake)
    fetched = fake.stats()["calls"].get("jwks", 0)
    await check.verify(headers, body)
    with pytest.raises(WebhookRejected):
        await check.verify(headers, b"{}")  # no refetch within a minute of the last one
    await check.verify(headers, body)
    assert fake.stats()["calls"]["jwks"] == fetched + 1
    down = FalWebhookVerifier(jwks_url="http://127.0.0.1:9/.well-known/jwks.json", fetch_timeout=1)
    with pytest.raises(WebhookSecretUnavailable):
        await down.verify(headers, body)
