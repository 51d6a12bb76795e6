"""When to look at a running prediction again: learned from how long the model's predictions take.

A fixed schedule (0.5 s, then every 1 s) spends most of its requests on predictions that cannot be done
yet: a 2-second model is asked three times, a 30-second one thirty. Each request costs the worker CPU
and counts against Replicate's rate limit (3,000 requests a minute for everything but creates).

So the worker remembers, per model, how long its recent successful predictions took by Replicate's own
clock (`completed_at - created_at`), and waits a low quantile of that before the first look. Later
looks follow the fixed schedule from `initial`, doubling up to `maximum`. Until a model has a few
observations the fixed schedule is all there is, and a model that slows down costs at most one early
look. Nothing here is persisted: a new worker process learns again from its first jobs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from mediagen.providers.base import Prediction

MIN_OBSERVATIONS = 5


class PollSchedule:
    def __init__(
        self,
        *,
        initial: float,
        maximum: float,
        window: int = 100,
        quantile: float = 0.2,
        first_cap: float = 60.0,
    ) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.window = window
        self.quantile = quantile
        self.first_cap = first_cap
        self._seconds: dict[str, deque[float]] = {}

    def observe(self, model: str, prediction: Prediction) -> None:
        """Note how long a finished prediction of `model` took (only successes: failures are often fast)."""
        if prediction.status != "succeeded" or prediction.created_at is None or prediction.completed_at is None:
            return
        seconds = (prediction.completed_at - prediction.created_at).total_seconds()
        if seconds < 0:
            return
        samples = self._seconds.get(model)
        if samples is None:
            samples = self._seconds[model] = deque(maxlen=self.window)
        samples.append(seconds)

    def learned_delay(self, model: str) -> float | None:
        """The wait before the first look at a new prediction of `model`, once there is one to learn."""
        samples = self._seconds.get(model)
        if samples is None or len(samples) < MIN_OBSERVATIONS:
            return None
        ordered = sorted(samples)
        learned = min(ordered[int(self.quantile * (len(ordered) - 1))], self.first_cap)
        return learned if learned > self.initial else None

    def delays(self, model: str, *, fresh: bool) -> Iterator[float]:
        """The waits before each look; `fresh`: the prediction was just created (not resumed)."""
        learned = self.learned_delay(model) if fresh else None
        if learned is not None:
            yield learned
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * 2, self.maximum)
