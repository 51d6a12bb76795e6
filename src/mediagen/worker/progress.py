"""A running job's progress, from its prediction's logs: stored when it moves, announced to listeners.

Models print tqdm bars into their logs (`75%|███████▌  | 3/4 [00:00<00:00, 15.38it/s]`); the last
line that looks like one is the progress, read as the `replicate` client reads it (`Progress.parse`,
see shared/replicate-models.md). A model without bars (flux-1.1-pro, SD3.5) has no progress: `null`.

Progress comes from a poll's logs, or from Replicate's `logs` webhooks when webhooks replace polls.
Cheap on purpose: one conditional UPDATE only when the value moved since this attempt last wrote it,
never for a finished prediction (its end writes the job anyway), and a failed write is only logged.
"""

from __future__ import annotations

import logging
import re

from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.logging import log_event
from mediagen.notify import Notifier
from mediagen.providers.base import Prediction

_BAR = re.compile(r"^\s*(?P<percentage>\d+)%\s*\|.+?\|\s*(?P<current>\d+)\/(?P<total>\d+)")


def parse(logs: str | None) -> float | None:
    """The fraction done by the last tqdm bar in `logs` (0 to 1), or None without one."""
    if not logs:
        return None
    for line in reversed(logs.split("\n")):
        match = _BAR.match(line.strip())
        if match:
            return min(1.0, int(match["percentage"]) / 100.0)
    return None


class ProgressReporter:
    """One attempt's progress: `seen(prediction)` after every look at its prediction."""

    def __init__(self, db: Database, notifier: Notifier, claim: jobs.Claim) -> None:
        self.db = db
        self.notifier = notifier
        self.claim = claim
        self.last: float | None = None

    async def seen(self, prediction: Prediction) -> None:
        """After a look at the prediction (a poll)."""
        if not prediction.done:
            await self.report(parse(prediction.logs))

    async def report(self, progress: float | None) -> None:
        """Progress from anywhere (a poll's logs, a `logs` webhook): stored and announced if it moved."""
        if progress is None or progress == self.last:
            return
        self.last = progress
        try:
            await jobs.record_progress(self.db, self.claim, progress)
        except Exception as error:
            log_event("job.progress.unrecorded", logging.WARNING, job_id=str(self.claim.job_id), error=repr(error))
            return
        self.notifier.publish(
            self.claim.job_id, {"type": "job", "status": "running", "attempt": self.claim.attempt, "progress": progress}
        )
