"""What the worker needs from an image provider, whoever it is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

TERMINAL_PREDICTION = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass(frozen=True)
class Prediction:
    id: str
    status: str
    output: Any = None
    error: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    logs: str | None = None
    metrics: dict[str, Any] | None = None
    """Replicate's `metrics` once it ended: `predict_time` (s), `image_count` when the model reports it."""

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_PREDICTION


class Provider(Protocol):
    async def create(self, model: str, input: dict[str, Any], *, webhook: str | None = None) -> Prediction:
        """Start a prediction (Replicate POSTs it to `webhook` as it goes, when given).

        Raises TransientProviderError (incl. UnknownCreateOutcome) or Permanent."""

    async def get(self, prediction_id: str) -> Prediction: ...

    async def cancel(self, prediction_id: str) -> None: ...

    async def find_recent(self, model: str, input: dict[str, Any], since: datetime) -> list[Prediction]:
        """Predictions of `model` with exactly this `input`, created at or after `since`, newest first."""

    async def aclose(self) -> None: ...
