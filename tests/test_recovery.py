"""No lost job, no double billing: the promises under failure.

Each test runs its own deployment (database, Redis namespace, queue, API and workers, see `make_stack`)
and breaks something real: Redis is flushed or unreachable, a worker is killed with SIGKILL or stopped
with SIGTERM mid-job, PostgreSQL goes away, a create hangs past its timeout. The fake Replicate
counts the predictions created per prompt, which is what a job would be billed for.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from sqlalchemy import text

from conftest import FakeReplicate, Stack, kill_group, submit, unique, wait_for_job
from mediagen.core.db import Database
from mediagen.devtools.embedded import EmbeddedRedis, free_port

FAST = {
    "MEDIAGEN_LEASE_SECONDS": "2",
    "MEDIAGEN_SWEEP_INTERVAL_SECONDS": "0.3",
    "MEDIAGEN_STALE_DISPATCH_SECONDS": "1",
}


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(url: str) -> httpx.AsyncClient:
        made = httpx.AsyncClient(base_url=url, timeout=10)
        clients.append(made)
        return made

    yield make
    for made in clients:
        await made.aclose()


async def attempts_of(stack: Stack, job_id: str) -> list[Any]:
    db = Database(stack.database_url, pool_size=1)
    try:
        async with db.connect() as conn:
            rows = await conn.execute(text("SELECT * FROM attempts WHERE job_id = :id ORDER BY number"), {"id": job_id})
            return list(rows.all())
    finally:
        await db.dispose()


async def wait_running_with_prediction(stack: Stack, job_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await attempts_of(stack, job_id)
        if rows and rows[-1].prediction_id:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} never started a prediction")


async def test_a_job_submitted_while_redis_is_down_still_runs(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    stack: Stack = make_stack(**FAST)
    stack.start_worker()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    api = client(stack.start_api(REDIS_URL=dead_redis))
    prompt = unique("submitted in the dark")

    started = time.monotonic()
    job_id = await submit(api, prompt, width=512, height=512)

    assert time.monotonic() - started < 2
    ready = await api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unavailable")
    status = await wait_for_job(api, job_id, timeout=15)
    assert status["status"] == "succeeded"
    assert fake_replicate.predictions_for(prompt) == 1
    assert any(line["event"] == "job.redispatched" and line["job_id"] == job_id for line in stack.log_lines())


async def test_flushing_redis_loses_no_job(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    private = EmbeddedRedis(tmp_path / "redis")
    try:
        stack: Stack = make_stack(redis=private.url, MEDIAGEN_WORKER_THREADS="4", **FAST)
        api = client(stack.start_api())
        stack.start_worker()
        prompts = [unique(f"flushed {i} [[latency=1]]") for i in range(12)]
        ids = [await submit(api, prompt, width=512, height=512) for prompt in prompts]
        await wait_for_job(api, ids[0], until=("running",))

        redis_sync.Redis.from_url(private.url).execute_command("FLUSHALL")

        finals = [await wait_for_job(api, job_id, timeout=40) for job_id in ids]
        assert [final["status"] for final in finals] == ["succeeded"] * len(ids)
        assert [fake_replicate.predictions_for(prompt) for prompt in prompts] == [1] * len(ids)
    finally:
        private.close()


async def test_a_worker_killed_mid_job_is_replaced_and_the_prediction_resumed(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    stack: Stack = make_stack(**FAST)
    api = client(stack.start_api())
    doomed = stack.start_worker()
    prompt = unique("interrupted [[latency=3]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_running_with_prediction(stack, job_id)

    kill_group(doomed.proc, signal.SIGKILL)
    stack.start_worker()

    status = await wait_for_job(api, job_id, timeout=30)
    assert status["status"] == "succeeded"
    attempts = await attempts_of(stack, job_id)
    assert [a.outcome for a in attempts] == ["abandoned", "succeeded"]
    assert attempts[0].error_class == "WorkerLost"
    assert attempts[1].resumed and attempts[1].prediction_id == attempts[0].prediction_id
    assert fake_replicate.predictions_for(prompt) == 1


async def test_a_job_canceled_while_its_worker_is_dead_ends_canceled_within_a_lease(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    """Given a running job whose worker was SIGKILLed, when its client cancels it and a worker runs again,
    then it ends `canceled` within about one lease, and its prediction is canceled at Replicate, with
    the seconds it ran billed to the attempt (so a canceled job counts toward the spend cap)."""
    per_second = '{"black-forest-labs/flux-schnell": {"per_second": "0.001"}}'
    stack: Stack = make_stack(**FAST, MEDIAGEN_MODEL_PRICES=per_second)
    api = client(stack.start_api())
    doomed = stack.start_worker()
    prompt = unique("canceled in the dark [[latency=60]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_running_with_prediction(stack, job_id)
    kill_group(doomed.proc, signal.SIGKILL)

    response = await api.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    stack.start_worker()
    canceled_at = time.monotonic()

    status = await wait_for_job(api, job_id, timeout=15)
    assert status["status"] == "canceled"
    assert time.monotonic() - canceled_at < 2 * float(FAST["MEDIAGEN_LEASE_SECONDS"]) + 2
    [attempt] = await attempts_of(stack, job_id)
    assert (attempt.outcome, attempt.error_class, attempt.prediction_status) == ("abandoned", "WorkerLost", "canceled")
    assert attempt.predict_time is not None and attempt.predict_time > 0
    assert attempt.cost_usd == (Decimal("0.001") * Decimal(str(attempt.predict_time))).quantize(Decimal("0.000001"))
    prediction = httpx.get(
        f"{fake_replicate.url}/v1/predictions/{attempt.prediction_id}", headers={"Authorization": "Bearer t"}
    ).json()
    assert prediction["status"] == "canceled"
    assert fake_replicate.predictions_for(prompt) == 1


async def test_a_prediction_gone_on_resume_is_recorded_and_replaced_by_a_new_one(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    """Given a job due again whose last attempt holds a prediction Replicate does not know (a 404),
    when a worker resumes it, then the attempt records the lost id and creates one new prediction."""
    stack: Stack = make_stack(**FAST)
    api = client(stack.start_api())
    stack.start_worker()
    prompt = unique("forgotten upstream [[create:422*1]]")
    job_id = await submit(api, prompt, width=512, height=512)
    assert (await wait_for_job(api, job_id))["status"] == "failed"
    db = Database(stack.database_url, pool_size=1)
    try:
        async with db.transaction() as conn:
            await conn.execute(
                text(
                    "UPDATE attempts SET prediction_id = 'gone0', prediction_status = 'processing' WHERE job_id = :id"
                ),
                {"id": job_id},
            )
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'retrying', next_attempt_at = now(), finished_at = NULL, "
                    "max_attempts = 2, dispatched_at = now() - interval '1 hour' WHERE id = :id"
                ),
                {"id": job_id},
            )
    finally:
        await db.dispose()

    status = await wait_for_job(api, job_id, timeout=20)

    assert status["status"] == "succeeded"
    attempts = await attempts_of(stack, job_id)
    assert attempts[-1].gone_prediction_id == "gone0" and not attempts[-1].resumed
    assert attempts[-1].prediction_id not in (None, "gone0")
    assert fake_replicate.predictions_for(prompt) == 1
    gone = [line for line in stack.log_lines() if line.get("event") == "job.prediction.gone"]
    assert [(line["job_id"], line["prediction_id"]) for line in gone] == [(job_id, "gone0")]


async def test_a_worker_stopped_with_sigterm_hands_its_jobs_back(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    stack: Stack = make_stack(**FAST)
    api = client(stack.start_api())
    leaving = stack.start_worker()
    prompt = unique("handed over [[latency=3]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_running_with_prediction(stack, job_id)

    leaving.proc.send_signal(signal.SIGTERM)  # as an orchestrator does: to the main process only
    leaving.proc.wait(timeout=30)
    stack.start_worker()

    status = await wait_for_job(api, job_id, timeout=30)
    assert status["status"] == "succeeded"
    attempts = await attempts_of(stack, job_id)
    assert [a.outcome for a in attempts] == ["abandoned", "succeeded"]
    assert attempts[0].error_class == "WorkerShutdown"
    assert attempts[1].prediction_id == attempts[0].prediction_id
    assert fake_replicate.predictions_for(prompt) == 1


async def test_a_create_that_timed_out_is_found_again_not_repeated(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    stack: Stack = make_stack(MEDIAGEN_REPLICATE_TIMEOUT_SECONDS="1", **FAST)
    api = client(stack.start_api())
    stack.start_worker()
    prompt = unique("slow to answer [[hang_create=3*1]]")

    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id, timeout=30)
    assert status["status"] == "succeeded"
    first, second = await attempts_of(stack, job_id)
    assert first.error_class == "ReadTimeout" and first.prediction_id is None
    assert second.prediction_id is not None
    assert fake_replicate.predictions_for(prompt) == 1
    assert any(line["event"] == "job.prediction.adopted" for line in stack.log_lines())


async def test_a_job_past_its_deadline_is_canceled_at_replicate_and_fails(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    stack: Stack = make_stack(MEDIAGEN_JOB_DEADLINE_SECONDS="2", **FAST)
    api = client(stack.start_api())
    stack.start_worker()
    prompt = unique("takes forever [[latency=60]]")

    job_id = await submit(api, prompt, width=512, height=512)

    status = await wait_for_job(api, job_id, timeout=20)
    assert status["status"] == "failed" and "deadline" in status["error"]
    [attempt] = await attempts_of(stack, job_id)
    prediction = httpx.get(
        f"{fake_replicate.url}/v1/predictions/{attempt.prediction_id}", headers={"Authorization": "Bearer t"}
    ).json()
    assert prediction["status"] == "canceled"


async def test_with_every_worker_dead_replicate_itself_ends_the_prediction_at_the_jobs_deadline(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    """Given a job whose prediction waits in Replicate's queue and whose only worker was SIGKILLed, when its
    deadline passes with no worker alive, then Replicate has ended the prediction by itself (`aborted`, not
    billed: the create's Cancel-After), and a worker started later ends the job failed, past its deadline."""
    stack: Stack = make_stack(MEDIAGEN_JOB_DEADLINE_SECONDS="5", **FAST)
    api = client(stack.start_api())
    doomed = stack.start_worker()
    prompt = unique("queued for ever [[starting=60]]")
    job_id = await submit(api, prompt, width=512, height=512)
    await wait_running_with_prediction(stack, job_id)
    kill_group(doomed.proc, signal.SIGKILL)
    [attempt] = await attempts_of(stack, job_id)

    seen: dict[str, Any] = {}
    give_up = time.monotonic() + 15
    while seen.get("status") != "aborted" and time.monotonic() < give_up:
        await asyncio.sleep(0.5)
        seen = httpx.get(
            f"{fake_replicate.url}/v1/predictions/{attempt.prediction_id}", headers={"Authorization": "Bearer t"}
        ).json()
    assert (seen["status"], seen["started_at"]) == ("aborted", None)

    stack.start_worker()
    status = await wait_for_job(api, job_id, timeout=20)
    assert status["status"] == "failed" and "deadline" in status["error"]
    assert fake_replicate.predictions_for(prompt) == 1


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that a test can take down and bring back."""

    def __init__(self, target: tuple[str, Any]) -> None:
        self.target = target
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, where = self.target
        if kind == "unix":
            up_reader, up_writer = await asyncio.open_unix_connection(where)
        else:
            up_reader, up_writer = await asyncio.open_connection(*where)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))):
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)


def proxied_url(database_url: str, port: int) -> tuple[str, tuple[str, Any]]:
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    socket_dir = url.query.get("host")
    if socket_dir:
        target: tuple[str, Any] = ("unix", f"{socket_dir}/.s.PGSQL.{url.port or 5432}")
    else:
        target = ("tcp", (url.host or "127.0.0.1", url.port or 5432))
    proxied = url.set(host="127.0.0.1", port=port, query={}).render_as_string(hide_password=False)
    return proxied, target


async def test_postgres_down_gets_a_quick_503_and_the_api_recovers(make_stack: Any, client: Any) -> None:
    stack: Stack = make_stack()
    proxy_port = free_port()
    url, target = proxied_url(stack.database_url, proxy_port)
    proxy = TcpProxy(target)
    proxy.port = proxy_port
    await proxy.start()
    api = client(stack.start_api(DATABASE_URL=url))
    job_id = await submit(api, unique("before the outage"), width=512, height=512)

    await proxy.stop()
    for path in (f"/status/{job_id}", "/jobs"):
        started = time.monotonic()
        response = await api.get(path)
        assert time.monotonic() - started < 2.5
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"] == "service_unavailable"
    started = time.monotonic()
    response = await api.post("/generate", json={"prompt": "during the outage"})
    assert response.status_code == 503 and time.monotonic() - started < 2.5
    ready = await api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable")
    assert ready.json()["checks"]["broker"] == "ok"

    await proxy.start()
    deadline = time.monotonic() + 10
    while (await api.get(f"/status/{job_id}")).status_code != 200:
        assert time.monotonic() < deadline, "the API did not recover"
        await asyncio.sleep(0.2)
    assert (await api.get("/readyz")).status_code == 200
    await proxy.stop()


async def test_a_lease_lost_to_a_database_outage_says_so_on_the_attempt(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    """Given a worker waiting on a prediction when its PostgreSQL becomes unreachable for longer than
    a lease, and another worker that takes the job over, when the database is back, then the first
    attempt says its lease could not be renewed while PostgreSQL was unreachable (not that its worker
    stopped), and the job finishes on its one prediction."""
    stack: Stack = make_stack(**FAST)
    proxy_port = free_port()
    url, target = proxied_url(stack.database_url, proxy_port)
    proxy = TcpProxy(target)
    proxy.port = proxy_port
    await proxy.start()
    try:
        api = client(stack.start_api())
        stack.start_worker(DATABASE_URL=url)  # this one reaches PostgreSQL through the proxy
        prompt = unique("outlives an outage [[latency=15]]")
        job_id = await submit(api, prompt, width=512, height=512)
        await wait_running_with_prediction(stack, job_id)
        stack.start_worker()  # this one reaches it directly, and takes the job over

        await proxy.stop()
        deadline = time.monotonic() + 20
        while len(await attempts_of(stack, job_id)) < 2:
            assert time.monotonic() < deadline, "the job was never taken over"
            await asyncio.sleep(0.2)
        await proxy.start()

        assert (await wait_for_job(api, job_id, timeout=30))["status"] == "succeeded"
        deadline = time.monotonic() + 20
        while (first := (await attempts_of(stack, job_id))[0]).error_class == "WorkerLost":
            assert time.monotonic() < deadline, "the first attempt still says its worker stopped"
            await asyncio.sleep(0.2)
        assert first.outcome == "abandoned" and first.error_class == "LeaseExpired"
        assert "could not be renewed" in first.error_message and "PostgreSQL was unreachable" in first.error_message
        assert fake_replicate.predictions_for(prompt) == 1
    finally:
        await proxy.stop()


async def test_a_job_finished_during_a_short_database_outage_is_recorded_once_it_is_back(
    make_stack: Any, client: Any, fake_replicate: FakeReplicate
) -> None:
    """Given a worker whose prediction succeeds while its PostgreSQL is unreachable (for less than a
    lease), when the database is back, then it records the success itself: one attempt, no takeover."""
    stack: Stack = make_stack(**{**FAST, "MEDIAGEN_LEASE_SECONDS": "8"})
    proxy_port = free_port()
    url, target = proxied_url(stack.database_url, proxy_port)
    proxy = TcpProxy(target)
    proxy.port = proxy_port
    await proxy.start()
    try:
        api = client(stack.start_api())
        worker = stack.start_worker(DATABASE_URL=url)
        prompt = unique("finished in the dark [[latency=3]]")
        job_id = await submit(api, prompt, width=512, height=512)
        await wait_running_with_prediction(stack, job_id)

        await proxy.stop()
        deadline = time.monotonic() + 15
        while not any(line.get("event") == "job.attempt.waiting_for_database" for line in worker.log_lines()):
            assert time.monotonic() < deadline, "the worker never tried to record the finished job"
            await asyncio.sleep(0.2)
        await proxy.start()

        assert (await wait_for_job(api, job_id, timeout=20))["status"] == "succeeded"
        attempts = await attempts_of(stack, job_id)
        assert [a.outcome for a in attempts] == ["succeeded"]
        assert fake_replicate.predictions_for(prompt) == 1
    finally:
        await proxy.stop()
