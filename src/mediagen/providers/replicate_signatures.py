"""Is this webhook from Replicate? The client's own `Webhooks.validate`, with the account's secret, cached.

Replicate signs each webhook the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
`webhook-signature`, HMAC-SHA256 of the raw body, shared/replicate-api.md §1.7). We check it with
`replicate`'s `Webhooks.validate`, keeping to its quirks (shared/replicate-models.md §6): the secret
must be a `WebhookSigningSecret`, the body the raw bytes decoded (never re-serialised JSON), and the
tolerance given explicitly, since its default (None) skips the timestamp check and with it the
protection against replays. The secret is `MEDIAGEN_REPLICATE_WEBHOOK_SECRET`, else fetched from
`GET /v1/webhooks/default/secret` and kept.

The configured secret's format (`whsec_` and a base64 key) is checked once, when the process starts: a
malformed one is reported then (`webhook.secret_invalid`) and the secret is fetched from Replicate
instead. A signature that does not verify makes one refetch of the secret (a rotated secret), at most
every `REFETCH_SECONDS`; a new secret is kept (`webhook.secret_refetched`) and the webhook checked again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from collections.abc import Mapping

import replicate
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret, WebhookValidationError

from mediagen.logging import log_event
from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable

REFETCH_SECONDS = 60.0
_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def secret_problem(key: str) -> str | None:
    """What is wrong with a webhook secret (None: it is `whsec_` and a base64 key)."""
    prefix, _, encoded = key.partition("_")
    if prefix != "whsec" or not encoded or "_" in encoded:
        return "it is not `whsec_` followed by a base64 key"
    try:
        base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return "its key after `whsec_` is not base64"
    return None


class WebhookVerifier:
    def __init__(
        self,
        *,
        api_token: str | None,
        base_url: str | None,
        tolerance_seconds: int,
        secret: str | None = None,
        fetch_timeout: float = 5.0,
        refetch_seconds: float = REFETCH_SECONDS,
    ) -> None:
        self.tolerance_seconds = tolerance_seconds
        self._secret: WebhookSigningSecret | None = None
        if secret:
            problem = secret_problem(secret)
            if problem is None:
                self._secret = WebhookSigningSecret(key=secret)
            else:
                log_event(
                    "webhook.secret_invalid",
                    logging.ERROR,
                    setting="MEDIAGEN_REPLICATE_WEBHOOK_SECRET",
                    error=f"{problem}; the secret is fetched from Replicate instead",
                )
        self._client = replicate.Client(api_token=api_token, base_url=base_url)  # type: ignore[attr-defined]
        self._fetch_timeout = fetch_timeout
        self._refetch_seconds = refetch_seconds
        self._refetched_at = -math.inf
        self._lock = asyncio.Lock()

    async def _fetch(self) -> WebhookSigningSecret:
        try:
            secret = await asyncio.wait_for(self._client.webhooks.default.async_secret(), self._fetch_timeout)
        except Exception as error:
            raise WebhookSecretUnavailable(f"cannot fetch the webhook secret: {error!r}") from error
        problem = secret_problem(secret.key)
        if problem is not None:
            raise WebhookSecretUnavailable(f"Replicate's webhook secret is malformed: {problem}")
        return secret

    async def secret(self) -> WebhookSigningSecret:
        if self._secret is None:
            async with self._lock:
                if self._secret is None:
                    self._secret = await self._fetch()
        return self._secret

    async def _refetched(self, stale: WebhookSigningSecret) -> WebhookSigningSecret | None:
        """The secret again from Replicate if it changed (rotated); None if it did not, or a refetch is
        not due yet (one every `refetch_seconds`), or Replicate does not answer."""
        async with self._lock:
            if self._secret is not None and self._secret.key != stale.key:
                return self._secret  # another webhook refetched it meanwhile
            now = time.monotonic()
            if now - self._refetched_at < self._refetch_seconds:
                return None
            self._refetched_at = now
            try:
                fresh = await self._fetch()
            except WebhookSecretUnavailable as unavailable:
                log_event("webhook.secret_unavailable", logging.WARNING, error=unavailable.message)
                return None
            if fresh.key == stale.key:
                return None
            self._secret = fresh
            log_event("webhook.secret_refetched")
            return fresh

    async def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Return if `body` with these headers was signed by Replicate within the tolerance; else raise."""
        secret = await self.secret()
        wanted = {name: headers.get(name, "") for name in _HEADERS}
        try:
            text = body.decode()
        except UnicodeDecodeError as error:
            raise WebhookRejected(f"{type(error).__name__}: {error}") from error
        try:
            self._validate(wanted, text, secret)
        except WebhookRejected as refused:
            if not isinstance(refused.__cause__, InvalidSignatureError):
                raise
            fresh = await self._refetched(secret)
            if fresh is None:
                raise
            self._validate(wanted, text, fresh)

    def _validate(self, headers: dict[str, str], text: str, secret: WebhookSigningSecret) -> None:
        try:
            Webhooks.validate(headers=headers, body=text, secret=secret, tolerance=self.tolerance_seconds)
        except (WebhookValidationError, ValueError) as error:
            raise WebhookRejected(f"{type(error).__name__}: {error}") from error

    async def aclose(self) -> None:
        if self._client._async_client is not None:
            await self._client._async_client.aclose()
