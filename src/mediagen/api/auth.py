"""API keys: who is calling, and which jobs they may see.

Keys come from two places. `mediagen keys create` makes keys as data (mediagen.core.keys: hashed, each
with its limits and webhook secret; revoked without a restart). `MEDIAGEN_API_KEYS` still works as the
bootstrap of existing setups: such a key's owner is a digest of the key, as it always was.

Without any key (none in the setting, none ever made) every caller is the same anonymous owner (the
API says so in its startup log). Once a key exists, every route but health needs
`Authorization: Bearer <key>`, and a job belongs to the key that made it and is invisible to other
keys. An API that started without keys looks again at most once a second, so the first key made
turns auth on without a restart; revoking every key never turns it off.

A presented key is looked up by its SHA-256: the setting's keys in memory, the table's through a small
cache (`TTL_SECONDS`, one second, answers and refusals alike), so a revocation reaches every API process
within a second and a busy key costs one indexed lookup a second per process (about half a
millisecond), paid by one request while the others waiting on it share the answer. The last use of
each key is written by a background flush once a minute, never in a request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from mediagen.core import keys
from mediagen.core.db import Database
from mediagen.core.errors import MediagenError
from mediagen.logging import log_event

ANONYMOUS = ""
TTL_SECONDS = 1.0
"""How long a looked-up key (or a refusal) is trusted: the longest a revoked key keeps working."""
TOUCH_SECONDS = 60.0
MAX_CACHED = 10_000
"""Entries before the cache starts over (random keys from a scanner must not grow it without bound)."""


class Unauthorized(MediagenError):
    pass


def owner_id(key: str) -> str:
    """The owner of a key of MEDIAGEN_API_KEYS (what its jobs have always carried)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyRing:
    def __init__(
        self, static: list[str], db: Database | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._static = {
            keys.digest(key): keys.Caller(uuid.UUID(int=0), owner_id(key), None, None, None) for key in static if key
        }
        self._db = db
        self._clock = clock
        self._issued = False
        """A key has been made in the table (once seen, for good: revoked keys count)."""
        self._issued_checked: float | None = None
        """When the table was last found without a key (None: not yet known)."""
        self._cache: dict[bytes, tuple[float, keys.Caller | None]] = {}
        self._pending: dict[bytes, asyncio.Future[keys.Caller | None]] = {}
        """Lookups on their way, shared by the requests presenting the same key meanwhile."""
        self._callers: dict[str, keys.Caller] = {}
        """owner -> the caller as last resolved: its limits, for mediagen.api.limits."""
        self._used: set[uuid.UUID] = set()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Is a key needed? (As last seen: see `refresh`.)"""
        return bool(self._static) or self._issued

    async def refresh(self) -> bool:
        """Look whether a key has been made since the last look (at most once a second); `enabled`."""
        if self.enabled or self._db is None:
            return self.enabled
        now = self._clock()
        if self._issued_checked is not None and now - self._issued_checked < TTL_SECONDS:
            return False
        try:
            self._issued = await keys.any_issued(self._db)
        except Exception:
            if self._issued_checked is None:
                raise  # not known whether keys are needed: no answer (503) rather than an open door
            self._issued_checked = now  # known a moment ago: keep it, look again in a second
            return False
        self._issued_checked = now
        return self.enabled

    def caller(self, owner: str) -> keys.Caller | None:
        """The table's key behind `owner` as last resolved (None: anonymous or a key of the setting)."""
        return self._callers.get(owner)

    async def owner(self, authorization: str | None) -> str:
        """The owner id for this Authorization header; raises Unauthorized."""
        if not self.enabled and not await self.refresh():
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("send Authorization: Bearer <api key>")
        key_digest = keys.digest(presented.strip())
        found = self._static.get(key_digest)
        if found is None and self._db is not None:
            found = await self._lookup(key_digest)
            if found is not None:
                self._callers[found.owner] = found
                self._used.add(found.id)
        if found is None:
            raise Unauthorized("unknown API key")
        return found.owner

    async def _lookup(self, key_digest: bytes) -> keys.Caller | None:
        cached = self._cache.get(key_digest)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        pending = self._pending.get(key_digest)
        if pending is None:
            # A task of its own: the requests that wait on it share it, and one of them going away
            # (a client that hung up) cancels none of the others' answer.
            pending = self._pending[key_digest] = asyncio.ensure_future(self._resolve(key_digest))
            pending.add_done_callback(_retrieve)
        return await asyncio.shield(pending)

    async def _resolve(self, key_digest: bytes) -> keys.Caller | None:
        try:
            assert self._db is not None
            found = await keys.resolve(self._db, key_digest)
        finally:
            del self._pending[key_digest]
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key_digest] = (self._clock() + TTL_SECONDS, found)
        return found

    def start(self) -> None:
        """Flush the keys' last use every `TOUCH_SECONDS`, in the background."""
        if self._db is not None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="api-keys-last-used")

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        used, self._used = self._used, set()
        if not used or self._db is None:
            return
        try:
            await keys.touch(self._db, used)
        except Exception as error:  # a last-use time is worth no error: the next minute writes it
            log_event("api.keys.touch_failed", logging.WARNING, error=repr(error))

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()


def _retrieve(task: asyncio.Future[keys.Caller | None]) -> None:
    """A failed lookup every waiter left is no "exception never retrieved" warning."""
    if not task.cancelled():
        task.exception()


async def current_owner(request: Request) -> str:
    keyring: KeyRing = request.app.state.api.keyring
    return await keyring.owner(request.headers.get("authorization"))


Owner = Annotated[str, Depends(current_owner)]


def visible_to(owner: str) -> str | None:
    """The owner filter for reads: None (everything) when auth is off."""
    return owner if owner != ANONYMOUS else None
