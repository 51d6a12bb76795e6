"""The fake Replicate's ASGI app: ``create_app`` wires the Replicate routes, the control routes, the
outage, the rate limits and the lifespan around one `FakeReplicate` state. The manual is the package's README.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fake_replicate.config import FakeConfig
from fake_replicate.control import ControlRoutes
from fake_replicate.limits import RateLimits
from fake_replicate.outage import Outages
from fake_replicate.responses import RAW_SEND, error_response, not_found
from fake_replicate.routes import ReplicateRoutes
from fake_replicate.state import FakeReplicate

__all__ = ["FakeApp", "FakeReplicate", "create_app"]


class FakeApp(Starlette):
    """Starlette, keeping the server's own ``send`` in the scope: a dropped connection needs it
    (``responses.drop_connection``), and the middleware Starlette puts outermost wraps it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return not_found()
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error."
    return error_response(status, str(detail), headers=getattr(exc, "headers", None))


def create_app(config: FakeConfig | None = None, *, data_dir: Path | None = None) -> Starlette:
    """Build the fake Replicate app; its state is ``app.state.fake`` (a FakeReplicate).

    ``data_dir``: keep predictions there across restarts (see :mod:`fake_replicate.store`).
    """
    fake = FakeReplicate(config or FakeConfig(), data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fake.resume_webhooks()
        try:
            yield
        finally:
            await fake.webhooks.aclose()
            fake.store.close()

    routes = ReplicateRoutes(fake).routes() + ControlRoutes(fake).routes()
    app = FakeApp(routes=routes, exception_handlers={HTTPException: _http_exception}, lifespan=lifespan)
    app.add_middleware(RateLimits, fake=fake)
    app.add_middleware(Outages, fake=fake)  # outermost: a refusal by the outage spends no rate budget
    app.state.fake = fake
    return app
