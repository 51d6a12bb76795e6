"""The retention sweep: with MEDIAGEN_RETENTION_DAYS set, each worker process prunes old jobs every
MEDIAGEN_RETENTION_SWEEP_SECONDS (what is deleted, and how, is mediagen.core.jobs.retention's).

Several processes may prune at once: each batch takes its jobs with SKIP LOCKED, so they share the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.logging import log_event
from mediagen.storage import Storage
from mediagen.worker.background import Background


class RetentionSweep(Background):
    name = "retention-sweep"

    def __init__(self, db: Database, storage: Storage, *, days: float, interval: float, batch: int) -> None:
        self.db = db
        self.storage = storage
        self.older_than = timedelta(days=days)
        self.interval = interval
        self.batch = batch

    async def prune_once(self) -> jobs.Pruned:
        started = time.monotonic()
        pruned = await jobs.prune(
            self.db, older_than=self.older_than, delete_media=self.storage.delete, batch=self.batch, pause_seconds=0.01
        )
        if pruned.jobs:
            log_event(
                "retention.pruned",
                jobs=pruned.jobs,
                media_files=pruned.media_files,
                batches=pruned.batches,
                seconds=round(time.monotonic() - started, 3),
            )
        return pruned

    async def _run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception:  # the next pass goes on from where this one stopped
                log_event("retention.failed", logging.WARNING, exc_info=True)
            await asyncio.sleep(self.interval)
