"""The worker's HTTP pools keep their connections under load, and never exceed their size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from mediagen.pools import ShardedTransport


class KeepAliveServer:
    """A minimal HTTP/1.1 server that counts the TCP connections it accepts and the most open at once."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                await asyncio.sleep(0.002)  # a little server time, so that requests overlap
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[KeepAliveServer]:
    state = KeepAliveServer()
    srv = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = srv.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        srv.close()
        await srv.wait_closed()


async def _rounds(client: httpx.AsyncClient, port: int, *, rounds: int, concurrency: int) -> None:
    for _ in range(rounds):
        answers = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/") for _ in range(concurrency)))
        assert all(answer.status_code == 200 and answer.text == "ok" for answer in answers)


async def test_connections_are_reused_across_rounds_of_concurrent_requests(server: KeepAliveServer) -> None:
    transport = ShardedTransport(max_connections=64, shard_size=8)
    async with httpx.AsyncClient(transport=transport) as client:
        await _rounds(client, server.port, rounds=10, concurrency=48)
    # 480 requests, and never more connections than the pools hold: each is kept and reused.
    assert server.accepted <= 64
    assert all(busy == 0 for busy in transport.busy)


async def test_more_concurrent_requests_than_connections_wait_for_one(server: KeepAliveServer) -> None:
    transport = ShardedTransport(max_connections=16, shard_size=4)
    async with httpx.AsyncClient(transport=transport) as client:
        await _rounds(client, server.port, rounds=3, concurrency=100)
    assert server.peak_open <= 16
    assert all(busy == 0 for busy in transport.busy)


async def test_a_failed_request_gives_its_slot_back() -> None:
    transport = ShardedTransport(max_connections=4, shard_size=2)
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                await client.get("http://127.0.0.1:9/")  # the discard port: nothing listens
    assert transport.busy == [0, 0]
