"""fal.ai through the official `fal-client`, queue API only, turned into mediagen's typed errors.

What this adapter does that the client does not (read in `fal_client/client.py`, 1.0.3):

* **Submit, then look ourselves** (`submit`, then `status`/`result` by request id): never `run` or
  `subscribe`, which block. A prediction's id is ``"{owner}/{app}/{request_id}"`` (``fal-ai/flux/<uuid>``):
  fal's status, result and cancel routes need the app as well as the request id, so an attempt resumes
  from the id alone after a crash.
* **No blind retry of a submit.** The client retries every call, submits included, up to 10 times on
  429, 408, 409, an ingress 502/503/504 and any transport error, ignoring `Retry-After`; a retried
  submit whose first try was enqueued is billed twice. `_FalTransport`, under the client's httpx,
  raises our own errors for a submit instead, which the client does not catch: a 429 (or 408, 409,
  503) is a `TransientProviderError` with its `Retry-After` that enqueued nothing, as is a connection
  that never opened; a connection dropped mid-answer, a timeout, or a gateway's 502/504 (without fal's
  `x-fal-request-id`) is an `UnknownCreateOutcome`. Reads are idempotent: the client may retry them,
  bounded by our timeout.
* **Pointing at a stand-in** (`base_url`): the client always builds ``https://queue.fal.run/...`` URLs
  and takes no base URL, transport or httpx client; the adapter gives it its own httpx client (through
  the `_client` property, the one private name it leans on) whose transport sends those requests to
  ``base_url`` (e.g. the fake fal, ``http://127.0.0.1:5056``).
* **fal's statuses as the worker's**: ``IN_QUEUE`` is ``starting``, ``IN_PROGRESS`` ``processing`` (its log
  lines joined, so tqdm bars read as progress), ``COMPLETED`` ``succeeded`` with the image URLs, or
  ``failed`` with fal's error (``retryable`` when the runner, not the input, failed), or ``canceled``.
  Images fal's safety checker flagged are dropped from the output, as Replicate's flux drops them;
  all flagged is a failure.
* **fal's budgets and circuit** (`limiter`, mediagen.providers.ratelimit with ``provider="fal"``): a
  submit waits for a token of fal's `create` budget before it is sent, every other request for one of
  its `other` budget (the client's own retries included), a 429 pauses that budget, and fal's own
  circuit, shared by every worker, keeps everyone off fal while it is down (ProviderOutage, nothing sent).
  fal publishes no per-minute limit on its queue (its limit is concurrency: requests beyond it wait
  ``IN_QUEUE``, never refused); the budgets keep a burst of ours from becoming 429s.
* **Reconciling an unknown submit** has nothing to read: fal's queue API lists no requests, so
  `find_recent` answers `PermanentProviderError` and the worker submits again (at worst one extra
  paid request per unknown outcome).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import fal_client
import httpx
from fal_client.client import USER_AGENT

from mediagen.core.errors import (
    MediagenError,
    PermanentProviderError,
    TransientProviderError,
    UnknownCreateOutcome,
)
from mediagen.providers.base import Prediction, by_deadline, unsent
from mediagen.providers.circuit import send_told
from mediagen.providers.ratelimit import Budget, RateLimiter

T = TypeVar("T")
_TRANSIENT_STATUS: Final = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_REFUSED_SUBMIT: Final = frozenset({408, 409, 429, 503})
"""Answers to a submit that fal-client would retry and that surely enqueued nothing."""
MIN_START_TIMEOUT: Final = 1.5
"""fal-client refuses a `start_timeout` of 1 s or less."""
CANCELLED_TYPES: Final = frozenset({"request_cancelled", "cancelled", "canceled"})


def prediction_id(endpoint: str, request_id: str) -> str:
    """The id an attempt records: the endpoint's owner and app, then fal's request id."""
    owner, app = endpoint.split("/")[:2]
    return f"{owner}/{app}/{request_id}"


def split_prediction_id(value: str) -> tuple[str, str]:
    """(``owner/app``, request id) of a prediction id; PermanentProviderError for anything else."""
    app, _, request_id = value.rpartition("/")
    if app.count("/") != 1 or not request_id:
        raise PermanentProviderError(f"not a fal prediction id: {value!r}", http_status=404, error_class="FalBadId")
    return app, request_id


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class _FalTransport(httpx.AsyncBaseTransport):
    """Under fal-client's httpx client: to the stand-in when `base_url` is set, and no blind retry of a submit."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        base_url: str | None,
        limiter: RateLimiter | None = None,
        default_pause: float = 1.0,
    ) -> None:
        self._inner = inner
        self._base = httpx.URL(base_url) if base_url else None
        self._limiter = limiter
        self._default_pause = default_pause

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One request, told to fal's circuit (a 5xx or a lost connection fails, any other answer succeeds)."""
        circuit = self._limiter.circuit if self._limiter is not None else None
        response = await send_told(circuit, lambda: self._inner.handle_async_request(request))
        if response.status_code == 429 and self._limiter is not None:
            seconds = _retry_after(response)
            budget: Budget = "create" if request.method == "POST" else "other"
            self._limiter.pause(budget, self._default_pause if seconds is None else seconds)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._base is not None and request.url.scheme == "https":
            request.url = request.url.copy_with(scheme=self._base.scheme, host=self._base.host, port=self._base.port)
            request.headers["host"] = self._base.netloc.decode("ascii")
        if request.method != "POST":
            if self._limiter is not None:
                # Each read (the client's own retries included) waits for a token; ProviderOutage while
                # fal's circuit is open, nothing sent.
                await self._limiter.acquire("other")
            return await self._send(request)
        # A submit's token was taken by FalProvider.create, outside the call's time bound.
        try:
            response = await self._send(request)
            # Read here: a connection dropped mid-answer must not reach the client, which would submit again.
            body = await response.aread()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # The request never left: no request can have been enqueued because of it.
            raise TransientProviderError(
                f"cannot reach fal: {type(error).__name__}", error_class=type(error).__name__
            ) from error
        except httpx.TransportError as error:
            raise UnknownCreateOutcome(
                f"fal did not answer the submit: {type(error).__name__}", error_class=type(error).__name__
            ) from error
        status = response.status_code
        if status in _REFUSED_SUBMIT:
            refused = TransientProviderError(
                f"fal refused the submit: HTTP {status}",
                http_status=status,
                retry_after=_retry_after(response),
                error_class=f"Fal{status}",
            )
            refused.create_rejected = True
            raise refused
        if status in (502, 504) and "x-fal-request-id" not in response.headers:
            raise UnknownCreateOutcome(
                f"fal's gateway answered the submit {status}", http_status=status, error_class=f"FalGateway{status}"
            )
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Client(fal_client.AsyncClient):
    """The unmodified client on our own httpx client (its own is built inside the `_client` property)."""

    def __init__(self, key: str, http: httpx.AsyncClient, timeout_seconds: float) -> None:
        super().__init__(key=key, default_timeout=timeout_seconds)
        self.http = http

    @property
    def _client(self) -> Awaitable[httpx.AsyncClient]:
        async def ready() -> httpx.AsyncClient:
            return self.http

        return ready()


def _error_text(error: fal_client.FalClientHTTPError) -> str:
    """fal's `detail`: a string, or a list of `{loc, msg, type}` (a model's validation errors)."""
    detail: Any = error.message
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        return "; ".join(parts) or f"HTTP {error.status_code}"
    return str(detail) if detail else f"HTTP {error.status_code}"


def _mapped(error: fal_client.FalClientHTTPError, *, creating: bool) -> MediagenError:
    status = error.status_code
    kind = TransientProviderError if status in _TRANSIENT_STATUS or status >= 500 else PermanentProviderError
    error_class = f"Fal{status}" if not error.error_type else f"Fal{status}:{error.error_type}"
    mapped = kind(
        _error_text(error), http_status=status, retry_after=_retry_after(error.response), error_class=error_class
    )
    mapped.create_rejected = creating
    return mapped


def _is_outcome(error: MediagenError, *, failed: bool) -> bool:
    """Whether a failed read of a COMPLETED request's result is the request's own outcome.

    When its status says it failed (`error` set), the result's error answer is that failure. Otherwise
    (success, or an app that does not report errors in its status) only a 4xx from fal itself is: a
    5xx, a 429 or a refused key is the read's problem, and a 404 means the request is gone."""
    status = error.http_status
    if status is None or status in (401, 403, 429):
        return False
    if failed:
        return status != 404
    answered_by_fal = isinstance(error.__cause__, fal_client.FalClientHTTPError) and (
        "x-fal-request-id" in error.__cause__.response.headers
    )
    return answered_by_fal and 400 <= status < 500 and status != 404


def _logs(entries: list[dict[str, Any]] | None) -> str:
    return "\n".join(str(entry.get("message", "")) for entry in entries or []) + ("\n" if entries else "")


class FalProvider:
    """fal.ai behind the `Provider` protocol; `model` is a fal endpoint id (``fal-ai/flux/schnell``)."""

    def __init__(
        self,
        *,
        key: str,
        base_url: str | None = None,
        timeout_seconds: float = 30.0,
        max_connections: int = 200,
        limiter: RateLimiter | None = None,
        default_throttle_seconds: float = 1.0,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self._limiter = limiter
        """fal's budgets and circuit (`provider="fal"`), shared by every worker through Redis."""
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        transport = _FalTransport(
            httpx.AsyncHTTPTransport(limits=limits), base_url, limiter, default_pause=default_throttle_seconds
        )
        self._http = httpx.AsyncClient(
            transport=transport,
            headers={"Authorization": f"Key {key}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout_seconds, connect=5.0),
        )
        self.client = _Client(key, self._http, timeout_seconds)

    def _bound(self, deadline: datetime | None) -> float:
        """Seconds a call may take: `timeout_seconds`, less when the job's deadline comes sooner."""
        if deadline is None:
            return self.timeout_seconds
        return max(0.0, min(self.timeout_seconds, (deadline - datetime.now(UTC)).total_seconds()))

    async def _call(
        self, call: Callable[[], Awaitable[T]], *, creating: bool = False, deadline: datetime | None = None
    ) -> T:
        """`call()` as a whole (the client's own retries included) within `_bound(deadline)`, errors ours."""
        bound = self._bound(deadline)
        if bound <= 0:  # nothing is sent: no outcome to doubt
            raise TransientProviderError("the job's deadline has passed", error_class="ProviderTimeout")
        try:
            return await asyncio.wait_for(call(), bound)
        except MediagenError:
            raise  # from _FalTransport, already ours
        except fal_client.FalClientHTTPError as error:
            raise _mapped(error, creating=creating) from error
        except TimeoutError as error:
            if bound >= self.timeout_seconds and self._limiter is not None and self._limiter.circuit is not None:
                # fal kept a whole call's time without an answer: the transport saw no end to tell the circuit.
                await self._limiter.circuit.failed()
            kind = UnknownCreateOutcome if creating else TransientProviderError
            raise kind(f"fal did not answer within {bound:.1f}s", error_class="FalTimeout") from error
        except httpx.TransportError as error:
            raise TransientProviderError(
                f"fal did not answer: {type(error).__name__}", error_class=type(error).__name__
            ) from error

    async def create(
        self, model: str, input: dict[str, Any], *, webhook: str | None = None, deadline: datetime | None = None
    ) -> Prediction:
        """Submit to fal's queue (fal POSTs the result to `webhook` when it completes, when given).

        With a `deadline`, fal gives the request up if it has not started by then (`start_timeout`, fal's
        `X-Fal-Request-Timeout`; only when more than MIN_START_TIMEOUT s are left, fal-client's least)."""
        if self._limiter is not None:
            # The token first, outside the submit's own time bound (only the job's deadline bounds the
            # wait); ProviderOutage while fal's circuit is open, nothing sent.
            with unsent():  # the caller may give the submit up while it waits for its token
                await by_deadline(deadline, self._limiter.reserve("create"), "fal submit token")
        start_timeout = None
        if deadline is not None:
            left = (deadline - datetime.now(UTC)).total_seconds()
            start_timeout = left if left > MIN_START_TIMEOUT else None
        handle = await self._call(
            lambda: self.client.submit(model, input, webhook_url=webhook, start_timeout=start_timeout),
            creating=True,
            deadline=deadline,
        )
        return Prediction(id=prediction_id(model, handle.request_id), status="starting")

    async def get(self, prediction_id: str, *, deadline: datetime | None = None) -> Prediction:
        app, request_id = split_prediction_id(prediction_id)
        handle = await self.client.get_handle(app, request_id)
        status = await self._call(lambda: handle.status(with_logs=True), deadline=deadline)
        if isinstance(status, fal_client.Queued):
            return Prediction(id=prediction_id, status="starting", logs="")
        if isinstance(status, fal_client.InProgress):
            return Prediction(id=prediction_id, status="processing", logs=_logs(status.logs))
        assert isinstance(status, fal_client.Completed)
        logs = _logs(status.logs)
        seconds = status.metrics.get("inference_time") if status.metrics else None
        try:
            result = await self._call(handle.get, deadline=deadline)
        except (TransientProviderError, PermanentProviderError) as error:
            if not _is_outcome(error, failed=status.error is not None):
                raise  # the read failed, not the request: the next look tries again
            return self._ended_badly(prediction_id, status, error, logs, seconds)
        return self._succeeded(prediction_id, result, logs, seconds)

    @staticmethod
    def _ended_badly(
        prediction_id: str, status: fal_client.Completed, error: MediagenError, logs: str, seconds: Any
    ) -> Prediction:
        kind = status.error_type or error.error_class.partition(":")[2]
        if kind in CANCELLED_TYPES:
            return Prediction(id=prediction_id, status="canceled", error=error.message, logs=logs)
        retryable = error.transient
        return Prediction(
            id=prediction_id,
            status="failed",
            error=f"fal {error.http_status}: {error.message}",
            logs=logs,
            metrics={"predict_time": seconds} if isinstance(seconds, (int, float)) else None,
            retryable=retryable,
        )

    @staticmethod
    def _succeeded(prediction_id: str, result: dict[str, Any], logs: str, seconds: Any) -> Prediction:
        images = [image for image in result.get("images") or [] if isinstance(image, dict)]
        flagged = result.get("has_nsfw_concepts") or []
        kept = [image["url"] for i, image in enumerate(images) if not (i < len(flagged) and flagged[i])]
        reported: dict[str, Any] = {"image_count": len(kept)}
        sizes = [(image.get("width"), image.get("height")) for image in images]
        known = [(w, h) for w, h in sizes if isinstance(w, int) and isinstance(h, int)]
        if images and len(known) == len(sizes):
            # What fal bills: each image made (flagged ones too), its megapixels rounded up.
            reported["megapixels"] = sum(math.ceil(w * h / 1_000_000) for w, h in known)
        if isinstance(seconds, (int, float)):
            reported["predict_time"] = seconds
        if images and not kept:
            return Prediction(
                id=prediction_id,
                status="failed",
                error="All generated images contained NSFW content.",
                logs=logs,
                metrics=reported,
                retryable=False,
            )
        return Prediction(id=prediction_id, status="succeeded", output=kept, logs=logs, metrics=reported)

    async def cancel(self, prediction_id: str) -> None:
        """Cancel it; one already COMPLETED is left as it is, as Replicate's cancel leaves a finished one."""
        app, request_id = split_prediction_id(prediction_id)
        handle = await self.client.get_handle(app, request_id)
        try:
            await self._call(handle.cancel)
        except PermanentProviderError as error:
            if error.http_status != 400:
                raise

    async def find_recent(
        self, model: str, input: dict[str, Any], since: datetime, *, deadline: datetime | None = None
    ) -> list[Prediction]:
        raise PermanentProviderError(
            "fal's queue API lists no requests: an unknown submit cannot be reconciled",
            error_class="FalNoRequestList",
        )

    async def aclose(self) -> None:
        await self._http.aclose()
