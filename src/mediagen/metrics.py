"""Prometheus metrics: what the API and the workers are doing, in one place.

The API serves them at `GET /metrics` (its own port). Each worker process serves them on
`MEDIAGEN_WORKER_METRICS_HOST`:`MEDIAGEN_WORKER_METRICS_PORT` (default 127.0.0.1:9191, loopback like
the API; a second worker process on the same host takes the next free port up to +16), port 0 to turn
that off. Both show only families with samples (`exposed`): a labelled metric nothing has counted yet
is left out rather than shown as an empty family.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- API ------------------------------------------------------------------------------------------
http_requests = Counter("mediagen_http_requests_total", "HTTP requests", ["method", "route", "status"])
http_latency = Histogram("mediagen_http_request_seconds", "HTTP request latency", ["method", "route"], buckets=_LATENCY)

# --- worker ---------------------------------------------------------------------------------------
jobs_finished = Counter("mediagen_jobs_finished_total", "Jobs that reached a final status", ["status"])
attempts = Counter("mediagen_attempts_total", "Attempts by outcome and error class", ["outcome", "error_class"])
retries_scheduled = Counter("mediagen_retries_scheduled_total", "Retries scheduled", ["error_class"])
replicate_latency = Histogram(
    "mediagen_replicate_call_seconds", "Replicate API call latency", ["operation"], buckets=_LATENCY
)
download_latency = Histogram("mediagen_output_download_seconds", "Output download latency", buckets=_LATENCY)
store_latency = Histogram("mediagen_output_store_seconds", "Output store latency", buckets=_LATENCY)
replicate_tokens = Counter(
    "mediagen_replicate_tokens_total", "Tokens taken from the shared Replicate budgets", ["budget"]
)
replicate_token_wait = Histogram(
    "mediagen_replicate_token_wait_seconds",
    "Time waited for a Replicate budget token",
    ["budget"],
    buckets=(0.0005, 0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120),
)
replicate_tokens_late = Counter(
    "mediagen_replicate_tokens_late_total", "Budget slots given up because the caller woke too late", ["budget"]
)
replicate_throttled = Counter("mediagen_replicate_throttled_total", "429s received from Replicate", ["budget"])
replicate_circuit_open = Gauge(
    "mediagen_provider_circuit_open",
    "1 while this process last saw the account's circuit open (an outage)",
    ["provider"],
)
replicate_circuit_transitions = Counter(
    "mediagen_provider_circuit_transitions_total",
    "The account's circuit opened or closed (counted by the process that changed it)",
    ["provider", "to"],
)
spend_usd = Counter(
    "mediagen_spend_usd_total",
    "USD spent on predictions (by the price table; unknown prices count nothing)",
    ["model", "provider"],
)
images_made = Counter(
    "mediagen_prediction_images_total", "Images the predictions made (what is billed)", ["model", "provider"]
)
failovers = Counter(
    "mediagen_failovers_total",
    "Jobs moved to the next provider (its circuit open, or it refused for capacity)",
    ["from_provider", "to_provider", "reason"],
)
rate_limit_failed_open = Counter(
    "mediagen_rate_limit_failed_open_total",
    "Requests let through unlimited because Redis, where the per-key limits live, was unreachable",
    ["kind"],
)
in_flight = Gauge("mediagen_predictions_in_flight", "Jobs this worker process is running")


class _WithSamples(Collector):
    """The default registry, without the families that have no sample yet."""

    def collect(self) -> Iterator[Metric]:
        return (family for family in REGISTRY.collect() if family.samples)


exposed = _WithSamples()
"""What `/metrics` serves: pass it to `generate_latest` or `start_http_server`."""


@contextmanager
def timed(histogram: Any) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


class RequestMetrics:
    """Counts requests by route template (not raw path, so ids do not explode the label space)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            http_requests.labels(method, route, str(status)).inc()
            http_latency.labels(method, route).observe(time.perf_counter() - started)


def serve_worker_metrics(host: str, port: int, depth: Callable[[], dict[str, int]]) -> int | None:
    """Start the worker's metrics endpoint on `host` and `port` or the next free one; returns the port used."""
    from prometheus_client import start_http_server
    from prometheus_client.core import GaugeMetricFamily

    class QueueDepth(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            family = GaugeMetricFamily("mediagen_broker_queue_depth", "Messages waiting", labels=["queue"])
            try:
                for queue, size in depth().items():
                    family.add_metric([queue], size)
            except Exception:
                pass  # Redis unreachable: no sample rather than a failed scrape
            yield family

    for candidate in range(port, port + 16):
        try:
            start_http_server(candidate, addr=host, registry=exposed)
        except OSError:
            continue
        REGISTRY.register(QueueDepth())
        return candidate
    return None
