"""The recovery sweep: the database is the truth, the broker only delivers.

The jobs it ends or takes are chosen and changed by the job's domain (mediagen.core.jobs.sweeps); this
module runs it periodically and does the broker's part.

Every worker process runs it every `sweep_interval_seconds`; it is safe to run in many processes at
once (rows are taken with `FOR UPDATE SKIP LOCKED` and stamped, so two sweeps never take the same
job). Each pass:

* fails jobs that are still waiting when their deadline has passed;
* re-sends jobs whose message was lost: `queued` (or `retrying` and due) for more than
  `stale_dispatch_seconds` with no message for them left in Redis (a flushed or restarted Redis, an
  enqueue that failed after the job was committed). Messages carry the job id as their Redis id, so
  "is there a message?" is a lookup, not a guess;
* re-sends `running` jobs whose lease expired (their worker died): the next claim closes the dead
  attempt as `abandoned` and resumes its prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mediagen.broker import Dispatcher
from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.logging import log_event


class Sweeper:
    def __init__(
        self,
        db: Database,
        dispatcher: Dispatcher,
        *,
        interval: float,
        stale_seconds: float,
        batch: int = 500,
    ) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.interval = interval
        self.stale_seconds = stale_seconds
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recovery-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def sweep_once(self) -> dict[str, int]:
        """One pass; returns how many jobs it expired and re-sent."""
        expired = await jobs.fail_overdue(self.db, batch=self.batch)
        for job_id in expired:
            log_event("job.failed", job_id=str(job_id), error_class="JobDeadlineExceeded", swept=True)
        stale = await jobs.take_stale(self.db, stale_seconds=self.stale_seconds, batch=self.batch)
        waiting = [s.job_id for s in stale if s.status != "running"]
        orphans = [s.job_id for s in stale if s.status == "running"]
        if waiting:
            present = await self.dispatcher.pending(waiting)
            lost = [job_id for job_id, live in zip(waiting, present, strict=True) if not live]
        else:
            lost = []
        resend = lost + orphans
        if resend:
            await self.dispatcher.send(resend)
            for job_id in lost:
                log_event("job.redispatched", job_id=str(job_id), reason="message_lost")
            for job_id in orphans:
                log_event("job.redispatched", job_id=str(job_id), reason="lease_expired")
        return {"expired": len(expired), "lost": len(lost), "orphaned": len(orphans)}

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log_event("worker.sweep.failed", logging.WARNING, exc_info=True)
            await asyncio.sleep(self.interval)
