"""Wake-ups about jobs, between processes: Redis pub/sub, one channel per job, one connection per process.

The job row in PostgreSQL is the truth; an event here is only a hint that the row (or the job's
prediction at Replicate) may have changed, sent so that whoever waits can look *now* instead of at its
next poll. Events can be lost (Redis down, a process restarting, a listener subscribing late), so a
waiter always re-reads the row after waking, and never waits without a timeout.

    notifier = Notifier(redis, namespace="mediagen")      # one per process, on its event loop

    notifier.publish(job_id, {"type": "job", "status": "running", "attempt": 1})
        # never blocks and never raises: queued, then sent with the others queued in the same loop
        # turn in one pipeline; dropped (counted, logged) when Redis is unreachable or too many wait
    await notifier.publish_now(job_id, event)             # sent now; how many listeners got it

    async with notifier.listen(job_id) as events:         # subscribed (confirmed) when this returns
        row = await read_the_row()                        # so nothing published after this is missed
        while not finished(row):
            event = await events.next(timeout=30)         # the next event, or None after 30 s
            row = await read_the_row()
        # or: async for event in events: ...              # forever; put a timeout around it

    event = await notifier.wait(job_id, timeout=5)        # one-shot: subscribe, wait, unsubscribe
        # (misses an event published before it subscribed: prefer listen() when that matters)

Events are JSON objects carrying at least `type` and `job_id` (added by `publish`):

* `{"type": "job", "status": "running"|"retrying"|"succeeded"|"failed"|"canceled", "attempt": n, ...}`
  from the worker at every state change of the job (`retrying` carries `delay_seconds`);
* `{"type": "prediction", "prediction_id": ..., "status": ..., "progress": {...}|null}` from the API's
  webhook receiver when Replicate reports on the job's prediction (start, logs, completed).

Why Redis pub/sub and not PostgreSQL LISTEN/NOTIFY: Redis is already the broker every process holds a
pool to; a NOTIFY inside the hot single-statement transitions would add a round trip (or a trigger's
work) to every state change of ~200 jobs/s, and a LISTEN connection per process would be taken from the
small PostgreSQL connection budget. Pub/sub delivery is at-most-once, which is exactly what a hint
needs. Channels are per job, subscribed only while someone in the process waits on that job, so a
process receives only the events it asked for (no fan-out of every job's events to every replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import orjson
from redis.asyncio import Redis

from mediagen.logging import log_event

Event = dict[str, Any]
SUBSCRIBE_TIMEOUT = 2.0
"""How long `listen()` waits for Redis to confirm a subscription before going on without it."""


class Notifier:
    def __init__(self, redis: Redis, *, namespace: str, max_pending: int = 10_000) -> None:
        self.redis = redis
        self.namespace = namespace
        self.max_pending = max_pending
        self.published = 0
        self.dropped = 0
        self._outbox: list[tuple[str, bytes]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._queues: dict[str, set[asyncio.Queue[Event]]] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._confirmations: dict[str, deque[asyncio.Future[None]]] = {}
        self._closed = False

    def channel(self, job_id: uuid.UUID | str) -> str:
        return f"{self.namespace}:job-events:{job_id}"

    # --- publishing --------------------------------------------------------------------------------

    def publish(self, job_id: uuid.UUID | str, event: Event) -> None:
        """Send `event` about `job_id` to whoever listens, soon; never blocks, never raises."""
        if self._closed:
            return
        if len(self._outbox) >= self.max_pending:
            self.dropped += 1
            return
        payload = orjson.dumps({**event, "job_id": str(job_id)})
        self._outbox.append((self.channel(job_id), payload))
        if self._flusher is None or self._flusher.done():
            try:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
            except RuntimeError:  # no loop (a synchronous caller): nobody to wake in this process
                self._outbox.clear()

    async def publish_now(self, job_id: uuid.UUID | str, event: Event) -> int:
        """Send `event` at once (one PUBLISH); how many listeners, in every process, received it.

        Raises when Redis cannot be reached: for a caller whose answer depends on the delivery."""
        payload = orjson.dumps({**event, "job_id": str(job_id)})
        receivers = int(await self.redis.publish(self.channel(job_id), payload))
        self.published += 1
        return receivers

    async def _flush_soon(self) -> None:
        await asyncio.sleep(0)  # let the current loop turn add its events to the same pipeline
        await self.flush()

    async def flush(self) -> None:
        """Send everything queued so far (what `publish` schedules by itself; for tests and shutdown)."""
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for channel, payload in batch:
                        pipe.publish(channel, payload)
                    await pipe.execute()
                self.published += len(batch)
            except Exception as error:
                self.dropped += len(batch)
                log_event("notify.publish_failed", logging.WARNING, events=len(batch), error=repr(error))
                return

    # --- listening ---------------------------------------------------------------------------------

    def listen(self, job_id: uuid.UUID | str) -> Subscription:
        return Subscription(self, self.channel(job_id))

    async def wait(self, job_id: uuid.UUID | str, timeout: float) -> Event | None:  # noqa: ASYNC109
        """The next event about `job_id` within `timeout` seconds, else None."""
        async with self.listen(job_id) as events:
            return await events.next(timeout)

    async def _start(self) -> None:
        async with self._start_lock:
            if self._pubsub is None:
                pubsub: Any = self.redis.pubsub()
                await pubsub.connect()  # once, here: concurrent first subscribes would each take one
                self._pubsub = pubsub

    async def _subscribe(self, channel: str, queue: asyncio.Queue[Event]) -> None:
        try:
            await self._start()
        except Exception as error:  # Redis unreachable: the waiter lives on its timeouts
            log_event("notify.subscribe_failed", logging.WARNING, error=repr(error))
            return
        queues = self._queues.setdefault(channel, set())
        queues.add(queue)
        ready = self._ready.get(channel)
        if ready is None:
            ready = self._ready[channel] = asyncio.get_running_loop().create_future()
            self._confirmations.setdefault(channel, deque()).append(ready)
            try:
                await self._pubsub.subscribe(channel)
            except Exception as error:
                log_event("notify.subscribe_failed", logging.WARNING, error=repr(error))
                if not ready.done():
                    ready.set_result(None)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.get_running_loop().create_task(self._read(), name="notify-reader")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), SUBSCRIBE_TIMEOUT)

    async def _unsubscribe(self, channel: str, queue: asyncio.Queue[Event]) -> None:
        queues = self._queues.get(channel)
        if queues is None:
            return
        queues.discard(queue)
        if queues:
            return
        del self._queues[channel]
        self._ready.pop(channel, None)
        if self._pubsub is not None and not self._closed:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while not self._closed:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Redis went away: redis-py reconnects and resubscribes on the next read. Events sent in
                # between are lost, which waiters survive through their timeouts.
                log_event("notify.listen_failed", logging.WARNING, error=repr(error))
                await asyncio.sleep(1.0)
                continue
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if kind == "subscribe":
            pending = self._confirmations.get(channel)
            if pending:
                future = pending.popleft()
                if not future.done():
                    future.set_result(None)
                if not pending:
                    del self._confirmations[channel]
        elif kind == "message":
            try:
                event = orjson.loads(message["data"])
            except orjson.JSONDecodeError:
                return
            for queue in self._queues.get(channel, ()):
                queue.put_nowait(event)

    async def aclose(self) -> None:
        await self.flush()
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()


class Subscription:
    """Events about one job, from the moment `async with` returns until it exits."""

    def __init__(self, notifier: Notifier, channel: str) -> None:
        self._notifier = notifier
        self._channel = channel
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    async def __aenter__(self) -> Subscription:
        await self._notifier._subscribe(self._channel, self._queue)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._notifier._unsubscribe(self._channel, self._queue)

    async def next(self, timeout: float | None) -> Event | None:  # noqa: ASYNC109 (None on timeout is the point)
        """The next event, or None when `timeout` seconds pass first (None: wait for ever)."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def pending(self) -> int:
        """Events received and not yet taken."""
        return self._queue.qsize()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next(None)
            if event is not None:
                yield event
