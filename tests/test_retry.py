"""The retry policy: which errors retry, the capped and jittered backoff, Retry-After."""

from __future__ import annotations

import random

import pytest

from mediagen.core.errors import (
    OutputDownloadFailed,
    OutputRejected,
    PermanentProviderError,
    TransientProviderError,
    UnknownCreateOutcome,
)
from mediagen.core.retry import RetryPolicy, prediction_failure_is_transient

POLICY = RetryPolicy(max_attempts=6, base_seconds=1.0, cap_seconds=8.0, retry_after_cap_seconds=60.0)


def test_backoff_grows_exponentially_within_jitter_bounds() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)]:
        delays = [POLICY.backoff(attempt, rng) for _ in range(200)]
        assert min(delays) >= ceiling / 2
        assert max(delays) <= ceiling


def test_backoff_is_capped() -> None:
    rng = random.Random(2)
    delays = [POLICY.backoff(attempt, rng) for attempt in range(5, 40) for _ in range(20)]
    assert max(delays) <= POLICY.cap_seconds
    assert min(delays) >= POLICY.cap_seconds / 2


def test_backoff_is_jittered() -> None:
    rng = random.Random(3)
    delays = {round(POLICY.backoff(3, rng), 6) for _ in range(50)}
    assert len(delays) > 40


@pytest.mark.parametrize(
    "error",
    [
        TransientProviderError("503", http_status=503),
        UnknownCreateOutcome("timeout"),
        OutputDownloadFailed("reset"),
        RuntimeError("a bug we did not foresee"),
    ],
)
def test_transient_errors_retry_while_attempts_remain(error: BaseException) -> None:
    assert POLICY.decide(error, attempt=1).retry
    assert not POLICY.decide(error, attempt=6).retry


@pytest.mark.parametrize(
    "error",
    [
        PermanentProviderError("Unauthenticated", http_status=401),
        PermanentProviderError("Insufficient credit", http_status=402),
        PermanentProviderError("Input validation failed", http_status=422),
        OutputRejected("not an image"),
    ],
)
def test_permanent_errors_fail_at_once(error: BaseException) -> None:
    decision = POLICY.decide(error, attempt=1)
    assert not decision.retry and decision.delay is None


def test_a_longer_retry_after_wins_over_the_backoff() -> None:
    decision = POLICY.decide(TransientProviderError("429", http_status=429, retry_after=30), attempt=1)
    assert decision.retry and decision.delay == 30


def test_a_shorter_retry_after_does_not_shorten_the_backoff() -> None:
    rng = random.Random(4)
    decision = POLICY.decide(TransientProviderError("429", http_status=429, retry_after=0.01), attempt=4, rng=rng)
    assert decision.delay is not None and decision.delay >= 4.0


def test_an_absurd_retry_after_is_capped() -> None:
    decision = POLICY.decide(TransientProviderError("429", retry_after=86_400), attempt=1)
    assert decision.delay == POLICY.retry_after_cap_seconds


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("The input or output was flagged as sensitive. (E005)", False),
        ("Prediction failed: the model timed out while starting (E6716)", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("invalid image size", False),
        (None, False),
    ],
)
def test_failed_predictions_are_permanent_unless_an_infrastructure_fault(message: str | None, transient: bool) -> None:
    assert prediction_failure_is_transient(message) is transient


def test_the_jobs_own_attempt_cap_wins() -> None:
    error = TransientProviderError("503", http_status=503)
    assert not POLICY.decide(error, attempt=2, max_attempts=2).retry
    assert POLICY.decide(error, attempt=2, max_attempts=3).retry
