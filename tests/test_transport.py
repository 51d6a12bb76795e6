"""The worker's HTTP transport: keeps connections, honours its limit, streams bodies, and fails the way
httpx's own transport does (the provider's retry rules depend on which error it is)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from mediagen.providers.downloads import Downloader
from mediagen.providers.transport import LeanTransport

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    """A real HTTP/1.1 server on loopback that counts connections; `handler` answers each request and
    says whether to keep the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0
        self.peak_open = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if not await self.handler(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        state = Server(handler)
        srv = await asyncio.start_server(state.serve, "127.0.0.1", 0)
        state.port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
        return state

    yield start
    for srv in servers:
        srv.close()


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


async def ok(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    body = await reader.readexactly(content_length(head))
    await asyncio.sleep(0.002)  # a little server time, so that requests overlap
    answer = b"echo:" + body if body else b"ok"
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
    await writer.drain()
    return True


async def rounds(client: httpx.AsyncClient, url: str, *, n: int, concurrency: int) -> None:
    for _ in range(n):
        answers = await asyncio.gather(*(client.get(url) for _ in range(concurrency)))
        assert all(answer.status_code == 200 and answer.text == "ok" for answer in answers)


async def test_connections_are_kept_and_reused_across_rounds_of_requests(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    server = await serve(ok)
    transport = LeanTransport(max_connections=64)
    async with httpx.AsyncClient(transport=transport) as client:
        await rounds(client, server.url(), n=10, concurrency=48)
    assert len(server.requests) == 480
    assert server.accepted <= 48  # never more connections than requests at once: each one is reused
    assert transport.in_flight == 0


async def test_requests_beyond_the_limit_wait_for_a_free_connection(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(ok)
    transport = LeanTransport(max_connections=8)
    async with httpx.AsyncClient(transport=transport) as client:
        await rounds(client, server.url(), n=3, concurrency=100)
    assert server.peak_open <= 8
    assert transport.in_flight == 0


async def test_a_pool_wait_longer_than_the_pool_timeout_is_a_pool_timeout(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def slow(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.5)
        return await ok(head, reader, writer)

    server = await serve(slow)
    transport = LeanTransport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.1)) as client:
        first = asyncio.ensure_future(client.get(server.url()))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(server.url())
        assert (await first).status_code == 200
    assert transport.in_flight == 0


async def test_a_canceled_wait_for_a_connection_takes_no_slot(serve: Callable[..., Awaitable[Server]]) -> None:
    async def slow(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.6)
        return await ok(head, reader, writer)

    server = await serve(slow)
    transport = LeanTransport(max_connections=1)
    async with httpx.AsyncClient(transport=transport) as client:
        first = asyncio.ensure_future(client.get(server.url()))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(client.get(server.url()))
        await asyncio.sleep(0.05)
        waiting.cancel()
        assert (await first).status_code == 200
        assert (await client.get(server.url())).status_code == 200
    assert waiting.cancelled()
    assert transport.in_flight == 0
    assert len(server.requests) == 2


async def test_a_post_body_arrives_whole_with_its_length(serve: Callable[..., Awaitable[Server]]) -> None:
    server = await serve(ok)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        answer = await client.post(server.url("/v1/predictions?x=1"), json={"input": {"prompt": "a cat"}})
    assert answer.text == 'echo:{"input":{"prompt":"a cat"}}'
    assert server.requests[0].startswith(b"POST /v1/predictions?x=1 HTTP/1.1\r\n")


async def test_chunked_and_large_bodies_stream_in_pieces(serve: Callable[..., Awaitable[Server]]) -> None:
    blob = bytes(range(256)) * 16 * 1024  # 4 MiB: more than the transport buffers before pausing

    async def chunked(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for start in range(0, len(blob), 65536):
            piece = blob[start : start + 65536]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    server = await serve(chunked)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        for _ in range(2):
            async with client.stream("GET", server.url()) as response:
                digest = hashlib.sha256()
                pieces = 0
                async for piece in response.aiter_bytes():
                    digest.update(piece)
                    pieces += 1
            assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
            assert pieces > 1
    assert server.accepted == 1


async def test_a_compressed_answer_is_decoded_by_httpx(serve: Callable[..., Awaitable[Server]]) -> None:
    body = gzip.compress(b'{"id": "p1", "status": "starting"}' * 50)

    async def gzipped(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        assert b"gzip" in head.lower()  # httpx asks for it, as it would on its own transport
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True

    server = await serve(gzipped)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        answer = await client.get(server.url())
    assert answer.text == '{"id": "p1", "status": "starting"}' * 50


async def test_a_body_that_ends_with_the_connection_is_read_whole(serve: Callable[..., Awaitable[Server]]) -> None:
    async def until_close(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        return False

    server = await serve(until_close)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        assert (await client.get(server.url())).text == "all of it"
        assert (await client.get(server.url())).text == "all of it"
    assert server.accepted == 2


async def test_a_second_answer_to_one_request_is_ignored_and_its_connection_dropped(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def twice(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstHTTP/1.1 500 Oops\r\ncontent-length: 6\r\n\r\nsecond"
        )
        await writer.drain()
        return True

    server = await serve(twice)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        assert (await client.get(server.url())).text == "first"
        assert (await client.get(server.url())).text == "first"
    assert server.accepted == 2


async def test_an_idle_connection_the_server_closed_is_not_reused(serve: Callable[..., Awaitable[Server]]) -> None:
    async def once(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await ok(head, reader, writer)
        return False  # keep-alive promised, then the server closes anyway

    server = await serve(once)
    async with httpx.AsyncClient(transport=LeanTransport()) as client:
        for _ in range(3):
            assert (await client.get(server.url())).text == "ok"
            await asyncio.sleep(0.05)
        assert (await client.post(server.url(), content=b"x")).text == "echo:x"
    assert server.accepted == 4


async def test_the_keep_alive_race_retries_a_get_once_but_never_a_post(serve: Callable[..., Awaitable[Server]]) -> None:
    served: dict[int, int] = {}

    async def one_per_connection(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        # The server closes a kept-alive connection just as the next request arrives on it.
        served[id(writer)] = served.get(id(writer), 0) + 1
        if served[id(writer)] > 1:
            return False
        return await ok(head, reader, writer)

    server = await serve(one_per_connection)
    async with httpx.AsyncClient(transport=LeanTransport(max_connections=1)) as client:
        assert (await client.get(server.url())).text == "ok"
        assert (await client.get(server.url())).text == "ok"  # sent again, on a new connection
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url(), content=b"create")  # may have been processed: not repeated
    gets = [head for head in server.requests if head.startswith(b"GET")]
    posts = [head for head in server.requests if head.startswith(b"POST")]
    assert (len(gets), len(posts), server.accepted) == (3, 1, 2)


async def test_errors_are_httpx_errors_that_tell_whether_the_request_left(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def hang(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async def hang_up(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False

    async def garbage(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        return True

    hanging, hanging_up, talking = await serve(hang), await serve(hang_up), await serve(garbage)
    transport = LeanTransport()
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.3)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:9/")  # the discard port: nothing listens
        with pytest.raises(httpx.ReadTimeout):
            await client.get(hanging.url())
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(hanging_up.url(), content=b"create")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(talking.url())
    assert transport.in_flight == 0
    assert not transport.connections


def test_it_runs_on_uvloop_as_the_worker_does() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[int, list[str]]:
        server = Server(ok)
        srv = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = srv.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(transport=LeanTransport(max_connections=4)) as client:
                answers = await asyncio.gather(*(client.post(server.url(), content=b"%d" % n) for n in range(20)))
        finally:
            srv.close()
        return server.accepted, [answer.text for answer in answers]

    accepted, texts = uvloop.run(scenario())
    assert texts == [f"echo:{n}" for n in range(20)]
    assert accepted <= 4


async def test_https_with_a_verified_certificate_and_a_refused_one(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = Server(ok)
    srv = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=server_tls)
    server.port = srv.sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{server.port}/"
    try:
        trusting = LeanTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        async with httpx.AsyncClient(transport=trusting) as client:
            answers = [await client.get(url) for _ in range(3)]
        assert [answer.text for answer in answers] == ["ok"] * 3
        assert server.accepted == 1
        async with httpx.AsyncClient(transport=LeanTransport()) as client:  # the public CAs: not ours
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)
    finally:
        srv.close()


async def test_downloads_go_through_a_configured_proxy(
    serve: Callable[..., Awaitable[Server]], monkeypatch: pytest.MonkeyPatch
) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64

    async def proxy(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n%s" % (len(png), png))
        await writer.drain()
        return True

    server = await serve(proxy)
    monkeypatch.setenv("HTTP_PROXY", server.url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    downloader = Downloader(allowed_hosts=["images.example"], max_bytes=1024)
    try:
        assert await downloader.fetch("http://images.example/out/0.png") == png
    finally:
        await downloader.aclose()
    # a forward proxy is asked for the absolute URL
    assert server.requests[0].startswith(b"GET http://images.example/out/0.png HTTP/1.1\r\n")
