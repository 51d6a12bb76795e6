"""What the worker needs from an image provider, whoever it is; and what a provider's webhook verifier
raises, so that a route answers every provider's webhooks alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from mediagen.core.errors import MediagenError, TransientProviderError

T = TypeVar("T")

TERMINAL_PREDICTION = frozenset({"succeeded", "failed", "canceled", "aborted"})

_unsent_marker: ContextVar[Callable[[bool], None] | None] = ContextVar("provider_unsent", default=None)


@contextmanager
def unsent() -> Iterator[None]:
    """An adapter's create waits in here for what comes before its request goes out (a rate-limit
    token): nothing is sent yet, so its caller may give the create up meanwhile. Outside it a create
    is never given up, as it may have made a paid prediction (see `giving_up`)."""
    mark = _unsent_marker.get()
    if mark is None:
        yield
        return
    mark(True)
    try:
        yield
    finally:
        mark(False)


async def by_deadline(deadline: datetime | None, wait: Awaitable[T], what: str) -> T:
    """`wait` (for `what`, e.g. a rate-limit token), given up at the job's deadline: a transient
    ProviderTimeout then (a wait for a token sends nothing: no outcome to doubt)."""
    if deadline is None:
        return await wait
    left = max(0.0, (deadline - datetime.now(UTC)).total_seconds())
    try:
        async with asyncio.timeout(left):
            return await wait
    except TimeoutError as error:
        raise TransientProviderError(f"no {what} before the job's deadline", error_class="ProviderTimeout") from error


@contextmanager
def giving_up(mark: Callable[[bool], None]) -> Iterator[None]:
    """The caller's side of `unsent`: `mark(True)` when a create begins to wait unsent, `mark(False)` after."""
    token = _unsent_marker.set(mark)
    try:
        yield
    finally:
        _unsent_marker.reset(token)


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
    webhook: str | None = None
    """The webhook it was created with, where the provider shows it (ours carry `job` and `attempt`)."""
    retryable: bool | None = None
    """For a failed prediction, whether another one may succeed, when the provider says so (fal: the runner
    failed, not the input); None leaves it to the error text (`core.retry.prediction_failure_is_transient`)."""

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_PREDICTION


class Provider(Protocol):
    """`deadline`: the job's. A call gives up by then (as a whole: connect, retries, waits), and a
    prediction is created so that the provider itself ends it by then."""

    async def create(
        self, model: str, input: dict[str, Any], *, webhook: str | None = None, deadline: datetime | None = None
    ) -> Prediction:
        """Start a prediction (Replicate POSTs it to `webhook` as it goes, when given).

        Raises TransientProviderError or PermanentProviderError; `create_rejected` on one that proves
        nothing was made; UnknownCreateOutcome when a prediction may have been made all the same."""

    async def get(self, prediction_id: str, *, deadline: datetime | None = None) -> Prediction: ...

    async def cancel(self, prediction_id: str) -> None: ...

    async def find_recent(
        self, model: str, input: dict[str, Any], since: datetime, *, deadline: datetime | None = None
    ) -> list[Prediction]:
        """Predictions of `model` with exactly this `input`, created at or after `since` by the
        provider's clock (every one of them, however many others were made since), newest first."""

    async def aclose(self) -> None: ...


class WebhookRejected(MediagenError):
    """Not signed by the provider with our secret, or signed too long ago (HTTP 401)."""


class WebhookSecretUnavailable(MediagenError):
    """The provider's signing secret (or keys) could not be fetched (HTTP 503: the provider retries)."""

    transient = True
