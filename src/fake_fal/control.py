"""The fake fal's `/_fake` control routes (no auth): live config, outages, reset, stats, schemas, health."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fake_fal.config import FakeFalConfig, config_with
from fake_fal.images import ImageCache
from fake_fal.models import ENDPOINTS, schema
from fake_fal.queue import QueuedRequest
from fake_fal.responses import detail_response, json_response


class Controlled(Protocol):
    """What the control routes reach of the fake (`fake_fal.server.FakeFal`)."""

    config: FakeFalConfig
    rng: random.Random
    requests: dict[str, QueuedRequest]
    by_prompt: Counter[str]
    counts: Counter[str]
    faults: Counter[str]
    images: ImageCache
    webhooks: Any

    def reset(self) -> None: ...

    def start_outage(self, seconds: float, status: int = 503) -> None: ...

    def outage_json(self) -> dict[str, Any]: ...


def control_routes(fake: Controlled) -> list[Route]:
    """The control routes of ``fake``."""

    async def get_config(request: Request) -> Response:
        return json_response(asdict(fake.config))

    async def put_config(request: Request) -> Response:
        try:
            patch = orjson.loads(await request.body())
            if not isinstance(patch, dict):
                raise ValueError("the body must be a JSON object")
            new = config_with(fake.config, patch)
        except (ValueError, TypeError) as exc:
            return detail_response(400, str(exc))
        if new.seed != fake.config.seed:
            fake.rng = random.Random(new.seed)
        fake.config = new
        return json_response(asdict(new))

    async def post_outage(request: Request) -> Response:
        """``{"seconds": N, "status": 503}``: every queue route answers ``status`` for N seconds (0 ends it)."""
        try:
            body = orjson.loads(await request.body() or b"{}")
            seconds, status = float(body.get("seconds", 60)), int(body.get("status", 503))
        except (ValueError, TypeError, AttributeError) as exc:
            return detail_response(400, f"expected {{'seconds': N, 'status': S}}: {exc}")
        if seconds < 0 or not 400 <= status < 600:
            return detail_response(400, "seconds must be >= 0 and status an HTTP error status")
        fake.start_outage(seconds, status)
        return json_response(fake.outage_json())

    async def get_outage(request: Request) -> Response:
        return json_response(fake.outage_json())

    async def post_reset(request: Request) -> Response:
        fake.reset()
        return json_response({"ok": True})

    async def get_stats(request: Request) -> Response:
        now = time.monotonic()
        statuses = Counter(req.status(now) for req in fake.requests.values())
        cancelled = sum(1 for req in fake.requests.values() if req.canceled_after is not None)
        return json_response(
            {
                "requests": len(fake.requests),
                "by_prompt": dict(fake.by_prompt),
                "statuses": dict(statuses),
                "cancelled": cancelled,
                "calls": dict(fake.counts),
                "faults": dict(fake.faults),
                "image_renders": fake.images.renders,
                "webhooks": dict(fake.webhooks.stats),
            }
        )

    async def get_models(request: Request) -> Response:
        return json_response({endpoint_id: schema(spec) for endpoint_id, spec in ENDPOINTS.items()})

    async def health(request: Request) -> Response:
        return json_response({"ok": True})

    return [
        Route("/_fake/config", get_config, methods=["GET"]),
        Route("/_fake/config", put_config, methods=["PUT"]),
        Route("/_fake/outage", post_outage, methods=["POST"]),
        Route("/_fake/outage", get_outage, methods=["GET"]),
        Route("/_fake/reset", post_reset, methods=["POST"]),
        Route("/_fake/stats", get_stats, methods=["GET"]),
        Route("/_fake/models", get_models, methods=["GET"]),
        Route("/_fake/health", health, methods=["GET"]),
    ]
