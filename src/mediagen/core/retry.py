"""THE retry policy: which failures earn another attempt, and how long to wait before it.

One decision for every failed attempt, made here and nowhere else:

* throttled (a 429: Replicate's rate limit) or facing an outage (the provider's circuit is open, see
  mediagen.providers.circuit) → not a failure at all (`throttle_wait`): the attempt waits for the
  Retry-After, or until the circuit may let a call through, and makes the same call again, using up
  nothing (the job's deadline still applies);
* transient (timeouts, connection errors, 500/502/503/504, a failed output download, a store
  that is briefly down, a prediction that died of an infrastructure fault) → retry while attempts
  remain, after `backoff()`, or after the provider's Retry-After when that is longer;
* permanent (401, 402, 404, 422, content refused, a rejected output, a deadline) → fail now;
* anything we did not foresee (a bug) → transient, so a fix and a redeploy can still finish the job,
  but bounded by the same attempt cap.

Backoff is capped exponential with "equal jitter": half the capped exponential delay is fixed, the
other half random, so delays still grow while concurrent retries spread out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mediagen.core.errors import MediagenError, ProviderOutage

# A prediction that ends `failed` is the model's verdict and permanent, except for these faults of
# Replicate's infrastructure, where a new prediction may well succeed.
TRANSIENT_PREDICTION_MARKERS = ("(E6716)", "timed out", "out of memory", "temporarily unavailable")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    retry_after_cap_seconds: float = 600.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay after failed attempt number `attempt` (1-based): capped, exponential, jittered."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** (attempt - 1))
        jitter: float = (rng or random).uniform(0, ceiling / 2)
        return ceiling / 2 + jitter

    def decide(
        self,
        error: BaseException,
        attempt: int,
        rng: random.Random | None = None,
        *,
        max_attempts: int | None = None,
    ) -> Decision:
        """`max_attempts`: the job's own cap (fixed when it was submitted), else the policy's."""
        transient = is_transient(error)
        if not transient or attempt >= (max_attempts or self.max_attempts):
            return Decision(retry=False, delay=None)
        delay = self.backoff(attempt, rng)
        hint = getattr(error, "retry_after", None)
        if hint is not None and hint > delay:
            delay = min(float(hint), self.retry_after_cap_seconds)
        return Decision(retry=True, delay=round(delay, 3))

    def throttle_wait(self, error: BaseException) -> float | None:
        """A 429 is Replicate's rate limit, and an open circuit its outage, not a fault of the job: the
        same call is made again after this many seconds, in the same attempt (None: `error` is neither,
        decide() applies)."""
        if isinstance(error, ProviderOutage):
            return min(error.retry_after or self.base_seconds, self.retry_after_cap_seconds)
        if getattr(error, "http_status", None) != 429:
            return None
        hint = getattr(error, "retry_after", None)
        return min(float(hint) if hint is not None else self.base_seconds, self.retry_after_cap_seconds)


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay: float | None
    """Seconds before the next attempt, when `retry`."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, MediagenError):
        return error.transient
    return True


def prediction_failure_is_transient(message: str | None) -> bool:
    text = (message or "").lower()
    return any(marker.lower() in text for marker in TRANSIENT_PREDICTION_MARKERS)
