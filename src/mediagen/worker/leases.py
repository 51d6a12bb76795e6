"""Leases on running jobs, renewed in bulk: one UPDATE per worker process per renewal, not per job.

Each running job registers a `Hold`. Every `lease_seconds / 3` the keeper extends the lease of every
job this process holds, in one statement that also reads back `cancel_requested`
(mediagen.core.jobs.leases). A job missing from
the answer has been taken over (its lease had expired and another worker claimed it); the keeper tells
its runner to stop (`LeaseLost`). A cancel request is passed on the same way (`JobCanceled`).

When renewals fail because PostgreSQL is unreachable for longer than a lease, the leases run out and
another worker may take the jobs over once the database is back. The keeper remembers the outage, so
the runners it then stops hear `LeaseExpired`, which says so, rather than a plain `LeaseLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mediagen.core import jobs
from mediagen.core.db import Database, is_unreachable
from mediagen.core.errors import JobCanceled, LeaseExpired, LeaseLost, MediagenError
from mediagen.logging import log_event
from mediagen.providers.base import giving_up
from mediagen.worker.background import Background

T = TypeVar("T")


@dataclass
class Hold:
    job_id: uuid.UUID
    token: uuid.UUID
    stop: MediagenError | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[Any] | None = None
    """The runner's task while it is in a read it may give up (`read`)."""

    def tell(self, reason: MediagenError) -> None:
        if self.stop is None:
            self.stop = reason
            self.wake.set()
            if self.reader is not None:
                self.reader.cancel()

    def check(self) -> None:
        """Raise the reason this job must stop, if there is one."""
        if self.stop is not None:
            raise self.stop

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.check()

    async def read(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, given up the moment the job is told to stop, which is then raised. For reads only:
        a create cut off after it went out would leave its prediction unknown. (The task is canceled
        from `tell`: no task of its own per read, which the poll loop would pay for on every look.)"""
        self.check()
        task = asyncio.current_task()
        self.reader = task
        return await self._until_told(task, call)

    async def create(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, a create: given up when told to stop only while the provider waits before sending
        (mediagen.providers.base.unsent, e.g. for a rate-limit token), never once its request may
        have gone out."""
        self.check()
        task = asyncio.current_task()

        def mark(waiting: bool) -> None:
            if waiting:
                self.check()  # told already: give up before waiting at all
            self.reader = task if waiting else None

        with giving_up(mark):
            return await self._until_told(task, call)

    async def _until_told(self, task: asyncio.Task[Any] | None, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` on `task`: the cancel `tell` sent it is raised as the reason to stop, any other cancel
        as itself; no reader is left behind."""
        try:
            return await call()
        except asyncio.CancelledError:
            if self.stop is None or task is None:
                raise
            task.uncancel()
            raise self.stop from None
        finally:
            self.reader = None


class LeaseKeeper(Background):
    name = "lease-keeper"

    def __init__(self, db: Database, *, lease_seconds: float) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.holds: dict[uuid.UUID, Hold] = {}
        self._renewed_at = time.monotonic()
        """When the last renewal that reached the database was sent."""
        self._outage: str | None = None
        """Why renewals have failed since then: the database could not be reached."""

    def hold(self, job_id: uuid.UUID, token: uuid.UUID) -> Hold:
        hold = Hold(job_id, token)
        self.holds[job_id] = hold
        return hold

    def drop(self, hold: Hold) -> None:
        if self.holds.get(hold.job_id) is hold:
            del self.holds[hold.job_id]

    def tell_all(self, reason: MediagenError) -> None:
        for hold in list(self.holds.values()):
            hold.tell(reason)

    async def renew(self) -> None:
        holds = list(self.holds.values())
        sent = time.monotonic()
        if not holds:
            self._renewed(sent)
            return
        try:
            alive = await jobs.renew_leases(
                self.db, [(h.job_id, h.token) for h in holds], lease_seconds=self.lease_seconds
            )
        except Exception as error:
            if is_unreachable(error):
                self._outage = self._outage or _first_line(error)
            raise
        lost = self._lost_reason(sent)
        self._renewed(sent)
        for hold in holds:
            if hold.job_id not in alive:
                if self.holds.get(hold.job_id) is hold:  # not finished in the meantime
                    hold.tell(lost)
            elif alive[hold.job_id]:
                hold.tell(JobCanceled("canceled on request"))

    def _renewed(self, sent: float) -> None:
        self._renewed_at = sent
        self._outage = None

    def _lost_reason(self, sent: float) -> LeaseLost:
        """Why a job missing from a renewal was taken over: our lease ran out during an outage, or not."""
        unrenewed = sent - self._renewed_at
        if self._outage is None or unrenewed <= self.lease_seconds:
            return LeaseLost("another worker took this job over")
        return LeaseExpired(
            f"the lease could not be renewed for {unrenewed:.0f} s while PostgreSQL was unreachable "
            f"({self._outage}), so another worker took the job over; this worker did not stop",
            error_class="LeaseExpired",
        )

    async def watch_cancels(self) -> None:
        """Tell running jobs whose cancel was requested (a cheap read, done every second)."""
        holds = list(self.holds.values())
        if not holds:
            return
        for job_id in await jobs.cancel_requested(self.db, [h.job_id for h in holds]):
            hold = self.holds.get(job_id)
            if hold is not None:
                hold.tell(JobCanceled("canceled on request"))

    async def _run(self) -> None:
        last_renewal = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.lease_seconds / 3))
            try:
                if time.monotonic() - last_renewal >= self.lease_seconds / 3:
                    last_renewal = time.monotonic()
                    await self.renew()
                else:
                    await self.watch_cancels()
            except Exception:
                log_event("worker.lease.renew_failed", logging.WARNING, held=len(self.holds), exc_info=True)


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {cause}".splitlines()[0].strip().rstrip(":")
