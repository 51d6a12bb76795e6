"""HTTP connection pools for the worker's hundreds of concurrent calls: many small pools behind one transport.

httpcore's pool (under httpx, so under the `replicate` client) walks every pooled connection twice per
request, and for each idle one asks the OS whether its socket is readable (a `poll` syscall): the cost
of a request grows with the size of the pool. With 200 connections that bookkeeping was the largest
single cost of the worker (a fifth of its CPU, see docs/benchmarks.md).

`ShardedTransport` keeps the same total but splits it into pools of `shard_size` connections, each
keeping all of its connections alive, and sends each request to the least busy pool. A request then
costs about the same whether the worker has 10 or 1,000 jobs in flight.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import httpx

DEFAULT_SHARD_SIZE = 2


class _CountedStream(httpx.AsyncByteStream):
    """A response body that gives its pool's slot back once, when it is closed."""

    def __init__(self, inner: Any, release: Any) -> None:
        self._inner = inner
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self._inner.aclose()
        finally:
            if release is not None:
                release()


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int,
        shard_size: int = DEFAULT_SHARD_SIZE,
        keepalive_expiry: float = 5.0,
        retries: int = 0,
    ) -> None:
        shard_size = max(1, min(shard_size, max_connections))
        count = max(1, math.ceil(max_connections / shard_size))
        limits = httpx.Limits(
            max_connections=shard_size, max_keepalive_connections=shard_size, keepalive_expiry=keepalive_expiry
        )
        # One TLS context for all (each would load the CA bundle again: about 1 MB and 10 ms apiece).
        tls = httpx.create_ssl_context()
        self.shards = [httpx.AsyncHTTPTransport(verify=tls, limits=limits, retries=retries) for _ in range(count)]
        self.busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self.busy
        index = busy.index(min(busy))
        busy[index] += 1

        def release() -> None:
            busy[index] -= 1

        try:
            response = await self.shards[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        response.stream = _CountedStream(response.stream, release)
        return response

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()
