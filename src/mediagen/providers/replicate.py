"""Replicate through the real `replicate` client, turned into mediagen's typed errors.

What this adapter does that the client does not (see shared/replicate-api.md):

* create, then poll ourselves (never `run()`, which treats `processing` as done and hides the id);
* keep the 429 hint: `ReplicateError` drops `Retry-After` and the body's `retry_after`, so a thin
  transport under the client's own `RetryTransport` notes them for the call in flight;
* tell a create that surely failed (connection refused) from one whose outcome is unknown (a read
  timeout after the request went out): only the latter may have started a paid prediction;
* spend Replicate's rate limits from budgets shared by every worker (mediagen.providers.ratelimit): every
  request, the client's own retries included, waits for a token, and a 429 pauses its budget;
* one client, one connection pool per worker process, built on the worker's event loop, on a lean
  transport (mediagen.providers.transport) under the client's own httpx.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from datetime import datetime
from typing import Any

import httpx
import replicate
from pydantic.v1 import ValidationError as ClientValidationError
from replicate.exceptions import ReplicateError

from mediagen import metrics
from mediagen.core.errors import PermanentProviderError, TransientProviderError, UnknownCreateOutcome
from mediagen.providers.base import Prediction
from mediagen.providers.ratelimit import Budget, RateLimiter
from mediagen.providers.transport import LeanTransport

_TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_create_slot: contextvars.ContextVar[float | None] = contextvars.ContextVar("replicate_create_slot", default=None)
_retry_hint: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "replicate_retry_hint", default=None
)


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _retry_after(response: httpx.Response) -> float | None:
    """The wait a 429/503 asks for: the `Retry-After` header, else (429) the body's `retry_after`."""
    seconds = _parse_retry_after(response.headers.get("retry-after"))
    if seconds is None and response.status_code == 429:
        await response.aread()
        try:
            seconds = _parse_retry_after(str(response.json().get("retry_after")))
        except (ValueError, AttributeError):
            seconds = None
    return seconds


class _HintingTransport(httpx.AsyncBaseTransport):
    """Notes Retry-After (header or `retry_after` in the body) of 429/503 answers for the caller."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        hint = _retry_hint.get()
        if hint is not None and response.status_code in (429, 503):
            seconds = await _retry_after(response)
            if seconds is not None:
                hint["retry_after"] = seconds
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _budget(request: httpx.Request) -> Budget:
    path = request.url.path.rstrip("/")
    return "create" if request.method == "POST" and path.endswith("/predictions") else "other"


class _LimitingTransport(httpx.AsyncBaseTransport):
    """Every request waits for a token of its budget; a 429 pauses that budget for its Retry-After.

    Under the client's RetryTransport, so the GETs it retries on 429 wait for tokens too.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, limiter: RateLimiter, default_pause: float) -> None:
        self._inner = inner
        self._limiter = limiter
        self._default_pause = default_pause

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        budget = _budget(request)
        slot = _create_slot.get() if budget == "create" else None
        if slot is None:
            await self._limiter.acquire(budget)
        elif self._limiter.late(budget, slot):
            # The create's token was taken before a busy loop delayed its sending: take a fresh one.
            await self._limiter.reserve(budget)
        response = await self._inner.handle_async_request(request)
        if response.status_code == 429:
            seconds = await _retry_after(response)
            self._limiter.pause(budget, self._default_pause if seconds is None else seconds)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


def _prediction(obj: Any) -> Prediction:
    return Prediction(
        id=obj.id,
        status=obj.status,
        output=obj.output,
        error=str(obj.error) if obj.error else None,
        created_at=_timestamp(obj.created_at),
        completed_at=_timestamp(getattr(obj, "completed_at", None)),
        logs=getattr(obj, "logs", None),
        metrics=getattr(obj, "metrics", None) or None,
    )


def _detail(error: ReplicateError) -> str:
    parts = [part for part in (error.title, error.detail) if part]
    return ": ".join(parts) if parts else f"HTTP {error.status}"


class ReplicateProvider:
    def __init__(
        self,
        *,
        api_token: str | None,
        base_url: str | None,
        timeout_seconds: float = 30.0,
        max_connections: int = 200,
        limiter: RateLimiter | None = None,
        default_throttle_seconds: float = 1.0,
        webhook_events: tuple[str, ...] = ("start", "completed"),
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.webhook_events = webhook_events
        # Calls beyond `max_connections` wait for a free connection (at most the pool timeout).
        transport: httpx.AsyncBaseTransport = _HintingTransport(LeanTransport(max_connections=max_connections))
        if limiter is not None:
            transport = _LimitingTransport(transport, limiter, default_throttle_seconds)
        self._transport = transport
        self._limiter = limiter
        self.client = replicate.Client(  # type: ignore[attr-defined]
            api_token=api_token,
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds, connect=5.0, pool=timeout_seconds),
            transport=self._transport,
        )

    async def _call(self, coro_factory: Any, *, creating: bool = False, operation: str = "get") -> Any:
        hint: dict[str, float] = {}
        token = _retry_hint.set(hint)
        started = time.perf_counter()
        try:
            return await coro_factory()
        except ReplicateError as error:
            status = error.status or 0
            transient = status in _TRANSIENT_STATUS or status >= 500
            kind = TransientProviderError if transient else PermanentProviderError
            mapped = kind(
                _detail(error),
                http_status=status or None,
                retry_after=hint.get("retry_after"),
                error_class=f"Replicate{status}" if status else "ReplicateError",
            )
            mapped.create_rejected = creating
            raise mapped from error
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # The request never left: no prediction can exist because of it.
            raise TransientProviderError(
                f"cannot reach Replicate: {type(error).__name__}", error_class=type(error).__name__
            ) from error
        except httpx.TransportError as error:
            kind = UnknownCreateOutcome if creating else TransientProviderError
            raise kind(f"Replicate did not answer: {type(error).__name__}", error_class=type(error).__name__) from error
        except ClientValidationError as error:
            # An answer the client cannot parse, e.g. the `aborted` status 1.0.7 does not know.
            raise TransientProviderError(
                f"unexpected answer from Replicate: {error}", error_class="ProviderResponseInvalid"
            ) from error
        finally:
            metrics.replicate_latency.labels(operation).observe(time.perf_counter() - started)
            _retry_hint.reset(token)

    async def create(self, model: str, input: dict[str, Any], *, webhook: str | None = None) -> Prediction:
        # The client sends create with no timeout at all (timeout=None): bound it ourselves. A create
        # cut off this way may have started a prediction, hence UnknownCreateOutcome.
        slot = None
        if self._limiter is not None:
            # The token first, outside the create's time bound: a long wait for it is no timeout.
            slot = await self._limiter.reserve("create")
        taken = _create_slot.set(slot)
        params: dict[str, Any] = {}
        if webhook is not None:
            params = {"webhook": webhook, "webhook_events_filter": list(self.webhook_events)}

        async def bounded() -> Any:
            try:
                return await asyncio.wait_for(
                    self.client.predictions.async_create(model=model, input=input, **params),
                    self.timeout_seconds,
                )
            except TimeoutError as error:
                raise httpx.ReadTimeout("create timed out") from error

        try:
            return _prediction(await self._call(bounded, creating=True, operation="create"))
        finally:
            _create_slot.reset(taken)

    async def get(self, prediction_id: str) -> Prediction:
        return _prediction(await self._call(lambda: self.client.predictions.async_get(prediction_id)))

    async def cancel(self, prediction_id: str) -> None:
        await self._call(lambda: self.client.predictions.async_cancel(prediction_id), operation="cancel")

    async def model_schema(self, model: str) -> tuple[str | None, dict[str, Any]]:
        """(latest version id, its openapi_schema) from `GET /v1/models/{owner}/{name}`."""
        found = await self._call(lambda: self.client.models.async_get(model), operation="model")
        latest = found.latest_version
        if latest is None or not isinstance(latest.openapi_schema, dict):
            raise PermanentProviderError(f"{model} has no latest version with a schema", error_class="NoSchema")
        return latest.id, latest.openapi_schema

    async def find_recent(self, model: str, input: dict[str, Any], since: datetime) -> list[Prediction]:
        found: list[Prediction] = []
        cursor: Any = ...
        for _ in range(20):  # at most 2,000 recent predictions
            page = await self._call(lambda c=cursor: self.client.predictions.async_list(cursor=c), operation="list")
            older = False
            for obj in page.results:
                created = _timestamp(obj.created_at)
                if created is not None and created < since:
                    older = True
                    continue
                if obj.model == model and (obj.input or {}) == input:
                    found.append(_prediction(obj))
            if older or not page.next:
                break
            cursor = page.next
        return found

    async def aclose(self) -> None:
        await self._transport.aclose()
