"""Webhooks from the fake, as Replicate sends them: signed (Standard Webhooks), retried, and on demand late,
twice or never.

A create with `webhook` (and optionally `webhook_events_filter`, default `["start", "completed"]`, the
values `start`, `output`, `logs`, `completed`) gets one background task that POSTs the prediction, the
same JSON a GET returns, to that URL:

* `start` at once (status `starting`);
* `logs` each time the logs change while it runs, at most every 0.5 s (as Replicate throttles them);
* `output` with the output, `completed` when it ends (succeeded, failed, canceled or aborted; a cancel
  sends `completed` at once).

Each delivery has its own `webhook-id` (kept across its retries and duplicates), a `webhook-timestamp`
and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with the key of
`GET /v1/webhooks/default/secret`. A delivery answered with anything but 2xx, or not at all, is retried
`webhook_retries` times, `webhook_retry_seconds` apart, doubling.

Faults (FakeConfig, or per prompt): `webhook_delay` / `[[webhook:delay=S]]` sends every delivery S s
late; `p_webhook_duplicate` / `[[webhook:duplicate]]` sends each delivery twice (same id);
`p_webhook_drop` / `[[webhook:drop]]` never sends (`[[webhook:drop=completed]]`: only that event).
Counted in `/_fake/stats` under `webhooks`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import orjson

EVENTS = ("start", "output", "logs", "completed")
DEFAULT_EVENTS = ("start", "completed")
LOGS_EVERY = 0.5
_DIRECTIVE = re.compile(r"\[\[\s*webhook:\s*(drop|duplicate|delay)\s*(?:=\s*([\w.]+))?\s*\]\]")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header for `body` (Standard Webhooks, one v1 signature)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class WebhookFaults:
    """What a prompt's `[[webhook:...]]` directives ask for."""

    def __init__(self, prompt: str) -> None:
        self.drop: set[str] = set()
        self.duplicate = False
        self.delay: float | None = None
        for kind, value in _DIRECTIVE.findall(prompt):
            if kind == "drop":
                self.drop.update([value] if value else EVENTS)
            elif kind == "duplicate":
                self.duplicate = True
            elif kind == "delay" and value:
                self.delay = float(value)


class WebhookSender:
    def __init__(self, secret: str, config: Callable[[], Any]) -> None:
        self.secret = secret
        self.config = config
        self.stats: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, pred: Any, url: str, events: list[str] | None, render: Callable[[], dict[str, Any]]) -> None:
        """Send `pred`'s webhooks to `url` as it runs; `render()` gives its JSON at the moment."""
        wanted = tuple(event for event in (events or DEFAULT_EVENTS) if event in EVENTS)
        task = asyncio.get_running_loop().create_task(self._follow(pred, url, wanted, render))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, pred: Any, url: str, events: tuple[str, ...], render: Callable[[], dict[str, Any]]) -> None:
        faults = WebhookFaults(str(pred.params.prompt))
        if "start" in events:
            self._send(url, "start", render(), faults)
        last_logs = ""
        while pred.remaining(time.monotonic()) > 0:
            await pred.wait(LOGS_EVERY if "logs" in events else 3600.0)
            body = render()
            running = body["status"] not in ("succeeded", "failed", "canceled", "aborted")
            if "logs" in events and running and body.get("logs") and body["logs"] != last_logs:
                last_logs = body["logs"]
                self._send(url, "logs", body, faults)
        body = render()
        if "output" in events and body.get("output"):
            self._send(url, "output", body, faults)
        if "completed" in events:
            self._send(url, "completed", body, faults)

    def _send(self, url: str, event: str, body: dict[str, Any], faults: WebhookFaults) -> None:
        config = self.config()
        rng = secrets.SystemRandom()
        if event in faults.drop or rng.random() < config.p_webhook_drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if faults.duplicate or rng.random() < config.p_webhook_duplicate else 1
        delay = faults.delay if faults.delay is not None else config.webhook_delay
        webhook_id = f"msg_{secrets.token_hex(12)}"
        payload = orjson.dumps(body)
        for _ in range(copies):
            task = asyncio.get_running_loop().create_task(self._deliver(url, webhook_id, payload, delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, webhook_id: str, payload: bytes, delay: float) -> None:
        config = self.config()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        pause = config.webhook_retry_seconds
        for attempt in range(config.webhook_retries + 1):
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, webhook_id, timestamp, payload),
            }
            try:
                response = await self._client.post(url, content=payload, headers=headers)
                if 200 <= response.status_code < 300:
                    self.stats["delivered"] += 1
                    return
                self.stats[f"answered_{response.status_code}"] += 1
            except httpx.HTTPError:
                self.stats["unreachable"] += 1
            if attempt < config.webhook_retries:
                self.stats["retried"] += 1
                await asyncio.sleep(pause)
                pause *= 2
        self.stats["gave_up"] += 1

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
