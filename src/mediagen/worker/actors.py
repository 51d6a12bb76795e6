"""The Dramatiq side: the broker with its middleware, and the one actor, a thin shell over the runner.

Concurrency model: `run_job` is an async actor on Dramatiq's AsyncIO middleware. All jobs of a worker
process share one event loop; a job waiting on Replicate is a coroutine asleep between polls, and the
Dramatiq thread that delivered its message just waits on a future. So in-flight jobs per process =
`MEDIAGEN_WORKER_THREADS` (256 by default), at almost no CPU cost. We chose this over re-enqueueing a
short "poll" message per step because it keeps one message per attempt (less Redis and CPU per job,
see docs/benchmarks.md) while a lease on the job row, not the message, says who holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import uuid
from typing import Any

import dramatiq
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.middleware import Middleware

from mediagen import services
from mediagen.broker import ACTOR_NAME, build_broker
from mediagen.core.errors import WorkerStopping
from mediagen.core.retry import RetryPolicy
from mediagen.logging import configure_logging, log_event
from mediagen.metrics import serve_worker_metrics
from mediagen.notify import Notifier
from mediagen.settings import Settings, get_settings
from mediagen.worker.context import WorkerContext
from mediagen.worker.delivery_sender import WebhookSender
from mediagen.worker.leases import LeaseKeeper
from mediagen.worker.polling import PollSchedule
from mediagen.worker.recovery import Sweeper
from mediagen.worker.retention import RetentionSweep
from mediagen.worker.runner import run_job

_context: WorkerContext | None = None


class QuietAsyncIO(Middleware):
    """Dramatiq's AsyncIO middleware, with uvloop and a 1 s interrupt check.

    Each waiting Dramatiq thread wakes every `interrupt_check_ival` to look for interrupts; at the
    default 0.1 s, 256 waiting threads cost 2,560 wake-ups a second.
    """

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
        thread = EventLoopThread(logging.getLogger("dramatiq.asyncio"), interrupt_check_ival=1.0)
        # A daemon, like Dramatiq's own threads: a worker told twice to stop must be able to exit.
        thread.daemon = True
        thread.start(timeout=5.0)
        set_event_loop_thread(thread)

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        # Dramatiq calls this hook in middleware order, and WorkerResources (after us) must still find
        # the loop running to close its connections: it stops the loop itself, see stop_event_loop().
        pass


def stop_event_loop() -> None:
    thread = get_event_loop_thread()
    if thread is not None:
        thread.stop()  # type: ignore[no-untyped-call]
        thread.join()
        set_event_loop_thread(None)


class WorkerResources(Middleware):
    """Builds the worker's resources on its event loop before it consumes; hands jobs back at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sweeper: Sweeper | None = None
        self.retention: RetentionSweep | None = None
        self.webhook_sender: WebhookSender | None = None
        self.redis: Any = None
        self._sync_redis: Any = None

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        # Before Dramatiq starts consuming: no message may arrive ahead of the resources it needs.
        configure_logging(self.settings.log_level)
        thread = get_event_loop_thread()
        assert thread is not None, "QuietAsyncIO must come before WorkerResources"
        thread.run_coroutine(self._start())
        # As in the API: long-lived objects out of the collector's sight, fewer young collections.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        port = None
        if self.settings.worker_metrics_port:
            port = serve_worker_metrics(
                self.settings.worker_metrics_host, self.settings.worker_metrics_port, self._queue_depth
            )
        log_event(
            "worker.started", threads=self.settings.worker_threads, queue=self.settings.queue_name, metrics_port=port
        )

    def _queue_depth(self) -> dict[str, int]:
        import redis

        s = self.settings
        if self._sync_redis is None:
            self._sync_redis = redis.Redis.from_url(services.require(s.redis_url, "REDIS_URL"), socket_timeout=2)
        queue = f"{s.redis_namespace}:{s.queue_name}"
        return {
            s.queue_name: int(self._sync_redis.llen(queue)),
            f"{s.queue_name}.DQ": int(self._sync_redis.llen(f"{queue}.DQ")),
        }

    async def _start(self) -> None:
        global _context
        s = self.settings
        # Hundreds of jobs share the pool: waiting for a connection is normal here, failing is not.
        db = services.database(s, pool_timeout=60)
        self.redis = services.redis_client(s)
        dispatcher = services.dispatcher(s, self.redis)
        leases = LeaseKeeper(db, lease_seconds=s.lease_seconds)
        adapters = services.providers(s, self.redis)
        _context = WorkerContext(
            db=db,
            provider=next(iter(adapters.values())),
            providers=adapters,
            storage=services.storage(s),
            downloader=services.downloader(s),
            dispatcher=dispatcher,
            leases=leases,
            policy=RetryPolicy(
                max_attempts=s.max_attempts,
                base_seconds=s.retry_base_seconds,
                cap_seconds=s.retry_cap_seconds,
                retry_after_cap_seconds=s.retry_after_cap_seconds,
            ),
            lease_seconds=s.lease_seconds,
            polls=PollSchedule(initial=s.poll_initial_seconds, maximum=s.poll_max_seconds),
            notifier=Notifier(self.redis, namespace=s.redis_namespace),
            prices=s.price_table,
            webhook_url=s.replicate_webhook_url,
            webhook_urls={"replicate": s.replicate_webhook_url, "fal": s.fal_webhook_url},
            webhook_poll_seconds=s.replicate_webhook_poll_seconds,
            webhook_polls={"replicate": s.replicate_webhook_poll_seconds, "fal": s.fal_webhook_poll_seconds},
        )
        leases.start()
        self.sweeper = Sweeper(
            db,
            dispatcher,
            _context.provider,
            interval=s.sweep_interval_seconds,
            stale_seconds=s.stale_dispatch_seconds,
            lease_seconds=s.lease_seconds,
            notifier=_context.notifier,
            providers=_context.providers,
            prices=_context.prices,
        )
        self.sweeper.start()
        if s.retention_days is not None:
            self.retention = RetentionSweep(
                db,
                _context.storage,
                days=s.retention_days,
                interval=s.retention_sweep_seconds,
                batch=s.retention_batch,
            )
            self.retention.start()
        # Always: a key made with `mediagen keys create` has a webhook secret of its own.
        self.webhook_sender = WebhookSender(
            db,
            secret=s.webhook_secret.get_secret_value() if s.webhook_secret is not None else None,
            public_base_url=s.public_base_url,
            allowed_networks=s.webhook_allowed_networks,
            timeout_seconds=s.webhook_timeout_seconds,
            retry_base_seconds=s.webhook_retry_base_seconds,
            retry_cap_seconds=s.webhook_retry_cap_seconds,
            give_up_seconds=s.webhook_give_up_seconds,
            poll_seconds=s.webhook_poll_seconds,
        )
        self.webhook_sender.start()

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        if _context is not None:
            log_event("worker.stopping", in_flight=len(_context.leases.holds))
            _context.stopping = True
            thread = get_event_loop_thread()
            if thread is not None:
                thread.loop.call_soon_threadsafe(
                    _context.leases.tell_all, WorkerStopping("the worker is shutting down")
                )

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        thread = get_event_loop_thread()
        if thread is not None and _context is not None:
            thread.run_coroutine(self._stop())
        stop_event_loop()
        log_event("worker.stopped")

    async def _stop(self) -> None:
        assert _context is not None
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self.retention is not None:
            await self.retention.stop()
        if self.webhook_sender is not None:
            await self.webhook_sender.stop()
        await _context.leases.stop()
        for retrying in list(_context.cancels):  # left to the predictions' Cancel-After
            retrying.cancel()
        await _context.notifier.aclose()
        for adapter in _context.providers.values():
            await adapter.aclose()
        await _context.downloader.aclose()
        await _context.db.dispose()
        await self.redis.aclose()


def _build() -> dramatiq.Broker:
    settings = get_settings()
    resources = WorkerResources(settings)
    broker = build_broker(
        services.require(settings.redis_url, "REDIS_URL"),
        namespace=settings.redis_namespace,
        job_time_limit_ms=int((settings.job_deadline_seconds + 120) * 1000),
        # Order matters: the loop must exist before the resources are built on it.
        extra_middleware=[QuietAsyncIO(), resources],
    )
    dramatiq.set_broker(broker)
    return broker


broker = _build()


@dramatiq.actor(actor_name=ACTOR_NAME, queue_name=get_settings().queue_name)
async def run_job_actor(job_id: str) -> None:
    assert _context is not None, "worker resources are not started"
    try:
        await run_job(_context, uuid.UUID(job_id))
    except Exception as error:
        # Only infrastructure gets here (the runner records every error of an attempt): most often
        # PostgreSQL out of reach before the job could be claimed. The job row is untouched, so
        # deliver it again shortly; failing that, the recovery sweep will.
        log_event("job.delivery.failed", logging.WARNING, job_id=job_id, error=f"{type(error).__name__}: {error}")
        with contextlib.suppress(Exception):
            await _context.dispatcher.send([job_id], delay=5.0)
