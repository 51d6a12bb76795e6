"""A lean HTTP/1.1 transport under httpx for the worker's calls: Replicate's API and image downloads.

The worker keeps hundreds of predictions in flight and makes three to five HTTP requests per job, so
the cost of one request is a large share of its CPU. httpx's default transport (httpcore on anyio)
spent about half of the worker's time there, much of it bookkeeping: two walks of the pool per request,
a `poll` syscall on every idle connection to learn whether the server closed it, and several layers of
stream wrappers (docs/benchmarks.md has the profiles).

This transport plugs in where httpx expects one (`transport=`), so the `replicate` client and our
downloader run unchanged on top of it; httpx still builds the requests, decodes the bodies and raises
its own exceptions. Underneath:

* one `asyncio.Protocol` per connection, parsed by httptools (uvicorn's parser): the event loop tells
  the protocol at once when a server closes a connection, so taking an idle connection costs nothing;
* keep-alive connections per origin, newest first, dropped after `keepalive_expiry` seconds idle;
* at most `max_connections` requests in flight (others wait, bounded by httpx's pool timeout);
* the errors httpx's own transport raises, with the same meaning for the provider's retry rules:
  `ConnectError` / `ConnectTimeout` / `PoolTimeout` (the request never left), `ReadTimeout`,
  `ReadError`, `RemoteProtocolError` (it may have been processed);
* a GET that finds its reused connection closed by the server before any answer (the keep-alive race)
  is sent once more on a new connection; a POST never is (a create must not run twice);
* a response body is streamed with back-pressure (reading pauses above 1 MiB buffered).

HTTP/1.1 only, no HTTP/2, no proxies: what Replicate's API and its CDN need. (The `replicate` client
never honoured HTTP(S)_PROXY, whatever its transport; the downloader falls back to httpx's own
transport when a proxy is configured, see `proxies_configured`.)
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

_PAUSE_ABOVE = 1024 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
Origin = tuple[str, str, int]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Stale(Exception):
    """A reused connection the server had closed before it answered."""


class _Connection(asyncio.Protocol):
    def __init__(self, origin: Origin, owner: LeanTransport) -> None:
        self.origin = origin
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_until = 0.0
        self.paused = False
        self.active = False
        self._waiter: asyncio.Future[None] | None = None
        self._begin(b"GET")

    def _begin(self, method: bytes) -> None:
        self.method = method
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.got_headers = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.received = False
        self.extra = False

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # nothing asked on an idle connection: not one to reuse
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self.error = httpx.RemoteProtocolError(f"invalid HTTP response: {error}")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.forget(self)
        if not self.complete and self.error is None:
            if not self.got_headers:
                self.error = httpx.RemoteProtocolError("Server disconnected without sending a response.")
            elif self._reads_until_close():
                self.complete = True
            else:
                self.error = httpx.ReadError("Server disconnected before the response ended.")
        self._wake()

    # --- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: ignored, and the connection not reused
            self.extra = True

    def on_status(self, status: bytes) -> None:
        if not self.extra:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.extra:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.extra:
            return
        self.status = self.parser.get_status_code()
        self.got_headers = True
        if self.method == b"HEAD":  # no body follows, whatever the headers say; not reused
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.extra:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_ABOVE and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.extra:
            return
        self.complete = True
        self.keep_alive = self.method != b"HEAD" and self.parser.should_keep_alive()
        self._wake()

    # --- used by the transport and the body stream -------------------------------------------------
    def _reads_until_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, within: float | None) -> None:
        """Until something happens on the connection (data, end, error), at most `within` seconds."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = loop.call_later(within, _expire, waiter) if within is not None else None
        try:
            await waiter
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the server") from None
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def send(self, method: bytes, data: bytes) -> None:
        self._begin(method)
        self.active = True
        assert self.transport is not None
        self.transport.write(data)

    def take_chunks(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class _Body(httpx.AsyncByteStream):
    def __init__(self, owner: LeanTransport, conn: _Connection, read_timeout: float | None) -> None:
        self._owner = owner
        self._conn = conn
        self._timeout = read_timeout
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take_chunks()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.wait(self._timeout)

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._owner.finish(self._conn)


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._idle: dict[Origin, list[_Connection]] = {}
        self.connections: set[_Connection] = set()
        self.in_flight = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        await self._acquire(timeouts.get("pool"))
        try:
            conn = await self._exchange(request, timeouts)
        except BaseException:
            self._release()
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def _acquire(self, within: float | None) -> None:
        """Take one of the `max_connections` slots, first come first served (asyncio's Semaphore walks
        all its waiters on every acquire)."""
        if self.in_flight < self.max_connections and not self._waiting:
            self.in_flight += 1
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        handle = loop.call_later(within, _expire, turn) if within is not None else None
        try:
            await turn  # a releasing request hands its slot over: in_flight stays as it is
        except TimeoutError:
            raise httpx.PoolTimeout("no connection became free in time") from None
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # handed a slot just as we were canceled: pass it on
            raise
        finally:
            if handle is not None:
                handle.cancel()

    async def _exchange(self, request: httpx.Request, timeouts: dict[str, float | None]) -> _Connection:
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        method = request.method.encode()
        data = _head(request, await request.aread())
        retry_stale = request.method in _IDEMPOTENT
        while True:
            conn = self._take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            try:
                conn.send(method, data)
                while not conn.got_headers:
                    if conn.error is not None:
                        if reused and not conn.received and isinstance(conn.error, httpx.RemoteProtocolError):
                            raise _Stale()
                        raise conn.error
                    await conn.wait(timeouts.get("read"))
                return conn
            except _Stale:
                if retry_stale:
                    retry_stale = False
                    continue
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from None
            except BaseException:
                conn.close()
                raise

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now < conn.idle_until:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin, within: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._ssl = self._ssl or httpx.create_ssl_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(origin, self), host, port, ssl=tls, server_hostname=host if tls else None
                ),
                within,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as error:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}") from error
        self.connections.add(conn)
        return conn

    def _release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1

    def finish(self, conn: _Connection) -> None:
        """A response is closed: keep its connection for the next request if it can serve one."""
        self._release()
        conn.active = False
        if conn.complete and conn.keep_alive and not conn.closed and not conn.chunks and not conn.extra:
            conn.idle_until = time.monotonic() + self.keepalive_expiry
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn.close()

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self.connections):
            conn.close()
        self._idle.clear()


def _head(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body, as they go on the wire (the body always with a length)."""
    url = request.url
    parts = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"transfer-encoding" or lower == b"content-length":
            continue
        parts += [name, b": ", value, b"\r\n"]
    if body or request.method not in _IDEMPOTENT:
        parts += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
    parts += [b"\r\n", body]
    return b"".join(parts)


def proxies_configured() -> bool:
    """Is an HTTP(S) proxy set in the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY)?"""
    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))
