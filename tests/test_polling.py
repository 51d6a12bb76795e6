"""The poll schedule: the fixed steps, and a first look learned from how long the model's predictions take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

from mediagen.providers.base import Prediction
from mediagen.worker.polling import MIN_OBSERVATIONS, PollSchedule

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def finished(seconds: float, status: str = "succeeded") -> Prediction:
    return Prediction(id="p", status=status, created_at=T0, completed_at=T0 + timedelta(seconds=seconds), output=["x"])


def first(schedule: PollSchedule, n: int, *, fresh: bool = True, model: str = "m") -> list[float]:
    return list(islice(schedule.delays(model, fresh=fresh), n))


def test_without_history_the_steps_start_small_and_double_up_to_the_maximum() -> None:
    schedule = PollSchedule(initial=0.5, maximum=2.0)
    assert first(schedule, 6) == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_the_first_look_waits_about_as_long_as_recent_predictions_of_the_model_took() -> None:
    schedule = PollSchedule(initial=0.5, maximum=1.0)
    for seconds in (2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 9.0, 2.6, 2.7, 2.8):
        schedule.observe("m", finished(seconds))
    delays = first(schedule, 4)
    # a low quantile (not the mean, which the slow outlier would drag up), then the fixed steps
    assert 2.0 <= delays[0] <= 2.3
    assert delays[1:] == [0.5, 1.0, 1.0]


def test_a_resumed_prediction_is_looked_at_on_the_fixed_steps() -> None:
    schedule = PollSchedule(initial=0.5, maximum=1.0)
    for _ in range(MIN_OBSERVATIONS):
        schedule.observe("m", finished(5.0))
    assert first(schedule, 3, fresh=False) == [0.5, 1.0, 1.0]
    assert first(schedule, 1, fresh=True) == [5.0]


def test_each_model_learns_on_its_own_and_only_from_successes() -> None:
    schedule = PollSchedule(initial=0.5, maximum=1.0)
    for _ in range(MIN_OBSERVATIONS):
        schedule.observe("slow", finished(8.0))
        schedule.observe("fast", finished(8.0, status="failed"))
        schedule.observe("fast", Prediction(id="p", status="succeeded", created_at=T0))  # no completed_at
    assert first(schedule, 1, model="slow") == [8.0]
    assert first(schedule, 1, model="fast") == [0.5]


def test_too_few_observations_or_fast_models_keep_the_fixed_steps() -> None:
    schedule = PollSchedule(initial=0.5, maximum=1.0)
    for _ in range(MIN_OBSERVATIONS - 1):
        schedule.observe("m", finished(4.0))
    assert first(schedule, 1) == [0.5]
    for _ in range(MIN_OBSERVATIONS):
        schedule.observe("quick", finished(0.1))
    assert first(schedule, 2, model="quick") == [0.5, 1.0]


def test_the_learned_wait_is_capped_and_forgets_old_observations() -> None:
    schedule = PollSchedule(initial=0.5, maximum=1.0, window=10, first_cap=30.0)
    for _ in range(10):
        schedule.observe("m", finished(600.0))
    assert first(schedule, 1) == [30.0]
    for _ in range(10):
        schedule.observe("m", finished(3.0))
    assert first(schedule, 1) == [3.0]
