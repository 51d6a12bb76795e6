"""Retention: old finished jobs go, media and all, in small batches, while the service answers; their
spend stays in /usage.

The big test has a database of its own (100,000 jobs 40 days old) and an API process on it, and runs
`mediagen prune` as an operator would, while a client keeps polling the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import RUN_ID, create_database, drop_database, start_api, stop
from mediagen.core.db import Database, libpq_url
from mediagen.devtools.launcher import migrate
from mediagen.storage.local import LocalStorage
from mediagen.worker.retention import RetentionSweep

OLD_JOBS = 100_000
WITH_MEDIA = 200
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


@pytest.fixture
def private_database(postgres_admin_url: str) -> Iterator[str]:
    name = f"mediagen_test_{RUN_ID}_retention_{uuid.uuid4().hex[:6]}"
    url = create_database(postgres_admin_url, name)
    migrate(url)
    yield url
    drop_database(postgres_admin_url, name)


def add_jobs(url: str, count: int, *, days_ago: float, status: str = "succeeded") -> list[uuid.UUID]:
    """`count` jobs that finished `days_ago` days ago, each with one priced prediction (one image, 0.003 USD)."""
    with psycopg.connect(libpq_url(url)) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "INSERT INTO jobs (id, status, prompt, parameters, model, owner, max_attempts, deadline_at, "
                "created_at, finished_at) "
                "SELECT gen_random_uuid(), %s, 'old', '{}', 'm/' || (n %% 3), 'key' || (n %% 2), 5, "
                "now() - make_interval(days => %s), now() - make_interval(days => %s, secs => n), "
                "now() - make_interval(days => %s, secs => n) + interval '2 s' "
                "FROM generate_series(1, %s) AS n RETURNING id",
                (status, int(days_ago), int(days_ago), int(days_ago), count),
            ).fetchall()
        ]
        conn.execute(
            "INSERT INTO attempts (job_id, number, prediction_id, finished_at, outcome, image_count, predict_time, "
            "cost_usd) SELECT id, 1, 'p' || id, finished_at, 'succeeded', 1, 1.5, 0.003 FROM jobs WHERE id = ANY(%s)",
            (ids,),
        )
    return ids


def add_outputs(url: str, media_dir: Path, job_ids: list[uuid.UUID]) -> list[Path]:
    storage = LocalStorage(media_dir)
    with psycopg.connect(libpq_url(url)) as conn:
        for job_id in job_ids:
            conn.execute(
                "INSERT INTO outputs (job_id, index, storage_key, content_type, size_bytes, sha256) "
                "VALUES (%s, 0, %s, 'image/png', %s, 'x')",
                (job_id, f"{job_id}/0.png", len(PNG)),
            )
    paths = [storage.path(f"{job_id}/0.png") for job_id in job_ids]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
    return paths


def count(url: str, sql: str) -> int:
    with psycopg.connect(libpq_url(url)) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


async def test_mediagen_prune_deletes_100000_old_jobs_while_the_api_answers_and_usage_stays_the_same(
    private_database: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    url = private_database
    media = tmp_path / "media"
    old = add_jobs(url, OLD_JOBS, days_ago=40)
    files = add_outputs(url, media, old[:WITH_MEDIA])
    recent = add_jobs(url, 10, days_ago=2)
    running = add_jobs(url, 1, days_ago=40, status="running")  # not finished: never deleted
    env = {**service_env, "DATABASE_URL": url, "MEDIAGEN_MEDIA_DIR": str(media)}
    api = start_api(env, tmp_path / "api.log")
    latencies: list[float] = []
    failures: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=api.extra["url"], timeout=10) as client:
            before = (await client.get("/usage", params={"since": "60d"})).json()

            async def poll() -> None:
                paths = [f"/status/{recent[0]}", "/healthz", "/jobs?limit=20", f"/jobs/{recent[1]}"]
                while True:
                    for path in paths:
                        started = time.monotonic()
                        response = await client.get(path)
                        latencies.append(time.monotonic() - started)
                        if response.status_code != 200:
                            failures.append(f"{path}: {response.status_code}")
                    await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            started = time.monotonic()
            prune = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mediagen.cli",
                "prune",
                "--days",
                "30",
                env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await prune.communicate()
            took = time.monotonic() - started
            poller.cancel()
            after = (await client.get("/usage", params={"since": "60d"})).json()
    finally:
        stop(api.proc)

    assert prune.returncode == 0, output.decode()
    assert f"deleted {OLD_JOBS} jobs" in output.decode() and f"and {WITH_MEDIA} media files" in output.decode()
    assert count(url, "SELECT count(*) FROM jobs") == len(recent) + len(running)
    assert count(url, "SELECT count(*) FROM attempts") == len(recent) + len(running)
    assert count(url, "SELECT count(*) FROM outputs") == 0
    assert not any(path.exists() or path.parent.exists() for path in files)
    assert after["total"] == before["total"]
    assert after["by_model"] == before["by_model"] and after["by_api_key"] == before["by_api_key"]
    assert before["total"]["predictions"] == OLD_JOBS + len(recent) + len(running)
    assert failures == []
    assert len(latencies) > 50, "the API was asked throughout"
    print(f"pruned {OLD_JOBS} jobs in {took:.1f} s; {len(latencies)} requests, the slowest {max(latencies):.3f} s")
    assert max(latencies) < 1.0


async def test_the_retention_sweep_deletes_only_finished_jobs_past_the_retention(
    private_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = private_database
    old = add_jobs(url, 30, days_ago=8)
    kept = add_jobs(url, 5, days_ago=6) + add_jobs(url, 2, days_ago=8, status="running")
    files = add_outputs(url, tmp_path / "media", old[:3])
    db = Database(url, pool_size=2)
    sweep = RetentionSweep(db, LocalStorage(tmp_path / "media"), days=7, interval=3600, batch=8)
    try:
        with caplog.at_level(logging.INFO, logger="mediagen"):
            pruned = await sweep.prune_once()
            again = await sweep.prune_once()
        spend = await db.fetchrow("SELECT sum(predictions) AS predictions, sum(jobs) AS jobs FROM daily_usage")
    finally:
        await db.dispose()

    assert (pruned.jobs, pruned.media_files, pruned.batches) == (30, 3, 4)  # 8 + 8 + 8 + 6
    assert again.jobs == 0
    left = {uuid.UUID(str(row[0])) for row in psycopg.connect(libpq_url(url)).execute("SELECT id FROM jobs")}
    assert left == set(kept)
    assert not any(path.exists() for path in files)
    assert spend is not None and (spend["predictions"], spend["jobs"]) == (30, 30)
    logged = [record.__dict__ for record in caplog.records if record.getMessage() == "retention.pruned"]
    assert [(line["jobs"], line["media_files"]) for line in logged] == [(30, 3)]
    assert timedelta(days=7) == sweep.older_than
