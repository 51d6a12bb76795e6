"""A queued request of the fake fal, its status derived from its timestamps whenever it is read, and the
runners of each app it may wait for.

A request is ``IN_QUEUE`` for its queue time, ``IN_PROGRESS`` (with progress lines in its logs) until
its latency has passed, then ``COMPLETED``, with the outcome fated at submit: a result (200) or an
error (status code and body, e.g. 422 with fal's ``detail`` list). A cancel ends it at once. No
background task runs per request, so thousands in flight cost nothing. With a `concurrency` limit its
queue time also covers its wait for a free runner (`Runners`), computed once, at submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal

from fake_fal.directives import Directives, ReadFault, nth_fault
from fake_fal.models import Plan

JSON = dict[str, Any]
Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
CANCELLED: Final = "Request cancelled"
PROGRESS_STEPS: Final = 4


class QueuedRequest:
    """One request; ``outcome`` is (status code, body) of its result, fated at submit."""

    def __init__(
        self,
        *,
        id: str,
        endpoint: str,
        input: JSON,
        plan: Plan | None,
        directives: Directives,
        queue_seconds: float,
        latency: float,
        outcome: tuple[int, JSON],
        created_wall: float | None = None,
    ) -> None:
        self.id = id
        self.endpoint = endpoint
        self.app = "/".join(endpoint.split("/")[:2])
        self.input = input
        self.plan = plan
        self.directives = directives
        now_wall = time.time()
        self.created_wall = now_wall if created_wall is None else created_wall
        # A request read back after a restart keeps its age: its status goes on from its timestamps.
        self.created_mono = time.monotonic() - (now_wall - self.created_wall)
        self.queue_seconds = min(queue_seconds, latency)
        self.latency = latency
        self.outcome = outcome
        self.canceled_after: float | None = None
        self.status_reads = 0
        self.result_reads = 0
        self.done: asyncio.Event | None = None
        self.seed = plan.seed if plan is not None and plan.seed is not None else 0
        """The seed the run used: the one given, else one the fake picked at submit."""
        self.nsfw: list[bool] = []
        """Which images the safety checker flagged (fated at submit)."""

    @property
    def prompt(self) -> str:
        prompt = self.input.get("prompt")
        return prompt if isinstance(prompt, str) else ""

    def elapsed(self, now: float) -> float:
        return now - self.created_mono

    def status(self, now: float) -> Status:
        if self.canceled_after is not None:
            return "COMPLETED"
        elapsed = self.elapsed(now)
        if elapsed >= self.latency:
            return "COMPLETED"
        return "IN_PROGRESS" if elapsed >= self.queue_seconds else "IN_QUEUE"

    def remaining(self, now: float) -> float:
        """Seconds until COMPLETED (0 if it is)."""
        if self.canceled_after is not None:
            return 0.0
        return max(0.0, self.latency - self.elapsed(now))

    def result(self) -> tuple[int, JSON]:
        """(status code, body) of the result of a COMPLETED request."""
        if self.canceled_after is not None:
            return 400, {"detail": CANCELLED, "error_type": "request_cancelled"}
        return self.outcome

    def cancel(self, now: float) -> bool:
        """Cancel unless COMPLETED already; whether it was cancelled now."""
        if self.status(now) == "COMPLETED":
            return False
        self.canceled_after = self.elapsed(now)
        if self.done is not None:
            self.done.set()
        return True

    async def wait(self, seconds: float = 1e9) -> None:
        """Sleep until COMPLETED (or cancelled) or ``seconds`` pass."""
        remaining = self.remaining(time.monotonic())
        if remaining <= 0 or seconds <= 0:
            return
        if self.done is None:
            self.done = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            # A few ms of slack so the status is COMPLETED when we wake up.
            await asyncio.wait_for(self.done.wait(), timeout=min(remaining + 0.002, seconds))

    def next_read_fault(self, which: Literal["status", "result"]) -> int | None:
        """The status of the ``[[status:...]]`` / ``[[result:...]]`` fault for this read, if any (counts the read)."""
        faults: tuple[ReadFault, ...]
        if which == "status":
            faults, index = self.directives.status_faults, self.status_reads
            self.status_reads += 1
        else:
            faults, index = self.directives.result_faults, self.result_reads
            self.result_reads += 1
        fault = nth_fault(faults, index)
        return fault.status if fault is not None else None

    # ------------------------------------------------------------------ JSON

    def logs(self, status: Status, now: float) -> list[JSON]:
        """Progress lines as a diffusers run prints them, one log object each."""
        if status == "IN_QUEUE":
            return []
        if self.canceled_after is not None and self.canceled_after < self.queue_seconds:
            moment = _iso(self.created_wall + self.canceled_after)
            return [{"message": CANCELLED, "level": "INFO", "source": "stdout", "timestamp": moment}]
        end = self.canceled_after if self.canceled_after is not None else min(self.elapsed(now), self.latency)
        run_time = max(self.latency - self.queue_seconds, 1e-9)
        steps = min(PROGRESS_STEPS, int(PROGRESS_STEPS * max(end - self.queue_seconds, 0.0) / run_time))
        lines = [f"Generating {self.plan.count if self.plan else 1} image(s)"]
        lines += [_progress_line(step) for step in range(steps + 1)]
        if self.canceled_after is not None:
            lines.append(CANCELLED)
        start = self.created_wall + self.queue_seconds
        return [
            {"message": line, "level": "INFO", "source": "stdout", "timestamp": _iso(start + i * 0.001)}
            for i, line in enumerate(lines)
        ]

    def status_json(self, base: str, now: float, *, with_logs: bool, queue_position: int) -> JSON:
        status = self.status(now)
        urls = self.urls(base)
        body: JSON = {"status": status, "request_id": self.id, **urls}
        body["logs"] = self.logs(status, now) if with_logs else None
        if status == "IN_QUEUE":
            body["queue_position"] = queue_position
        if status == "COMPLETED":
            end = self.canceled_after if self.canceled_after is not None else self.latency
            body["metrics"] = {"inference_time": round(max(end - self.queue_seconds, 0.0), 6)}
            code, result = self.result()
            if code != 200:
                body["error"], body["error_type"] = _error_summary(code, result)
        return body

    def urls(self, base: str) -> JSON:
        url = f"{base}/{self.app}/requests/{self.id}"
        return {"response_url": url, "status_url": f"{url}/status", "cancel_url": f"{url}/cancel"}


def _error_summary(code: int, body: JSON) -> tuple[str, str | None]:
    """The ``error`` and ``error_type`` a COMPLETED status shows for a failed request."""
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return f"Invalid status code: {code}", str(detail[0].get("type"))
    error_type = body.get("error_type")
    return (str(detail) if detail else f"Invalid status code: {code}"), (str(error_type) if error_type else None)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _progress_line(step: int) -> str:
    pct = step * 100 // PROGRESS_STEPS
    bar = ("\u2588" * (step * 10 // PROGRESS_STEPS)).ljust(10)
    return f"{pct:3d}%|{bar}| {step}/{PROGRESS_STEPS} [00:00<00:00, 4.00it/s]"


class Runners:
    """Each app's runners, when a `concurrency` limits them: when each is free again (a heap of times)."""

    def __init__(self) -> None:
        self.busy: dict[str, list[float]] = {}

    def schedule(
        self, endpoint_id: str, queue_seconds: float, latency: float, concurrency: int, start_timeout: float | None
    ) -> tuple[float, float, bool]:
        """(seconds IN_QUEUE, latency, whether it starts) of a new request of `endpoint_id`'s app.

        Without a limit it starts after its queue time. With one it waits, besides, for the first of its
        app's runners to be free; fal gives it up (504 `request_timeout`) when it would not start within
        the submit's `X-Fal-Request-Timeout`, and then it takes no runner."""
        run = max(latency - queue_seconds, 0.0)
        now = time.monotonic()
        start = now + queue_seconds
        busy = None
        if concurrency > 0:
            busy = self.busy.setdefault("/".join(endpoint_id.split("/")[:2]), [])
            if len(busy) >= concurrency:
                start = max(start, busy[0])
        wait = start - now
        if start_timeout is not None and wait > start_timeout:
            return start_timeout, start_timeout, False
        if busy is not None:
            if len(busy) >= concurrency:
                heapq.heapreplace(busy, start + run)
            else:
                heapq.heappush(busy, start + run)
        return wait, wait + run, True

    def clear(self) -> None:
        self.busy.clear()
