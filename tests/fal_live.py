"""The fake fal on a real socket for the tests: uvicorn in a thread, its URL, its stats and config."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from fake_fal.config import FakeFalConfig
from fake_fal.server import create_app
from mediagen.providers.fal import FalProvider


@dataclass
class LiveFake:
    url: str
    app: Any

    def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = httpx.get(f"{self.url}/_fake/stats").json()
        return found

    def configure(self, **values: Any) -> None:
        httpx.put(f"{self.url}/_fake/config", json=values).raise_for_status()


@contextmanager
def live_fake(config: FakeFalConfig) -> Iterator[LiveFake]:
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    settings = uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield LiveFake(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


async def captured(fake_url: str, prompt: str) -> tuple[dict[str, str], bytes]:
    """One webhook the fake fal at `fake_url` sent for a request submitted through the adapter, caught on
    its way (headers lowercased, the raw body), to be posted to an API as fal would."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = (line.partition(":") for line in head.split("\r\n")[1:] if line)
        headers = {name.strip().lower(): value.strip() for name, _, value in lines}
        received.append((headers, await reader.readexactly(int(headers["content-length"]))))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    fal = FalProvider(key="test", base_url=fake_url)
    try:
        hook = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/webhooks/fal"
        await fal.create("fal-ai/flux/schnell", {"prompt": prompt}, webhook=hook)
        deadline = time.monotonic() + 10
        while not received:
            assert time.monotonic() < deadline, "no webhook came"
            await asyncio.sleep(0.02)
        return received[0]
    finally:
        await fal.aclose()
        server.close()
