"""Group commit for submissions: many concurrent `POST /generate` share one INSERT and one enqueue.

Each request still gets its answer only after its job row is committed (the job row is the truth)
and its message sent (or the send failed, which the recovery sweep repairs). While one batch is being
written, the requests that arrive queue up and form the next batch, so a lone request waits for
nobody, and under load the cost of a commit and a Redis round trip is shared by dozens of jobs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from mediagen.broker import Dispatcher
from mediagen.core import deliveries, jobs
from mediagen.core.db import Database
from mediagen.logging import log_event


class Submissions:
    def __init__(self, db: Database, dispatcher: Dispatcher, *, max_batch: int = 256) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.max_batch = max_batch
        self._waiting: list[tuple[jobs.NewJob, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, job: jobs.NewJob) -> bool:
        """Commit and enqueue `job`; False when its (owner, idempotency key) was taken already."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            try:
                inserted = await self._write(batch)
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            for job, future in batch:
                if not future.done():
                    future.set_result(job.id in inserted)

    async def _write(self, batch: list[tuple[jobs.NewJob, asyncio.Future[bool]]]) -> set[uuid.UUID]:
        async with self.db.transaction() as conn:
            inserted = await jobs.create_jobs(conn, [job for job, _ in batch])
            hooked = [
                deliveries.Subscription(job.id, job.webhook_url, job.webhook_events)
                for job, _ in batch
                if job.webhook_url is not None and job.id in inserted
            ]
            if hooked:
                await deliveries.subscribe(conn, hooked)
        if inserted:
            try:
                await self.dispatcher.send(sorted(inserted, key=str))
            except Exception as exc:
                # The jobs are committed: the workers' recovery sweep will send them within seconds.
                log_event("job.dispatch.deferred", logging.WARNING, jobs=len(inserted), error=type(exc).__name__)
        return inserted
