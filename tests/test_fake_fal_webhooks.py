"""The fake fal's signed webhooks (checked as fal's docs say, against the JWKS it serves), its restarts
with a data dir, and its command line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from fake_fal.config import FakeFalConfig
from fake_fal.server import create_app

AUTH = {"Authorization": "Key test"}
SCHNELL = "fal-ai/flux/schnell"


def verify(headers: Mapping[str, str], body: bytes, jwks: dict[str, Any], leeway: float = 300) -> bool:
    """fal's scheme: an ED25519 signature (hex) of "request id\\nuser id\\ntimestamp\\nsha256 hex of the body"."""
    try:
        request_id, user_id = headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"]
        timestamp, signature = headers["x-fal-webhook-timestamp"], bytes.fromhex(headers["x-fal-webhook-signature"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - int(timestamp)) > leeway:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
    for key in jwks["keys"]:
        if key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
            continue
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            eddsa.new(eddsa.import_public_key(raw), "rfc8032").verify(message, signature)
            return True
        except ValueError:
            continue
    return False


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        found: dict[str, Any] = orjson.loads(self.body)
        return found


@dataclass
class Receiver:
    """A webhook endpoint on a real socket; answers the statuses in ``answers`` in turn, then 200."""

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    async def wait_for(self, count: int, timeout: float = 10) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            assert time.monotonic() < deadline, f"{len(self.deliveries)} of {count} webhooks came"
            await asyncio.sleep(0.02)
        return self.deliveries


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
        }
        body = await reader.readexactly(int(headers["content-length"]))
        found.deliveries.append(Delivery(headers, body))
        status = found.answers.pop(0) if found.answers else 200
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    found.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/fal/webhook"
    try:
        yield found
    finally:
        server.close()


@asynccontextmanager
async def fake_client(config: FakeFalConfig, data_dir: Path | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config, data_dir=data_dir)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake", headers=AUTH) as http,
    ):
        yield http


async def submit(http: httpx.AsyncClient, arguments: dict[str, Any], webhook: str | None = None) -> dict[str, Any]:
    params = {"fal_webhook": webhook} if webhook else None
    answer = await http.post(f"/{SCHNELL}", json=arguments, params=params)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


FAST = FakeFalConfig(latency=0.1, webhook_retry_seconds=0.05)


# --------------------------------------------------------------------------- webhooks


async def test_a_webhook_verifies_with_the_key_the_jwks_publishes() -> None:
    async with receiver() as hook, fake_client(FAST) as http:
        made = await submit(http, {"prompt": "signed", "num_images": 2}, hook.url)
        [delivery] = await hook.wait_for(1)
        jwks = (await http.get("/.well-known/jwks.json")).json()
    assert verify(delivery.headers, delivery.body, jwks)
    assert delivery.headers["x-fal-webhook-request-id"] == made["request_id"]
    assert delivery.headers["x-fal-webhook-user-id"] == "fake-fal-user"
    sent = delivery.json()
    assert sent["status"] == "OK" and sent["request_id"] == made["request_id"]
    assert len(sent["payload"]["images"]) == 2 and sent["payload"]["has_nsfw_concepts"] == [False, False]


async def test_a_forged_or_replayed_webhook_does_not_verify() -> None:
    async with receiver() as hook, fake_client(FAST) as http:
        await submit(http, {"prompt": "forged"}, hook.url)
        [delivery] = await hook.wait_for(1)
        jwks = (await http.get("/.well-known/jwks.json")).json()
    tampered = delivery.body.replace(b'"OK"', b'"ERROR"')
    assert not verify(delivery.headers, tampered, jwks)
    assert not verify({**delivery.headers, "x-fal-webhook-request-id": str(uuid.uuid4())}, delivery.body, jwks)
    stranger = ECC.generate(curve="Ed25519")
    headers = dict(delivery.headers)
    names = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp")
    message = "\n".join([*(headers[name] for name in names), hashlib.sha256(tampered).hexdigest()]).encode()
    headers["x-fal-webhook-signature"] = eddsa.new(stranger, "rfc8032").sign(message).hex()
    assert not verify(headers, tampered, jwks)
    assert not verify(delivery.headers, delivery.body, jwks, leeway=-1)  # too old: a replay


async def test_a_failed_request_sends_an_error_webhook_with_fals_payload() -> None:
    async with receiver() as hook, fake_client(FAST) as http:
        await submit(http, {"prompt": "too many", "num_images": 9}, hook.url)
        [delivery] = await hook.wait_for(1)
    sent = delivery.json()
    assert sent["status"] == "ERROR" and sent["error"] == "Invalid status code: 422"
    assert sent["payload"]["detail"][0]["loc"] == ["body", "num_images"]


async def test_a_refused_delivery_is_retried_and_signed_again() -> None:
    async with receiver() as hook, fake_client(FAST) as http:
        hook.answers = [500, 503]
        await submit(http, {"prompt": "retried"}, hook.url)
        deliveries = await hook.wait_for(3)
        jwks = (await http.get("/.well-known/jwks.json")).json()
        deadline = time.monotonic() + 5
        while "delivered" not in (stats := (await http.get("/_fake/stats")).json()["webhooks"]):
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
    assert all(verify(d.headers, d.body, jwks) for d in deliveries)
    assert {d.headers["x-fal-webhook-request-id"] for d in deliveries} == {
        deliveries[0].headers["x-fal-webhook-request-id"]
    }
    assert stats == {"answered_500": 1, "answered_503": 1, "retried": 2, "delivered": 1}


async def test_duplicate_and_drop_on_demand() -> None:
    async with receiver() as hook, fake_client(FAST) as http:
        await submit(http, {"prompt": "twice [[webhook:duplicate]]"}, hook.url)
        await submit(http, {"prompt": "never [[webhook:drop]]"}, hook.url)
        twice = await hook.wait_for(2)
        await asyncio.sleep(0.3)
        stats = (await http.get("/_fake/stats")).json()["webhooks"]
    assert len(hook.deliveries) == 2 and twice[0].body == twice[1].body
    assert stats["dropped"] == 1


# --------------------------------------------------------------------------- restarts


async def test_requests_outlive_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    """Given requests finished, running and cancelled when the fake stops, each is found again after a restart,
    the running one completes on time and sends its webhook, and the images are the same bytes."""
    async with receiver() as hook:
        async with fake_client(FakeFalConfig(latency=0), tmp_path) as http:
            done = await submit(http, {"prompt": "finished"})
            running = await submit(http, {"prompt": "running [[latency=0.8]]"}, hook.url)
            cancelled = await submit(http, {"prompt": "cancelled [[latency=30]]"})
            assert (await http.put(cancelled["cancel_url"])).status_code == 202
            image_url = (await http.get(done["response_url"])).json()["images"][0]["url"]
            before = (await http.get(image_url)).content
            http_app = http._transport.app  # type: ignore[attr-defined]
            await http_app.state.fake.webhooks.aclose()  # the fake stops before `running` completes
        assert hook.deliveries == []

        async with fake_client(FakeFalConfig(latency=0), tmp_path) as http:
            statuses = {
                name: (await http.get(r["status_url"])).json()
                for name, r in (("done", done), ("running", running), ("cancelled", cancelled))
            }
            assert statuses["done"]["status"] == "COMPLETED" and "error" not in statuses["done"]
            assert statuses["cancelled"]["error"] == "Request cancelled"
            assert statuses["running"]["status"] in ("IN_QUEUE", "IN_PROGRESS")
            [delivery] = await hook.wait_for(1)
            assert delivery.json()["request_id"] == running["request_id"]
            assert (await http.get(image_url)).content == before
            await http.post("/_fake/reset")

    async with fake_client(FakeFalConfig(latency=0), tmp_path) as http:
        assert (await http.get(done["status_url"])).status_code == 404


# --------------------------------------------------------------------------- the command line


def test_python_m_fake_fal_serves_the_queue(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FAKE_FAL_LATENCY": "0"}
    command = [sys.executable, "-m", "fake_fal", "--port", str(port), "--data-dir", str(tmp_path), "--outage", "0.5"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"{url}/_fake/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "python -m fake_fal did not start"
            time.sleep(0.05)
        first = httpx.post(f"{url}/{SCHNELL}", json={"prompt": "cli"}, headers=AUTH)
        assert first.status_code in (200, 503)
        time.sleep(0.5)
        made = httpx.post(f"{url}/{SCHNELL}", json={"prompt": "cli"}, headers=AUTH).json()
        assert re.fullmatch(r"[0-9a-f-]{36}", made["request_id"])
        assert made["response_url"].startswith(url)
        assert (tmp_path / "requests.jsonl").read_bytes().count(b"\n") >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
