"""The fake Replicate's ASGI app: ``create_app`` wires the Replicate routes, the control routes, the
rate limits and the lifespan around one `FakeReplicate` state. The manual is the package's README.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from fake_replicate.config import FakeConfig
from fake_replicate.control import ControlRoutes
from fake_replicate.limits import RateLimits
from fake_replicate.responses import error_response, not_found
from fake_replicate.routes import ReplicateRoutes
from fake_replicate.state import FakeReplicate

__all__ = ["FakeReplicate", "create_app"]


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
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception}, lifespan=lifespan)
    app.add_middleware(RateLimits, fake=fake)
    app.state.fake = fake
    return app
