"""One prediction's life in the fake: its status and timing, derived from timestamps whenever read.

A prediction has no background task. It is ``starting`` for ``start_delay`` seconds, then
``processing``, then ends at ``latency`` seconds with its fated ``outcome`` (chosen at create), unless a
cancel or its deadline (the create's ``Cancel-After``) ends it earlier: a deadline before the start makes
it ``aborted``, one while it runs ``canceled``. So thousands of predictions in flight cost nothing, and
one read back after a restart goes on from its creation time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

from fake_replicate.directives import Directives
from fake_replicate.models import GENERIC, ModelSpec

JSON = dict[str, Any]
Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]

TERMINAL: Final = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass(frozen=True)
class Params:
    """The validated model inputs, and what the model makes of them (fake_replicate.models)."""

    prompt: str
    width: int
    height: int
    num_outputs: int
    seed: int | None
    spec: ModelSpec = GENERIC
    format: str = "png"
    flagged: int = 0
    """Images flagged NSFW (the ``[[nsfw:N]]`` directive), dropped from the output by flux."""

    @property
    def kept(self) -> int:
        return max(self.num_outputs - self.flagged, 0)


class Prediction:
    """One prediction; its status is derived from its timestamps when read."""

    __slots__ = (
        "canceled_after",
        "created_mono",
        "created_wall",
        "deadline",
        "directives",
        "done_event",
        "error",
        "get_faults_left",
        "id",
        "input",
        "latency",
        "model",
        "outcome",
        "output_mode",
        "params",
        "start_delay",
        "version",
    )

    def __init__(
        self,
        *,
        id: str,
        model: str,
        version: str,
        input: JSON,
        params: Params,
        directives: Directives,
        output_mode: str,
        latency: float,
        outcome: Status,
        error: str | None,
        created_wall: float | None = None,
        start_delay: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.id = id
        self.model = model
        self.version = version
        self.input = input
        self.params = params
        self.directives = directives
        self.output_mode = output_mode
        now_wall = time.time()
        self.created_wall = now_wall if created_wall is None else created_wall
        # A prediction read back after a restart keeps its age: its status goes on from its timestamps.
        self.created_mono = time.monotonic() - (now_wall - self.created_wall)
        self.latency = latency
        self.start_delay = min(0.1 * latency, 0.5) if start_delay is None else start_delay
        self.deadline = deadline
        """Seconds after create when ``Cancel-After`` ends it, or None."""
        self.outcome: Status = outcome
        self.error = error
        self.canceled_after: float | None = None
        self.get_faults_left: list[int | None] = [f.count for f in directives.get_faults]
        self.done_event: asyncio.Event | None = None

    def elapsed(self, now: float) -> float:
        return now - self.created_mono

    def ending(self) -> tuple[float, Status]:
        """When (seconds after create) and how the prediction ends, as things stand."""
        if self.canceled_after is not None:
            return self.canceled_after, "canceled"
        if self.deadline is not None and self.deadline < self.latency:
            return self.deadline, "aborted" if self.deadline < self.start_delay else "canceled"
        return self.latency, self.outcome

    def status(self, now: float) -> Status:
        end, final = self.ending()
        elapsed = self.elapsed(now)
        if elapsed >= end:
            return final
        if elapsed >= self.start_delay:
            return "processing"
        return "starting"

    def remaining(self, now: float) -> float:
        """Seconds until the prediction is terminal (0 if it is)."""
        return max(0.0, self.ending()[0] - self.elapsed(now))

    def cancel(self, now: float) -> bool:
        """Cancel unless terminal already; whether it was canceled now."""
        if self.status(now) in TERMINAL:
            return False
        self.canceled_after = self.elapsed(now)
        if self.done_event is not None:
            self.done_event.set()
        return True

    async def wait(self, seconds: float) -> None:
        """Sleep until terminal (or canceled) or ``seconds`` pass."""
        remaining = self.remaining(time.monotonic())
        if remaining <= 0 or seconds <= 0:
            return
        if self.done_event is None:
            self.done_event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            # A few ms of slack so the status is terminal when we wake up.
            await asyncio.wait_for(self.done_event.wait(), timeout=min(remaining + 0.002, seconds))

    def next_get_fault(self) -> int | None:
        """Consume and return the status of the next ``[[get:...]]`` fault, if any."""
        for i, left in enumerate(self.get_faults_left):
            if left is None:
                return self.directives.get_faults[i].status
            if left > 0:
                self.get_faults_left[i] = left - 1
                return self.directives.get_faults[i].status
        return None
