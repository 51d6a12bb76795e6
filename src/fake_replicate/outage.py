"""Replicate down, in the fake: while an outage lasts, every Replicate endpoint answers 503.

An ASGI middleware in front of the fake's routes (and of the rate limits: a request refused by the
outage spends no budget). It covers everything under ``/v1/``: creates, GETs, the list, cancels, models
and versions, the webhook secret. The control routes (``/_fake/...``) and the output files (served by
another host at Replicate) answer as usual. Predictions already made keep running through it, since
their status is derived from their timestamps: they just cannot be seen until it ends.

An outage is started by ``POST /_fake/outage`` or a prompt's ``[[outage=S]]`` (see
``fake_replicate.faults``); each refusal counts as ``outage_503`` under ``faults`` in ``/_fake/stats``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fake_replicate.responses import error_response

if TYPE_CHECKING:
    from fake_replicate.state import FakeReplicate

DETAIL = "The service is temporarily unavailable (an outage injected by the fake server)."


def unavailable() -> Response:
    """The answer of every Replicate endpoint during an outage."""
    return error_response(503, DETAIL)


class Outages:
    def __init__(self, app: ASGIApp, fake: FakeReplicate) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = scope["type"] == "http" and scope["path"].startswith("/v1/")
        if api and self.fake.faults.outage_left(time.monotonic()) > 0:
            self.fake.faults.counts["outage_503"] += 1
            await unavailable()(scope, receive, send)
            return
        await self.app(scope, receive, send)
