"""The fake's own control and inspection routes under ``/_fake`` (not Replicate's; no auth): read and
change the live config, start or end an outage, rotate the webhook secret, reset, statistics, health.
See the package README.
"""

from __future__ import annotations

import base64
import math
import secrets
import time
from dataclasses import asdict

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fake_replicate.config import config_with
from fake_replicate.responses import error_response, json_response
from fake_replicate.state import FakeReplicate


class ControlRoutes:
    """The ``/_fake`` handlers over one `FakeReplicate`."""

    def __init__(self, fake: FakeReplicate) -> None:
        self.fake = fake

    def routes(self) -> list[Route]:
        return [
            Route("/_fake/config", self.get_config, methods=["GET"]),
            Route("/_fake/config", self.put_config, methods=["PUT"]),
            Route("/_fake/outage", self.get_outage, methods=["GET"]),
            Route("/_fake/outage", self.post_outage, methods=["POST"]),
            Route("/_fake/reset", self.post_reset, methods=["POST"]),
            Route("/_fake/webhook-secret", self.post_webhook_secret, methods=["POST"]),
            Route("/_fake/stats", self.get_stats, methods=["GET"]),
            Route("/_fake/health", self.health, methods=["GET"]),
        ]

    async def get_config(self, request: Request) -> Response:
        return json_response(asdict(self.fake.config))

    async def put_config(self, request: Request) -> Response:
        try:
            patch = orjson.loads(await request.body())
            if not isinstance(patch, dict):
                raise ValueError("the body must be a JSON object")
            new = config_with(self.fake.config, patch)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return error_response(400, str(exc))
        self.fake.set_config(new)
        return json_response(asdict(new))

    async def get_outage(self, request: Request) -> Response:
        left = self.fake.faults.outage_left(time.monotonic())
        return json_response({"active": left > 0, "remaining": round(left, 3)})

    async def post_outage(self, request: Request) -> Response:
        """``{"seconds": N}``: every Replicate endpoint answers 503 from now for N s (0 ends an outage)."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            return error_response(400, 'the body must be {"seconds": N} with N >= 0')
        self.fake.faults.start_outage(float(seconds))
        return await self.get_outage(request)

    async def post_webhook_secret(self, request: Request) -> Response:
        """Rotate the webhook secret: to ``{"key": "whsec_..."}`` if given, else to a new random one."""
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            body = None
        key = body.get("key") if isinstance(body, dict) else None
        if key is None and isinstance(body, dict):
            key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        if not isinstance(key, str) or not key.startswith("whsec_"):
            return error_response(400, 'the body must be {} or {"key": "whsec_..."}')
        self.fake.webhooks.secret = key
        return json_response({"key": key})

    async def post_reset(self, request: Request) -> Response:
        self.fake.reset()
        return json_response({"ok": True})

    async def get_stats(self, request: Request) -> Response:
        fake = self.fake
        return json_response(
            {
                "creates": fake.requests["creates"],
                "predictions": len(fake.predictions),
                "by_prompt": fake.by_prompt,
                "statuses": fake.status_counts(),
                "requests": dict(fake.requests),
                "faults": dict(fake.faults.counts),
                "image_renders": fake.images.renders,
                "images": fake.images_made(),
                "webhooks": dict(fake.webhooks.stats),
            }
        )

    async def health(self, request: Request) -> Response:
        return json_response({"ok": True})
