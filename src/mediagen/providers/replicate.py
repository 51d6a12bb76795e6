"""Replicate through the real `replicate` client, turned into mediagen's typed errors.

What this adapter does that the client does not (see shared/replicate-api.md):

* create, then poll ourselves (never `run()`, which treats `processing` as done and hides the id);
* read predictions as JSON itself, through the client's own request path (auth, base URL, its
  `RetryTransport`, its `ReplicateError`s): the client's pydantic model cannot parse the `aborted`
  status (§2.7) and drops the `webhook` a prediction shows;
* create with `Cancel-After` set to the job's remaining time, so no prediction outlives its job, even
  when every worker is down (Replicate marks one that never started `aborted`, unbilled);
* bound every call as a whole (connect, the client's own retries and their uncapped `Retry-After`
  sleeps included) by `timeout_seconds` and by the job's deadline;
* keep the 429 hint: `ReplicateError` drops `Retry-After` and the body's `retry_after`, so a thin
  transport under the client's own `RetryTransport` notes them for the call in flight;
* tell a create that surely made nothing from one whose outcome is unknown. Only an answer that
  proves refusal (400, 401, 402, 403, 404, 422, 429, and 503: the service refuses for capacity, as the
  fake's outage does before any route) or a request that never left (connection refused) made nothing;
  another 5xx (a gateway's 502/504, a 500), a 408, a timeout or a dropped connection after the request
  went out may have started a paid prediction (`UnknownCreateOutcome`), which the next attempt looks for;
* find such a prediction in Replicate's list, page after page down to a point in time, however many
  pages that takes;
* spend Replicate's rate limits from budgets shared by every worker (mediagen.providers.ratelimit): every
  request, the client's own retries included, waits for a token, and a 429 pauses its budget;
* keep off Replicate while it is down for everyone (mediagen.providers.circuit): the token's reservation
  reads the account's circuit, and raises ProviderOutage, sending nothing, while it is open;
* one client, one connection pool per worker process, built on the worker's event loop, on a lean
  transport (mediagen.providers.transport) under the client's own httpx.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import orjson
import replicate
from replicate.exceptions import ReplicateError

from mediagen import metrics
from mediagen.core.errors import PermanentProviderError, TransientProviderError, UnknownCreateOutcome
from mediagen.providers.base import TERMINAL_PREDICTION, Prediction, by_deadline, unsent
from mediagen.providers.circuit import send_told
from mediagen.providers.ratelimit import Budget, RateLimiter
from mediagen.providers.transport import LeanTransport

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
REFUSED_CREATE = frozenset({400, 401, 402, 403, 404, 422, 429, 503})
"""Answers to a create that prove no prediction was made. Any other answer leaves it unknown. A 503 is
Service Unavailable: refused for capacity (RFC 9110 §15.6.4), not a gateway losing the answer (502, 504);
a job may then fail over to another provider (mediagen.worker.failover) without waiting to look for one."""
_STATUSES = frozenset({"starting", "processing", *TERMINAL_PREDICTION})
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
    """Notes, for the caller, the status of the last answer and the Retry-After (header or
    `retry_after` in the body) of 429/503 answers: what a call cut off in the client's retries saw."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        hint = _retry_hint.get()
        if hint is not None:
            hint["status"] = response.status_code
            if response.status_code in (429, 503):
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
    With the account's circuit (mediagen.providers.circuit): the token's reservation raises
    ProviderOutage while it is open, and each answer or failure is told to it.

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
            hint = _retry_hint.get()
            if hint is not None:
                hint["throttled"] = 1  # until the token comes, the call is throttled by our own budget
            await self._limiter.acquire(budget)
            if hint is not None:
                hint.pop("throttled", None)
        elif self._limiter.late(budget, slot):
            # The create's token was taken before a busy loop delayed its sending: take a fresh one.
            await self._limiter.reserve(budget)
        response = await send_told(self._limiter.circuit, lambda: self._inner.handle_async_request(request))
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


class _Unreadable(Exception):
    """A 2xx answer that is not the JSON we expect."""


def _prediction(data: Any) -> Prediction:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or data.get("status") not in _STATUSES:
        raise _Unreadable(f"not a prediction: {str(data)[:200]}")
    metrics_ = data.get("metrics")
    webhook = data.get("webhook")
    return Prediction(
        id=data["id"],
        status=data["status"],
        output=data.get("output"),
        error=str(data["error"]) if data.get("error") else None,
        created_at=_timestamp(data.get("created_at")),
        completed_at=_timestamp(data.get("completed_at")),
        logs=data.get("logs") if isinstance(data.get("logs"), str) else None,
        metrics=metrics_ if isinstance(metrics_, dict) and metrics_ else None,
        webhook=webhook if isinstance(webhook, str) else None,
    )


def _detail(error: ReplicateError) -> str:
    parts = [part for part in (error.title, error.detail) if part]
    return ": ".join(parts) if parts else f"HTTP {error.status}"


def cancel_after(deadline: datetime, now: datetime | None = None) -> str:
    """The `Cancel-After` duration for a prediction that must not outlive `deadline` (whole seconds,
    rounded up: Replicate's deadline is the job's, never earlier)."""
    left = (deadline - (now or datetime.now(UTC))).total_seconds()
    return f"{max(1, math.ceil(left))}s"


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
        """The most one call may take, all included: connect, the client's retries and their sleeps."""
        self.webhook_events = webhook_events
        # Calls beyond `max_connections` wait for a free connection (at most the pool timeout).
        transport: httpx.AsyncBaseTransport = _HintingTransport(LeanTransport(max_connections=max_connections))
        self._unlimited = transport
        if limiter is not None:
            transport = _LimitingTransport(transport, limiter, default_throttle_seconds)
            if limiter.circuit is not None:
                limiter.circuit.probe_with(self._answers)
        self._transport = transport
        self._limiter = limiter
        self._probe_url = f"{(base_url or 'https://api.replicate.com').rstrip('/')}/v1/predictions"
        self._probe_headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
        self.client = replicate.Client(  # type: ignore[attr-defined]
            api_token=api_token,
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds, connect=5.0, pool=timeout_seconds),
            transport=self._transport,
        )

    async def _answers(self) -> bool:
        """The circuit's probe: does Replicate answer a cheap read again (the first page of the list)?
        Sent past the budget and the circuit, so that no job's own call is the one that finds out."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                request = httpx.Request("GET", self._probe_url, headers=self._probe_headers)
                response = await self._unlimited.handle_async_request(request)
                await response.aread()
                await response.aclose()
        except (httpx.TransportError, TimeoutError):
            return False
        return response.status_code < 500

    def _bound(self, deadline: datetime | None) -> float:
        """Seconds this call may take: `timeout_seconds`, less when the job's deadline comes sooner."""
        if deadline is None:
            return self.timeout_seconds
        return max(0.0, min(self.timeout_seconds, (deadline - datetime.now(UTC)).total_seconds()))

    async def _request(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        deadline: datetime | None,
        creating: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One call through the client's request path (its RetryTransport included), bounded as a whole,
        its answer's JSON; every failure as one of mediagen's provider errors."""
        hint: dict[str, float] = {}
        token = _retry_hint.set(hint)
        started = time.perf_counter()
        bound = self._bound(deadline)
        try:
            async with asyncio.timeout(bound):
                response = await self.client._async_request(method, path, **kwargs)
            return orjson.loads(response.content)  # a page of the list is 100 predictions: parse it fast
        except ReplicateError as error:
            raise _mapped(error, hint, creating=creating) from error
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # The request never left: no prediction can exist because of it.
            raise TransientProviderError(
                f"cannot reach Replicate: {type(error).__name__}", error_class=type(error).__name__
            ) from error
        except httpx.TransportError as error:
            kind = UnknownCreateOutcome if creating else TransientProviderError
            raise kind(f"Replicate did not answer: {type(error).__name__}", error_class=type(error).__name__) from error
        except TimeoutError as error:
            timed_out = _timed_out(hint, bound, creating=creating)
            if timed_out.http_status != 429 and bound >= self.timeout_seconds:
                # Replicate kept a whole call's time without an answer (not our budget's wait, nor the
                # job's deadline coming): the transport saw no end to tell the circuit, so tell it here.
                await self._circuit_failed()
            raise timed_out from error
        except ValueError as error:  # a 2xx whose body is not JSON
            kind = UnknownCreateOutcome if creating else TransientProviderError
            raise kind(f"unexpected answer from Replicate: {error}", error_class="ProviderResponseInvalid") from error
        finally:
            metrics.replicate_latency.labels(operation).observe(time.perf_counter() - started)
            _retry_hint.reset(token)

    async def _circuit_failed(self) -> None:
        if self._limiter is not None and self._limiter.circuit is not None:
            await self._limiter.circuit.failed()

    async def _read(self, call: Callable[[], Awaitable[Any]], *, creating: bool = False) -> Prediction:
        try:
            return _prediction(await call())
        except _Unreadable as error:
            # E.g. a status newer than this code: an answer, but none we can act on.
            kind = UnknownCreateOutcome if creating else TransientProviderError
            raise kind(f"unexpected answer from Replicate: {error}", error_class="ProviderResponseInvalid") from error

    async def create(
        self, model: str, input: dict[str, Any], *, webhook: str | None = None, deadline: datetime | None = None
    ) -> Prediction:
        body: dict[str, Any] = {"input": input}
        if webhook is not None:
            body.update(webhook=webhook, webhook_events_filter=list(self.webhook_events))
        headers = {"Cancel-After": cancel_after(deadline)} if deadline is not None else {}
        slot = None
        if self._limiter is not None:
            # The token first, outside the create's own time bound: a long wait for it is no timeout
            # (only the job's deadline bounds it), and a create that waits for it has not been sent.
            with unsent():  # the caller may give the create up while it waits for its token
                slot = await by_deadline(deadline, self._limiter.reserve("create"), "a create token")
        taken = _create_slot.set(slot)
        try:
            return await self._read(
                lambda: self._request(
                    "POST",
                    f"/v1/models/{model}/predictions",
                    operation="create",
                    deadline=deadline,
                    creating=True,
                    json=body,
                    headers=headers,
                ),
                creating=True,
            )
        finally:
            _create_slot.reset(taken)

    async def get(self, prediction_id: str, *, deadline: datetime | None = None) -> Prediction:
        return await self._read(
            lambda: self._request("GET", f"/v1/predictions/{prediction_id}", operation="get", deadline=deadline)
        )

    async def cancel(self, prediction_id: str) -> None:
        await self._request("POST", f"/v1/predictions/{prediction_id}/cancel", operation="cancel", deadline=None)

    async def model_schema(self, model: str) -> tuple[str | None, dict[str, Any]]:
        """(latest version id, its openapi_schema) from `GET /v1/models/{owner}/{name}`."""
        found = await self._request("GET", f"/v1/models/{model}", operation="model", deadline=None)
        latest = found.get("latest_version") if isinstance(found, dict) else None
        if not isinstance(latest, dict) or not isinstance(latest.get("openapi_schema"), dict):
            raise PermanentProviderError(f"{model} has no latest version with a schema", error_class="NoSchema")
        return latest.get("id"), latest["openapi_schema"]

    async def find_recent(
        self, model: str, input: dict[str, Any], since: datetime, *, deadline: datetime | None = None
    ) -> list[Prediction]:
        """Every page of Replicate's list, newest first, down to the first prediction created before
        `since` (Replicate's clock): a window bounded by time, however many pages it holds, and by the
        job's deadline. Only predictions of `model` with exactly this `input`."""
        found: list[Prediction] = []
        path: str | None = "/v1/predictions"
        while path is not None:
            page = await self._request("GET", path, operation="list", deadline=deadline)
            results = page.get("results") if isinstance(page, dict) else None
            if not isinstance(results, list):
                raise TransientProviderError("unexpected list from Replicate", error_class="ProviderResponseInvalid")
            older = False
            for item in results:
                if not isinstance(item, dict):
                    continue
                created = _timestamp(item.get("created_at"))
                if created is not None and created < since:
                    older = True
                elif item.get("model") == model and item.get("input") == input:
                    try:
                        found.append(_prediction(item))
                    except _Unreadable:
                        continue
            following = page.get("next")
            path = following if isinstance(following, str) and following and not older else None
        return found

    async def aclose(self) -> None:
        await self._transport.aclose()


def _mapped(
    error: ReplicateError, hint: dict[str, float], *, creating: bool
) -> TransientProviderError | PermanentProviderError:
    status = error.status or 0
    transient = status in _TRANSIENT_STATUS or status >= 500
    fields: dict[str, Any] = {
        "http_status": status or None,
        "retry_after": hint.get("retry_after"),
        "error_class": f"Replicate{status}" if status else "ReplicateError",
    }
    if creating and status not in REFUSED_CREATE and transient:
        # A gateway's 502/504, a 500, a 408: the request reached Replicate, the prediction may exist.
        return UnknownCreateOutcome(_detail(error), **fields)
    mapped = (TransientProviderError if transient else PermanentProviderError)(_detail(error), **fields)
    mapped.create_rejected = creating and status in REFUSED_CREATE
    return mapped


def _timed_out(hint: dict[str, float], bound: float, *, creating: bool) -> TransientProviderError:
    """A call cut off by its bound. A create may have been sent: its outcome is unknown. A read cut off
    while throttled (a 429 and its Retry-After, or our own budget's wait) is throttled still (429)."""
    message = f"Replicate did not answer within {bound:.1f} s"
    # `ReadTimeout`, as httpx names a read that timed out: the same error class as before calls had
    # a bound of their own, for the logs, the attempts and the metrics.
    if creating:
        return UnknownCreateOutcome(message, error_class="ReadTimeout")
    throttled = hint.get("status") == 429 or "throttled" in hint
    return TransientProviderError(
        message,
        http_status=429 if throttled else None,
        retry_after=hint.get("retry_after"),
        error_class="ReadTimeout",
    )
