"""A client that sends its request headers too slowly (slowloris) is answered 408 and disconnected."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Process, start_api, stop
from mediagen.api.serving import PROTOCOL
from mediagen.devtools.launcher import api_command

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def strict_api(service_env: dict[str, str], workdir: Path) -> Iterator[tuple[str, int]]:
    process: Process = start_api(
        service_env, workdir / "api-header-timeout.log", MEDIAGEN_HEADER_TIMEOUT_SECONDS=str(TIMEOUT)
    )
    host, port = process.extra["url"].removeprefix("http://").split(":")
    yield host, int(port)
    stop(process.proc)


def read_until_closed(conn: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    conn.settimeout(limit)
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def read_response(conn: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(4096)
    return head


def test_headers_dribbled_slower_than_the_limit_get_a_408_and_a_close(strict_api: tuple[str, int]) -> None:
    with socket.create_connection(strict_api) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        for i in range(40):  # a header line every 0.1 s, never the blank line that ends them
            try:
                conn.sendall(b"X-Slow-%d: y\r\n" % i)
            except OSError:
                closed = True
                break
            conn.settimeout(0.1)
            try:
                answer = conn.recv(4096)
            except TimeoutError:
                continue
            assert answer.startswith(b"HTTP/1.1 408"), answer
            closed = True
            break
        assert closed, "the slow client was never cut off"
        assert time.monotonic() - started < TIMEOUT + 2.5


def test_a_connection_that_sends_nothing_is_closed(strict_api: tuple[str, int]) -> None:
    with socket.create_connection(strict_api) as conn:
        received, took = read_until_closed(conn, limit=TIMEOUT + 5)
    assert received.startswith(b"HTTP/1.1 408") and took < TIMEOUT + 2.5


def test_keep_alive_requests_spread_over_the_limit_are_served(strict_api: tuple[str, int]) -> None:
    with socket.create_connection(strict_api) as conn:
        conn.settimeout(5)
        for _ in range(3):
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(conn).startswith(b"HTTP/1.1 200")
            time.sleep(TIMEOUT * 0.8)


def test_make_run_serves_the_api_with_the_header_timeout() -> None:
    command = api_command("127.0.0.1", 8000)
    assert command[command.index("--http") + 1] == PROTOCOL
