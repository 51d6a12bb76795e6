"""Optional API keys (`MEDIAGEN_API_KEYS`): who is calling, and which jobs they may see.

Without keys every caller is the same anonymous owner (the API says so in its startup log). With
keys, every route but health needs `Authorization: Bearer <key>`; a job belongs to the key that made
it, recorded as a digest of the key (never the key itself), and is invisible to other keys.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from mediagen.core.errors import MediagenError

ANONYMOUS = ""


class Unauthorized(MediagenError):
    pass


def owner_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [(key.encode(), owner_id(key)) for key in keys if key]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str:
        """The owner id for this Authorization header; raises Unauthorized."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("send Authorization: Bearer <api key>")
        found = None
        candidate = presented.strip().encode()
        for key, owner in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(candidate, key):
                found = owner
        if found is None:
            raise Unauthorized("unknown API key")
        return found


async def current_owner(request: Request) -> str:
    keyring: KeyRing = request.app.state.api.keyring
    return keyring.owner(request.headers.get("authorization"))


Owner = Annotated[str, Depends(current_owner)]


def visible_to(owner: str) -> str | None:
    """The owner filter for reads: None (everything) when auth is off."""
    return owner if owner != ANONYMOUS else None
