"""`make run` stopped and started under jobs in flight: every job resumes its prediction and succeeds.

The whole stack as an operator runs it (`python -m mediagen.devtools`, its own process group, like a
terminal's Ctrl-C reaching all of it), on this run's PostgreSQL and Redis so it starts fast, with the
bundled fake Replicate keeping its predictions in the stack's data directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from conftest import RUN_ID, create_database, drop_database, unique, wait_for_job, wait_http
from mediagen.core.db import Database
from mediagen.devtools.embedded import free_port

JOBS = 20
MODEL_SECONDS = 2


class MakeRun:
    """`make run`, started and stopped as a whole."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['MEDIAGEN_PORT']}"

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.env['FAKE_REPLICATE_PORT']}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mediagen.devtools"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http(f"{self.url}/healthz", self.proc, timeout=60)
        wait_http(f"{self.fake_url}/_fake/health", self.proc, timeout=30)

    def interrupt(self, timeout: float = 60) -> None:
        """Ctrl-C: SIGINT to the whole process group, then wait for the launcher to finish."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def make_run(postgres_admin_url: str, redis_url: str, namespace: str, workdir: Path) -> Iterator[MakeRun]:
    name = f"mediagen_test_{RUN_ID}_run_{uuid.uuid4().hex[:6]}"
    database_url = create_database(postgres_admin_url, name)
    folder = workdir / name
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAGEN_", "REPLICATE_", "FAKE_REPLICATE_"))}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        MEDIAGEN_REDIS_NAMESPACE=f"{namespace}-run",
        MEDIAGEN_QUEUE_NAME="run",
        MEDIAGEN_DATA_DIR=str(folder / "data"),
        MEDIAGEN_MEDIA_DIR=str(folder / "media"),
        MEDIAGEN_PORT=str(free_port()),
        MEDIAGEN_WORKER_METRICS_PORT=str(free_port()),
        MEDIAGEN_WORKER_THREADS="32",
        MEDIAGEN_LEASE_SECONDS="3",
        MEDIAGEN_SWEEP_INTERVAL_SECONDS="0.5",
        MEDIAGEN_STALE_DISPATCH_SECONDS="1.5",
        MEDIAGEN_RETRY_BASE_SECONDS="0.2",
        MEDIAGEN_RETRY_CAP_SECONDS="1",
        MEDIAGEN_POLL_INITIAL_SECONDS="0.1",
        MEDIAGEN_POLL_MAX_SECONDS="0.3",
        FAKE_REPLICATE_PORT=str(free_port()),
        FAKE_REPLICATE_LATENCY=str(MODEL_SECONDS),
        PYTHONUNBUFFERED="1",
    )
    run = MakeRun(env, folder / "make-run.log")
    yield run
    run.kill()
    drop_database(postgres_admin_url, name)


async def predictions_per_job(database_url: str, job_ids: list[str]) -> dict[str, int]:
    db = Database(database_url, pool_size=1)
    try:
        async with db.connect() as conn:
            rows = await conn.execute(
                text(
                    # Only jobs with a recorded prediction: an attempt still creating one has none yet.
                    "SELECT job_id::text AS job, count(DISTINCT prediction_id) AS n FROM attempts "
                    "WHERE job_id = ANY(CAST(:ids AS uuid[])) AND prediction_id IS NOT NULL GROUP BY job_id"
                ),
                {"ids": job_ids},
            )
            return {row.job: row.n for row in rows}
    finally:
        await db.dispose()


async def test_make_run_restarted_with_jobs_in_flight_finishes_each_on_its_one_prediction(
    make_run: MakeRun,
) -> None:
    """Given 20 jobs waiting on 2 s predictions, when `make run` is stopped with Ctrl-C and started
    again, then all 20 succeed, each on the one prediction it started before the stop."""
    make_run.start()
    prompts = [unique(f"through a restart {i}") for i in range(JOBS)]
    async with httpx.AsyncClient(base_url=make_run.url, timeout=10) as api:
        ids = []
        for prompt in prompts:
            response = await api.post("/generate", json={"prompt": prompt, "parameters": {"width": 512, "height": 512}})
            assert response.status_code == 202, response.text
            ids.append(response.json()["job_id"])
        deadline = time.monotonic() + 20
        while (await predictions_per_job(make_run.env["DATABASE_URL"], ids)).keys() != set(ids):
            assert time.monotonic() < deadline, "not every job started its prediction"
            await asyncio.sleep(0.1)

    make_run.interrupt()
    make_run.start()

    async with httpx.AsyncClient(base_url=make_run.url, timeout=10) as api:
        finals = [await wait_for_job(api, job_id, timeout=60) for job_id in ids]
        details: list[dict[str, Any]] = [(await api.get(f"/jobs/{job_id}")).json() for job_id in ids]
    assert [final["status"] for final in finals] == ["succeeded"] * JOBS
    assert await predictions_per_job(make_run.env["DATABASE_URL"], ids) == dict.fromkeys(ids, 1)
    stats = httpx.get(f"{make_run.fake_url}/_fake/stats").json()
    assert [stats["by_prompt"].get(prompt, 0) for prompt in prompts] == [1] * JOBS
    histories = [detail["attempt_history"] for detail in details]
    interrupted = [history for history in histories if len(history) > 1]
    assert len(interrupted) >= JOBS // 2  # the stop did catch jobs in flight
    # Each one the stop interrupted went on with the prediction it had started.
    assert all(a["resumed"] for history in interrupted for a in history[1:])
