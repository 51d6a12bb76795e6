"""Webhooks from the fake, as fal sends them: one POST when a request completes, signed with ED25519,
retried, and on demand late, twice or never.

A submit with ``?fal_webhook=URL`` gets one delivery when the request completes:
``{"request_id", "gateway_request_id", "status": "OK", "payload": <the result>}``, or ``"status": "ERROR"``
with ``"error": "Invalid status code: N"`` and the error body as ``payload``. Its headers are
``X-Fal-Webhook-Request-Id``, ``X-Fal-Webhook-User-Id``, ``X-Fal-Webhook-Timestamp`` (unix seconds) and
``X-Fal-Webhook-Signature``: the hex ED25519 signature of
``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256 hex of the body}"``, made with the key whose public
half ``GET /.well-known/jwks.json`` serves (the real one: ``https://rest.alpha.fal.ai/.well-known/jwks.json``).
The key is derived from a fixed seed, so it is the same after a restart.

A delivery answered with anything but 2xx, or not at all, is retried ``webhook_retries`` times,
``webhook_retry_seconds`` apart, doubling (a retry is signed again, with a new timestamp). Faults
(FakeFalConfig, or per prompt): ``webhook_delay`` / ``[[webhook:delay=S]]``; ``p_webhook_duplicate`` /
``[[webhook:duplicate]]`` sends it twice; ``p_webhook_drop`` / ``[[webhook:drop]]`` never sends it.
Counted in ``/_fake/stats`` under ``webhooks``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import orjson
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

_DIRECTIVE: Final = re.compile(r"\[\[\s*webhook:\s*(drop|duplicate|delay)\s*(?:=\s*([\d.]+))?\s*\]\]")
KEY_SEED: Final = hashlib.sha256(b"mediagen-fake-fal-webhook-key").digest()
KEY_ID: Final = "fake-fal-" + hashlib.sha256(KEY_SEED).hexdigest()[:16]


class Signer:
    """The fake's ED25519 webhook key: signs deliveries and publishes its public half as a JWKS."""

    def __init__(self, seed: bytes = KEY_SEED) -> None:
        self._key = ECC.construct(curve="Ed25519", seed=seed)

    def public_raw(self) -> bytes:
        raw: bytes = self._key.public_key().export_key(format="raw")
        return raw

    def jwks(self) -> dict[str, Any]:
        x = base64.urlsafe_b64encode(self.public_raw()).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": KEY_ID, "use": "sig", "alg": "EdDSA"}]}

    def headers(self, request_id: str, user_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        message = "\n".join([request_id, user_id, str(timestamp), hashlib.sha256(body).hexdigest()]).encode()
        signature: bytes = eddsa.new(self._key, "rfc8032").sign(message)
        return {
            "content-type": "application/json",
            "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": user_id,
            "x-fal-webhook-timestamp": str(timestamp),
            "x-fal-webhook-signature": signature.hex(),
        }


class WebhookFaults:
    """What a prompt's ``[[webhook:...]]`` directives ask for."""

    def __init__(self, prompt: str) -> None:
        self.drop = False
        self.duplicate = False
        self.delay: float | None = None
        for kind, value in _DIRECTIVE.findall(prompt):
            if kind == "drop":
                self.drop = True
            elif kind == "duplicate":
                self.duplicate = True
            elif value:
                self.delay = float(value)


def webhook_body(request_id: str, status_code: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """What fal POSTs when a request ends: its result (status OK) or its error (status ERROR)."""
    sent: dict[str, Any] = {"request_id": request_id, "gateway_request_id": request_id}
    if status_code == 200:
        return {**sent, "status": "OK", "payload": dict(body)}
    return {**sent, "status": "ERROR", "error": f"Invalid status code: {status_code}", "payload": dict(body)}


class WebhookSender:
    """Background deliveries: one task per request followed, one per delivery."""

    def __init__(self, signer: Signer, config: Callable[[], Any]) -> None:
        self.signer = signer
        self.config = config
        self.stats: Counter[str] = Counter()
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(
        self, url: str, request_id: str, prompt: str, wait: Callable[[], Any], ending: Callable[[], Any]
    ) -> None:
        """When ``wait()`` returns (the request is done), send ``ending()`` = (status code, body) to ``url``."""
        self._spawn(self._follow(url, request_id, WebhookFaults(prompt), wait, ending))

    async def _follow(
        self, url: str, request_id: str, faults: WebhookFaults, wait: Callable[[], Any], ending: Callable[[], Any]
    ) -> None:
        await wait()
        status_code, body = ending()
        config = self.config()
        rng = secrets.SystemRandom()
        if faults.drop or rng.random() < config.p_webhook_drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if faults.duplicate or rng.random() < config.p_webhook_duplicate else 1
        delay = faults.delay if faults.delay is not None else config.webhook_delay
        payload = orjson.dumps(webhook_body(request_id, status_code, body))
        for _ in range(copies):
            self._spawn(self._deliver(url, request_id, payload, delay))

    async def _deliver(self, url: str, request_id: str, payload: bytes, delay: float) -> None:
        config = self.config()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        pause = config.webhook_retry_seconds
        for attempt in range(config.webhook_retries + 1):
            headers = self.signer.headers(request_id, config.user_id, int(time.time()), payload)
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

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
