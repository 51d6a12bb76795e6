"""A loop the worker runs beside its jobs (the lease keeper, the recovery and retention sweeps, the
clients' webhook sender): started as a named task, stopped by canceling it and waiting for it to end."""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar


class Background:
    name: ClassVar[str]
    """The task's name (seen in asyncio's debug output and task dumps)."""
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError
