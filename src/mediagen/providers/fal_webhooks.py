"""Is this webhook from fal? Its ED25519 signature, checked against the keys fal publishes (a JWKS), cached.

fal signs each webhook (docs.fal.ai, "Verifying your webhook"): `X-Fal-Webhook-Signature` is the hex
ED25519 signature of ``"{X-Fal-Webhook-Request-Id}\\n{X-Fal-Webhook-User-Id}\\n{X-Fal-Webhook-Timestamp}\\n"``
followed by the sha256 hex digest of the raw body, by one of the keys of the JWKS at
``https://rest.alpha.fal.ai/.well-known/jwks.json`` (``OKP``/``Ed25519`` keys, ``x`` base64url). The
timestamp must be within `tolerance_seconds` of now, which bounds replays; the caller keeps each
request id once to drop the duplicates fal's retries make. The JWKS is fetched once and kept for
`cache_seconds` (fal suggests up to a day); a signature no cached key verifies makes one early refetch
(at most a minute apart), for a key fal has just rotated in. The fake fal serves its own JWKS at
``/.well-known/jwks.json``.

Errors are the ones Replicate's webhooks raise (`mediagen.providers.base`): `WebhookRejected` (401)
and `WebhookSecretUnavailable` (503, fal retries), so a route answers both providers alike.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Mapping
from typing import Any, Final

import httpx
from Crypto.Signature import eddsa

from mediagen.providers.base import WebhookRejected, WebhookSecretUnavailable

FAL_JWKS_URL: Final = "https://rest.alpha.fal.ai/.well-known/jwks.json"
HEADERS: Final = ("x-fal-webhook-request-id", "x-fal-webhook-user-id", "x-fal-webhook-timestamp")
REFETCH_SECONDS: Final = 60.0


def message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """What fal signs for one delivery."""
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


def _keys(jwks: Any) -> list[bytes]:
    """The raw ED25519 public keys of a JWKS."""
    found = []
    for key in jwks.get("keys", []) if isinstance(jwks, dict) else []:
        if isinstance(key, dict) and key.get("kty") == "OKP" and key.get("crv") == "Ed25519":
            x = str(key.get("x", ""))
            try:
                raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 32:
                found.append(raw)
    return found


def _verifies(raw_key: bytes, signed: bytes, signature: bytes) -> bool:
    try:
        eddsa.new(eddsa.import_public_key(raw_key), "rfc8032").verify(signed, signature)
    except ValueError:
        return False
    return True


class FalWebhookVerifier:
    def __init__(
        self,
        *,
        jwks_url: str = FAL_JWKS_URL,
        tolerance_seconds: int = 300,
        cache_seconds: float = 86400.0,
        user_id: str | None = None,
        fetch_timeout: float = 5.0,
    ) -> None:
        self.jwks_url = jwks_url
        self.tolerance_seconds = tolerance_seconds
        self.cache_seconds = cache_seconds
        self.user_id = user_id
        """When set, a webhook signed for another fal user is refused."""
        self._fetch_timeout = fetch_timeout
        self._keys: list[bytes] = []
        self._fetched_at = -1e12
        self._lock = asyncio.Lock()

    async def _fetch(self) -> list[bytes]:
        try:
            async with httpx.AsyncClient(timeout=self._fetch_timeout) as http:
                answer = await http.get(self.jwks_url)
                answer.raise_for_status()
                keys = _keys(answer.json())
        except (httpx.HTTPError, ValueError) as error:
            raise WebhookSecretUnavailable(f"cannot fetch fal's webhook keys: {error!r}") from error
        if not keys:
            raise WebhookSecretUnavailable(f"no ED25519 key in fal's JWKS at {self.jwks_url}")
        self._keys, self._fetched_at = keys, time.monotonic()
        return keys

    async def keys(self, *, fresh: bool = False) -> list[bytes]:
        """The cached keys; fetched when none are, they are too old, or `fresh` and the last fetch is a minute old."""
        age = time.monotonic() - self._fetched_at
        if self._keys and age < self.cache_seconds and not (fresh and age >= REFETCH_SECONDS):
            return self._keys
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if self._keys and age < self.cache_seconds and not (fresh and age >= REFETCH_SECONDS):
                return self._keys
            return await self._fetch()

    async def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> str:
        """The fal request id of a genuine delivery; `WebhookRejected` for anything else."""
        lowered = {key.lower(): value for key, value in headers.items()}
        try:
            request_id, user_id, timestamp = (lowered[name] for name in HEADERS)
            signature = bytes.fromhex(lowered["x-fal-webhook-signature"])
            sent_at = int(timestamp)
        except (KeyError, ValueError) as error:
            raise WebhookRejected(f"not a signed fal webhook: {error!r}") from error
        if abs((time.time() if now is None else now) - sent_at) > self.tolerance_seconds:
            raise WebhookRejected("a fal webhook signed too long ago (or in the future)")
        if self.user_id is not None and user_id != self.user_id:
            raise WebhookRejected("a fal webhook for another fal user")
        signed = message(request_id, user_id, timestamp, body)
        if any(_verifies(key, signed, signature) for key in await self.keys()):
            return request_id
        if any(_verifies(key, signed, signature) for key in await self.keys(fresh=True)):
            return request_id
        raise WebhookRejected("a fal webhook whose signature no key of fal's JWKS verifies")
