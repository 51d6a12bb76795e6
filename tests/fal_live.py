"""The fake fal on a real socket for the tests: uvicorn in a thread, its URL, its stats and config."""

from __future__ import annotations

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
