"""Is this webhook from Replicate? The client's own `Webhooks.validate`, with the account's secret, cached.

Replicate signs each webhook the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
`webhook-signature`, HMAC-SHA256 of the raw body, shared/replicate-api.md §1.7). We check it with
`replicate`'s `Webhooks.validate`, keeping to its quirks (shared/replicate-models.md §6): the secret
must be a `WebhookSigningSecret`, the body the raw bytes decoded (never re-serialised JSON), and the
tolerance given explicitly, since its default (None) skips the timestamp check and with it the
protection against replays. The secret is `MEDIAGEN_REPLICATE_WEBHOOK_SECRET`, else fetched once from
`GET /v1/webhooks/default/secret` and kept for the life of the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import replicate
from replicate.webhook import Webhooks, WebhookSigningSecret, WebhookValidationError

from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable


class WebhookVerifier:
    def __init__(
        self,
        *,
        api_token: str | None,
        base_url: str | None,
        tolerance_seconds: int,
        secret: str | None = None,
        fetch_timeout: float = 5.0,
    ) -> None:
        self.tolerance_seconds = tolerance_seconds
        self._secret = WebhookSigningSecret(key=secret) if secret else None
        self._client = replicate.Client(api_token=api_token, base_url=base_url)  # type: ignore[attr-defined]
        self._fetch_timeout = fetch_timeout
        self._lock = asyncio.Lock()

    async def secret(self) -> WebhookSigningSecret:
        if self._secret is None:
            async with self._lock:
                if self._secret is None:
                    try:
                        self._secret = await asyncio.wait_for(
                            self._client.webhooks.default.async_secret(), self._fetch_timeout
                        )
                    except Exception as error:
                        raise WebhookSecretUnavailable(f"cannot fetch the webhook secret: {error!r}") from error
        return self._secret

    async def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Return if `body` with these headers was signed by Replicate within the tolerance; else raise."""
        secret = await self.secret()
        wanted = {name: headers.get(name, "") for name in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        try:
            text = body.decode()
            Webhooks.validate(headers=wanted, body=text, secret=secret, tolerance=self.tolerance_seconds)
        except (WebhookValidationError, UnicodeDecodeError, ValueError) as error:
            raise WebhookRejected(f"{type(error).__name__}: {error}") from error

    async def aclose(self) -> None:
        if self._client._async_client is not None:
            await self._client._async_client.aclose()
