"""The allowed models' schemas: shipped snapshots first, then what Replicate says, refreshed in the background.

The submit path only reads memory (`Catalog.get`): it never waits on Replicate or Redis. A refresher
task (`Catalog.run_refresh`) reads each model from Replicate every `period` seconds, through a
cache in Redis shared by every API process (one fetch per period for the whole deployment, and a
restarted process starts from the last good schema). A fetch that fails, or answers a schema we
cannot use, changes nothing: the last good schema stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any

from redis.asyncio import Redis

from mediagen.catalog.schema import ModelSchema
from mediagen.logging import log_event

Fetch = Callable[[str], Awaitable[tuple[str | None, dict[str, Any]]]]
"""model → (version id, openapi_schema) from Replicate's `GET /v1/models/{owner}/{name}`."""


def snapshot_name(model: str) -> str:
    return model.replace("/", "__") + ".json"


def load_snapshot(model: str) -> ModelSchema | None:
    """The schema shipped in the package for `model`, or None when there is none."""
    path = resources.files("mediagen.catalog").joinpath("snapshots", snapshot_name(model))
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return ModelSchema.from_openapi(model, doc.get("version"), doc["openapi_schema"], source="snapshot")


class Catalog:
    def __init__(self, models: Iterable[str], *, redis: Redis | None = None, namespace: str = "mediagen") -> None:
        self.models = list(dict.fromkeys(models))
        self.redis = redis
        self.namespace = namespace
        self._schemas: dict[str, ModelSchema] = {}
        for model in self.models:
            snapshot = load_snapshot(model)
            if snapshot is not None:
                self._schemas[model] = snapshot

    def get(self, model: str) -> ModelSchema | None:
        return self._schemas.get(model)

    def cache_key(self, model: str) -> str:
        return f"{self.namespace}:catalog:{model}"

    def _adopt(self, model: str, version: str | None, openapi: dict[str, Any], source: str, fetched_at: float) -> bool:
        try:
            schema = ModelSchema.from_openapi(model, version, openapi, source=source, fetched_at=fetched_at)
        except Exception as error:  # a schema we cannot use must not replace one we can
            log_event("catalog.schema.unusable", logging.WARNING, model=model, source=source, error=str(error)[:300])
            return False
        self._schemas[model] = schema
        return True

    async def load_cached(self) -> None:
        """Adopt what an earlier fetch (by any API process) left in Redis."""
        if self.redis is None:
            return
        for model in self.models:
            try:
                raw = await self.redis.get(self.cache_key(model))
            except Exception as error:
                log_event("catalog.cache.unavailable", logging.WARNING, error=type(error).__name__)
                return
            if raw:
                doc = json.loads(raw)
                current = self._schemas.get(model)
                if current is not None and current.fetched_at == float(doc["fetched_at"]):
                    continue  # the one we have: keep its compiled validator
                self._adopt(model, doc.get("version"), doc["openapi_schema"], "replicate", float(doc["fetched_at"]))

    async def refresh(self, fetch: Fetch, *, period: float, fetch_seconds: float = 10.0) -> bool:
        """One pass: fetch every model whose schema is older than `period`. True when nothing failed."""
        await self.load_cached()
        ok = True
        now = time.time()
        for model in self.models:
            current = self._schemas.get(model)
            if current is not None and current.fetched_at is not None and now - current.fetched_at < period:
                continue
            _stop_if_canceled()
            try:
                version, openapi = await asyncio.wait_for(fetch(model), fetch_seconds)
            except Exception as error:
                ok = False
                log_event(
                    "catalog.refresh_failed",
                    logging.WARNING,
                    model=model,
                    error=type(error).__name__,
                    detail=str(error)[:300],
                    kept=current.source if current else None,
                )
                continue
            if not self._adopt(model, version, openapi, "replicate", now):
                ok = False
                continue
            if self.redis is not None:
                doc = {"version": version, "openapi_schema": openapi, "fetched_at": now}
                try:
                    await self.redis.set(self.cache_key(model), json.dumps(doc), ex=int(max(period * 24, 3600)))
                except Exception as error:
                    log_event("catalog.cache.unavailable", logging.WARNING, error=type(error).__name__)
            log_event("catalog.schema.refreshed", model=model, version=version)
        return ok

    async def run_refresh(self, fetch: Fetch, *, period: float, retry: float = 30.0) -> None:
        """Refresh forever: every `period` seconds, sooner (`retry`) after a pass with failures."""
        while True:
            try:
                ok = await self.refresh(fetch, period=period)
            except Exception as error:  # never let the refresher die: the last good schema stays
                log_event("catalog.refresh_failed", logging.WARNING, error=type(error).__name__)
                ok = False
            _stop_if_canceled()
            await asyncio.sleep(period if ok else min(retry, period))


def _stop_if_canceled() -> None:
    """Python 3.11's `wait_for` swallows a cancel that lands as its fetch ends with an error (gh-86296):
    the refresher would go on forever, and the process's shutdown would wait for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
