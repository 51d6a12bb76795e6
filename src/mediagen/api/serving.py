"""How the API is served: uvicorn's httptools protocol, plus a limit on how long a request's headers take.

uvicorn closes idle keep-alive connections (`--timeout-keep-alive`) but has no header timeout: a
client that opens a connection and sends its headers a byte at a time (slowloris) holds it forever,
and h11/httptools offer none either. `HeaderTimeoutProtocol` adds one, for the price of two attribute
writes per request: each connection notes when the headers of its next request began (the
connection's start, or the first byte of a later request) and forgets it once they are complete; one
timer per server looks over the open connections every second and answers 408 and closes those
whose headers took longer than `MEDIAGEN_HEADER_TIMEOUT_SECONDS`.

Run uvicorn with `--http mediagen.api.serving:HeaderTimeoutProtocol` (as `make run`, the image and
the tests do).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from mediagen.settings import get_settings

PROTOCOL = "mediagen.api.serving:HeaderTimeoutProtocol"
"""The value of uvicorn's `--http` that serves the API."""

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request whose headers take too long gets a 408 and a close."""

    headers_since: float | None = None
    """When the headers of the request now arriving began (None: no headers pending)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(config, server_state, app_state, **kwargs)
        _HeaderWatch.ensure(server_state, self.loop)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.headers_since = self.loop.time()
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        if self.headers_since is None:
            self.headers_since = self.loop.time()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.headers_since = None
        super().on_headers_complete()

    def headers_timed_out(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TIMED_OUT)
        self.transport.close()


class _HeaderWatch:
    """One per server: every second, the connections whose headers are overdue are closed."""

    def __init__(self, server_state: ServerState, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.server_state = server_state
        self.loop = loop
        self.timeout = timeout
        self.interval = min(1.0, timeout / 4)
        loop.call_later(self.interval, self.look)

    @classmethod
    def ensure(cls, server_state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        if getattr(server_state, "header_watch", None) is None:
            server_state.header_watch = cls(server_state, loop, get_settings().header_timeout_seconds)  # type: ignore[attr-defined]

    def look(self) -> None:
        overdue = self.loop.time() - self.timeout
        for connection in list(self.server_state.connections):
            since = getattr(connection, "headers_since", None)
            if since is not None and since < overdue and isinstance(connection, HeaderTimeoutProtocol):
                connection.headers_since = None
                connection.headers_timed_out()
        if not self.loop.is_closed():
            self.loop.call_later(self.interval, self.look)
