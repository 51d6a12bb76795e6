"""The broker: Dramatiq on Redis, its middleware, and the async dispatcher that feeds it.

One message per job delivery, whose Redis message id *is the job id*. That makes every delivery of a
job addressable, so the recovery sweep can ask Redis "is there still a message for this job?" (see
mediagen.worker.recovery) instead of guessing, and a duplicate send overwrites rather than multiplies.

The API and the worker's own code send with `Dispatcher` (redis.asyncio, never blocking the event loop),
writing exactly what `RedisBroker.enqueue` writes: the message body into `<ns>:<queue>.msgs` and its id
onto the `<ns>:<queue>` list (`.DQ` for delayed messages, which Dramatiq's worker moves to the main
queue when their `eta` has passed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import ShutdownNotifications, TimeLimit
from redis.asyncio import Redis

ACTOR_NAME = "run_job"
# A Dramatiq worker heartbeats on every fetch (at least once a second, even idle); one silent this
# long is dead, and the messages it had fetched are stranded.
DEAD_WORKER_SECONDS = 5.0


class JobBroker(RedisBroker):
    """A RedisBroker whose Redis message id is the message id (our messages use the job id)."""

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        message = message.copy(options={"redis_message_id": message.message_id})
        if delay is not None:
            message = message.copy(
                queue_name=f"{message.queue_name}.DQ",
                options={"eta": int(time.time() * 1000) + delay},
            )
        self.emit_before("enqueue", message, delay)
        self.do_enqueue(message.queue_name, message.message_id, message.encode())
        self.emit_after("enqueue", message, delay)
        return message


def build_broker(
    redis_url: str, *, namespace: str, job_time_limit_ms: int, extra_middleware: Sequence[Any] = ()
) -> JobBroker:
    # Only what mediagen uses: per-message hooks cost CPU on every job (AgeLimit, Callbacks and
    # Pipelines are Dramatiq defaults we have no use for).
    middleware = [
        TimeLimit(time_limit=job_time_limit_ms),
        ShutdownNotifications(),
        *extra_middleware,
    ]
    # Retries are not Dramatiq's job here: mediagen.core.retry decides and the runner schedules the next
    # attempt itself, so the Retries middleware is left out on purpose.
    return JobBroker(  # type: ignore[no-untyped-call]
        url=redis_url,
        namespace=namespace,
        middleware=middleware,
        # A killed worker's prefetched messages come back after its heartbeat is this old (ms) ...
        heartbeat_timeout=15_000,
        # ... and a maintenance pass (out of 1,000,000 dispatches) notices it.
        maintenance_chance=20_000,
    )


class Dispatcher:
    """Sends `run_job` messages from async code, one pipeline for any number of jobs."""

    def __init__(self, redis: Redis, *, namespace: str, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._namespace = namespace
        self._main = f"{namespace}:{queue_name}"
        self._delayed = f"{namespace}:{queue_name}.DQ"

    def _encode(self, job_id: str, queue_name: str, options: dict[str, Any]) -> bytes:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name,
            actor_name=ACTOR_NAME,
            args=(job_id,),
            kwargs={},
            options={"redis_message_id": job_id, **options},
            message_id=job_id,
            message_timestamp=int(time.time() * 1000),
        )
        data: bytes = message.encode()
        return data

    async def send(self, job_ids: Sequence[uuid.UUID | str], *, delay: float | None = None) -> None:
        """Deliver each job now, or after `delay` seconds."""
        if not job_ids:
            return
        if delay is None or delay <= 0:
            key, queue, options = self._main, self.queue_name, {}
        else:
            eta = int((time.time() + delay) * 1000)
            key, queue, options = self._delayed, f"{self.queue_name}.DQ", {"eta": eta}
        async with self.redis.pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                text = str(job_id)
                pipe.hset(f"{key}.msgs", text, self._encode(text, queue, options))
            pipe.rpush(key, *(str(job_id) for job_id in job_ids))
            await pipe.execute()

    async def pending(self, job_ids: Sequence[uuid.UUID | str]) -> list[bool]:
        """For each job: is a message for it waiting, delayed, or in the hands of a live worker?

        A message fetched by a worker that has since died (no heartbeat for `DEAD_WORKER_SECONDS`)
        is stranded: Dramatiq would hand it back only after its own heartbeat timeout and a random
        maintenance pass. Such a message counts as lost, and is taken out of the dead worker's
        hands so that it is not delivered a second time.
        """
        ids = [str(job_id) for job_id in job_ids]
        cutoff = int((time.time() - DEAD_WORKER_SECONDS) * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hexists(f"{self._main}.msgs", job_id)
                pipe.hexists(f"{self._delayed}.msgs", job_id)
            pipe.zrangebyscore(f"{self._namespace}:__heartbeats__", 0, cutoff)
            *found, dead = await pipe.execute()
        present = [bool(found[i] or found[i + 1]) for i in range(0, len(found), 2)]
        if not dead or not any(present):
            return present
        held = [
            f"{self._namespace}:__acks__.{worker.decode()}.{queue}"
            for worker in dead
            for queue in (self.queue_name, f"{self.queue_name}.DQ")
        ]
        candidates = [job_id for job_id, live in zip(ids, present, strict=True) if live]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in candidates:
                for key in held:
                    pipe.srem(key, job_id)
            removed = await pipe.execute()
        stranded = {job_id for n, job_id in enumerate(candidates) if any(removed[n * len(held) : (n + 1) * len(held)])}
        return [live and job_id not in stranded for job_id, live in zip(ids, present, strict=True)]
