"""`make run` keeps the stack standing, stops it whole, and every line it writes is JSON.

The launcher runs for real here (`make run`, or `python -m mediagen.devtools`), in a process group of
its own, on free ports and a data folder of the test's. Where the embedded servers are not the point it
uses this run's PostgreSQL (a database of its own, which it migrates) and Redis (a namespace of its own).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import RUN_ID, create_database, drop_database
from fal_live import captured
from mediagen.devtools.embedded import free_port, pid_alive, port_open
from mediagen.devtools.launcher import fakes_to_start
from mediagen.devtools.supervisor import Child, GiveUp, Supervisor
from mediagen.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README_JQ = (
    "jq -c 'select(.job_id == \"3f0c…\") | {ts, event, attempt, error_class, error, delay_seconds}' mediagen.log"
)


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str

    def lines(self) -> list[bytes]:
        return self.log_path.read_bytes().splitlines()

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.lines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def wait_for(self, event: str, timeout: float = 40, after: int = 0, **fields: Any) -> dict[str, Any]:
        """The first line with this event (and fields) among the lines after the `after` first ones."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.events()[after:]:
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = b"\n".join(self.lines()[-30:]).decode(errors="replace")
                raise AssertionError(f"no {event} {fields} (exit code {self.proc.poll()}); the log ends:\n{tail}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> tuple[int, float]:
        """Ctrl-C (the whole foreground group gets it), then the exit code and how long the stop took."""
        started = time.monotonic()
        self.send(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running {timeout}s after {signal.Signals(sig).name}") from None
        return code, time.monotonic() - started

    def child_pids(self) -> list[int]:
        return [line["pid"] for line in self.events() if line.get("event") == "dev.child_started"]


def launcher_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MEDIAGEN_", "REPLICATE_", "DATABASE_", "REDIS_", "FAKE_REPLICATE_", "MAKE", "MFLAGS"))
    }
    env.update(
        MEDIAGEN_DATA_DIR=str(tmp_path / "data"),
        MEDIAGEN_MEDIA_DIR=str(tmp_path / "media"),
        MEDIAGEN_PORT=str(free_port()),
        MEDIAGEN_EMBEDDED_REDIS_PORT=str(free_port()),
        MEDIAGEN_WORKER_METRICS_PORT="0",
        MEDIAGEN_WORKER_THREADS="8",
        MEDIAGEN_POLL_INITIAL_SECONDS="0.05",
        MEDIAGEN_POLL_MAX_SECONDS="0.2",
        FAKE_REPLICATE_LATENCY="0.2",
    )
    env.update(overrides)
    return env


def launch(env: dict[str, str], log_path: Path, *, via_make: bool = False) -> Launched:
    # What a newcomer types, with this virtualenv (installed: `make test` installs before the tests).
    make_run = ["make", "run", f"VENV={sys.prefix}"]
    command = make_run if via_make else [sys.executable, "-m", "mediagen.devtools"]
    log = open(log_path, "ab")  # noqa: SIM115 (the child writes to it for as long as it runs)
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return Launched(proc, log_path, f"http://127.0.0.1:{env.get('MEDIAGEN_PORT', 8000)}")  # else: dev.starting's


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and pid_alive(int(entry)):
                    members.append(int(entry))
            except ProcessLookupError:
                continue
    return members


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def generate(url: str, prompt: str) -> str:
    response = httpx.post(
        f"{url}/generate", json={"prompt": prompt, "parameters": {"width": 512, "height": 512}}, timeout=10
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def wait_succeeded(url: str, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/status/{job_id}", timeout=10).json()
        if status["status"] in ("succeeded", "failed", "canceled"):
            assert status["status"] == "succeeded", status
            return
        assert time.monotonic() < deadline, f"job {job_id} still {status['status']} after {timeout}s"
        time.sleep(0.1)


class HealthPoller(threading.Thread):
    """GET /healthz every 50 ms; every answer that was not a 200 is kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.answers = 0
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.done.wait(0.05):
                try:
                    status = client.get(f"{self.url}/healthz").status_code
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                    continue
                self.answers += 1
                if status != 200:
                    self.failures.append(str(status))


@contextlib.contextmanager
def empty_database(postgres_admin_url: str) -> Iterator[str]:
    """A database of its own (the launcher migrates it): no other test's worker sweeps its jobs."""
    name = f"mediagen_test_{RUN_ID}_launcher_{uuid.uuid4().hex[:6]}"
    yield create_database(postgres_admin_url, name)
    drop_database(postgres_admin_url, name)


@pytest.fixture
def private_database(postgres_admin_url: str) -> Iterator[str]:
    with empty_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def session(
    postgres_admin_url: str, redis_url: str, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launched]:
    """`make run` on this run's PostgreSQL and Redis (a database and a namespace of its own), with the fake."""
    tmp_path = tmp_path_factory.mktemp("launcher")
    with empty_database(postgres_admin_url) as database_url:
        env = launcher_env(
            tmp_path, DATABASE_URL=database_url, REDIS_URL=redis_url, MEDIAGEN_REDIS_NAMESPACE=f"{namespace}-launcher"
        )
        launched = launch(env, tmp_path / "make-run.log", via_make=True)
        try:
            launched.wait_for("dev.ready")
            launched.wait_for("worker.started")
            yield launched
        finally:
            launched.stop()


def test_a_killed_worker_is_restarted_and_the_api_answers_throughout(session: Launched) -> None:
    worker = session.wait_for("dev.child_started", child="worker")["pid"]
    seen = len(session.events())
    poller = HealthPoller(session.url)
    poller.start()

    os.kill(worker, signal.SIGKILL)

    restarted = session.wait_for("dev.child_restarted", child="worker", after=seen, timeout=20)
    assert restarted["exit_code"] == -signal.SIGKILL and restarted["signal"] == "SIGKILL"
    assert group_members(worker) == []  # the killed main process's worker processes went with it
    job_id = generate(session.url, f"after the restart #{uuid.uuid4().hex[:8]}")
    wait_succeeded(session.url, job_id)
    poller.done.set()
    poller.join()
    assert poller.failures == [] and poller.answers > 20


async def test_without_fal_key_the_fake_fal_runs_keeps_its_requests_and_the_service_trusts_its_webhooks(
    session: Launched,
) -> None:
    """make run starts the fake fal (its URL in `dev.fake_fal`, its data in the data folder), and the API
    checks fal's webhooks against that fake's JWKS, which only MEDIAGEN_FAL_BASE_URL can have told it."""
    started = session.wait_for("dev.fake_fal")
    fake_url = started["url"]
    assert httpx.get(f"{fake_url}/_fake/health", timeout=5).status_code == 200
    headers, body = await captured(fake_url, f"from make run #{uuid.uuid4().hex[:8]}")
    assert (Path(started["data_dir"]) / "requests.jsonl").exists()
    headers = {k: v for k, v in headers.items() if k.startswith("x-fal-") or k == "content-type"}
    async with httpx.AsyncClient(base_url=session.url, timeout=10) as api:
        genuine = await api.post("/webhooks/fal", content=body, headers=headers)
        tampered = await api.post("/webhooks/fal", content=body + b" ", headers=headers)
    assert genuine.status_code == 200, genuine.text
    assert tampered.status_code == 401


def test_every_line_of_a_make_run_session_is_json_and_the_readme_jq_line_tells_a_story(
    session: Launched, tmp_path: Path
) -> None:
    job_id = generate(session.url, f"a story #{uuid.uuid4().hex[:8]}")
    wait_succeeded(session.url, job_id)
    with socket.create_connection(("127.0.0.1", int(session.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    session.wait_for("Invalid HTTP request received.", logger="uvicorn.error")

    code, seconds = session.stop(signal.SIGINT)

    assert code == -signal.SIGINT  # make, after its child stopped gracefully, ends the way it was told to
    assert seconds < 10
    lines = session.lines()
    parsed = [orjson.loads(line) for line in lines]  # raises on the first line that is not JSON
    assert all(isinstance(line, dict) for line in parsed)
    events = [line["event"] for line in parsed]
    assert "dev.child_output" not in events  # uvicorn's, Dramatiq's and the fake's lines are JSON themselves
    assert any(event.startswith("Dramatiq ") and event.endswith(" is booting up.") for event in events)
    assert parsed[-1]["event"] == "dev.stopped" and parsed[-1]["exit_code"] == 0

    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed: the README's line cannot be run")
    shutil.copy(session.log_path, tmp_path / "mediagen.log")
    story = subprocess.run(
        README_JQ.replace("3f0c…", job_id), shell=True, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert story.returncode == 0, story.stderr
    told = [orjson.loads(line)["event"] for line in story.stdout.splitlines()]
    assert [event for event in told if event.startswith("job.")] == [
        "job.submitted",
        "job.attempt.started",
        "job.attempt.succeeded",
        "job.succeeded",
    ]


def test_a_killed_launcher_leaves_no_process_behind_within_seconds_even_servers_it_adopted(tmp_path: Path) -> None:
    env = launcher_env(tmp_path, REPLICATE_API_TOKEN="r8_not_used")
    # Chatty (DEBUG), so that children still write plenty after the launcher is gone, as in real use.
    first = launch({**env, "MEDIAGEN_LOG_LEVEL": "DEBUG"}, tmp_path / "first.log")
    second = None
    try:
        postgres = first.wait_for("dev.embedded_postgres", adopted=False)
        redis = first.wait_for("dev.embedded_redis", adopted=False)
        first.wait_for("worker.started")
        # Given a launcher killed together with its watchdog (the one way servers outlive it) ...
        os.kill(first.wait_for("dev.starting")["watchdog_pid"], signal.SIGKILL)
        os.kill(first.proc.pid, signal.SIGKILL)  # the launcher alone: its children go by themselves
        first.proc.wait()
        wait_until(lambda: not any(group_members(pid) for pid in first.child_pids()), 30, "the children stop")
        assert pid_alive(postgres["pid"]) and pid_alive(redis["pid"])
        # ... the next start adopts its servers ...
        second = launch(env, tmp_path / "second.log")
        assert second.wait_for("dev.embedded_postgres")["pid"] == postgres["pid"]
        assert second.wait_for("dev.embedded_redis", adopted=True)["pid"] == redis["pid"]
        second.wait_for("dev.child_started", child="worker")

        os.kill(second.proc.pid, signal.SIGKILL)  # when that one is killed in turn, nothing stays
        second.proc.wait()
        killed = time.monotonic()
        wait_until(lambda: not pid_alive(postgres["pid"]) and not pid_alive(redis["pid"]), 5, "the servers stop")
        servers_gone = time.monotonic() - killed
        wait_until(lambda: not any(group_members(pid) for pid in second.child_pids()), 10, "the children stop")
        wait_until(lambda: any(line["event"] == "dev.watchdog.stopped" for line in second.events()), 5, "its line")
        watchdog = next(line for line in second.events() if line["event"] == "dev.watchdog.stopped")

        assert servers_gone < 5
        assert watchdog["postgres_pid"] == postgres["pid"] and watchdog["redis_pid"] == redis["pid"]
        assert not port_open("127.0.0.1", int(env["MEDIAGEN_EMBEDDED_REDIS_PORT"]))
        assert not list((tmp_path / "data" / "postgres").glob(".s.PGSQL.*"))  # no socket left to connect to
        watchdog_pid = second.wait_for("dev.starting")["watchdog_pid"]
        wait_until(lambda: not pid_alive(watchdog_pid), 5, "the watchdog exits, its work done")
        third = launch(env, tmp_path / "third.log")  # the data folder is free again
        assert third.wait_for("dev.embedded_redis")["adopted"] is False
        code, _ = third.stop(signal.SIGTERM)
        assert code == 0
    finally:  # whatever failed, leave nothing running on a machine others share
        kill_everything(first, second)


def test_two_launchers_on_the_default_ports_both_start_and_say_where(postgres_admin_url: str, tmp_path: Path) -> None:
    ports = ("MEDIAGEN_PORT", "MEDIAGEN_EMBEDDED_REDIS_PORT")
    launched: list[Launched] = []
    with contextlib.ExitStack() as stack:
        for default in (Settings().port, Settings().embedded_redis_port):  # taken, as by another checkout's run
            with contextlib.suppress(OSError):  # already taken by someone else: as good
                holder = stack.enter_context(socket.socket())
                holder.bind(("127.0.0.1", default))
                holder.listen()
        try:
            for name in ("one", "two"):
                database = stack.enter_context(empty_database(postgres_admin_url))
                env = {k: v for k, v in launcher_env(tmp_path / name).items() if k not in ports}
                env.update(DATABASE_URL=database, REPLICATE_API_TOKEN="r8_not_used")
                launched.append(launch(env, tmp_path / f"{name}.log"))
            ready = [run.wait_for("dev.ready") for run in launched]
            firsts = [run.events()[0] for run in launched]
            redis = [run.wait_for("dev.embedded_redis") for run in launched]
            codes = [run.stop(signal.SIGTERM)[0] for run in launched]
        finally:
            kill_everything(*launched)

    assert [line["event"] for line in firsts] == ["dev.starting", "dev.starting"]
    assert [line["api"] for line in firsts] == [line["api"] for line in ready]
    assert len({line["api"] for line in firsts}) == 2 and all(line["port_taken"] == 8000 for line in firsts)
    assert len({line["url"] for line in redis}) == 2 and all(line["port_taken"] == 6390 for line in redis)
    assert codes == [0, 0]


def kill_everything(*launched: Launched | None) -> None:
    for run in launched:
        if run is None:
            continue
        run.send(signal.SIGKILL)
        for pid in run.child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for line in run.events():
            if line.get("event") in ("dev.embedded_postgres", "dev.embedded_redis"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(line["pid"], signal.SIGQUIT)  # PostgreSQL: immediate shutdown; Redis: exit


def test_a_child_that_keeps_exiting_is_restarted_with_backoff_then_given_up_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(Settings(dev_restart_limit=1))
    flaky = [sys.executable, "-c", "import sys; print('not JSON'); sys.exit(3)"]
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO, logger="mediagen"):
            supervisor.add(Child("flaky", flaky, dict(os.environ)))
            with pytest.raises(GiveUp, match=r"^flaky exited with code 3, 2 exit\(s\) in a row"):
                supervisor.run(ready=lambda: False)
    finally:
        supervisor.stop()

    assert 1.0 <= time.monotonic() - started < 10  # restarted once, after 1 s
    lines = [(record.getMessage(), record.__dict__) for record in caplog.records]
    assert [fields["restart_in_seconds"] for event, fields in lines if event == "dev.child_exited"] == [1.0]
    assert [fields["exit_code"] for event, fields in lines if event == "dev.child_restarted"] == [3]
    assert [fields["line"] for event, fields in lines if event == "dev.child_output"] == ["not JSON", "not JSON"]


def test_the_launcher_exits_non_zero_when_it_gives_up(database_url: str, tmp_path: Path) -> None:
    env = launcher_env(tmp_path, DATABASE_URL=database_url)  # no REDIS_URL: the embedded Redis
    with socket.socket() as taken:  # ... on a port something else holds: it cannot start
        taken.bind(("127.0.0.1", int(env["MEDIAGEN_EMBEDDED_REDIS_PORT"])))
        taken.listen()
        launched = launch(env, tmp_path / "run.log")
        code = launched.proc.wait(timeout=30)

    assert code == 1
    events = launched.events()
    gave_up = next(line for line in events if line["event"] == "dev.gave_up")
    assert gave_up["error"].startswith(f"port {env['MEDIAGEN_EMBEDDED_REDIS_PORT']} is taken")
    assert events[-1] == {**events[-1], "event": "dev.stopped", "exit_code": 1}
    assert launched.child_pids() == []


@pytest.mark.parametrize(
    ("env", "fakes"),
    [
        ({}, ["replicate", "fal"]),
        ({"REPLICATE_API_TOKEN": "r8_x"}, ["fal"]),
        ({"FAL_KEY": "id:secret"}, ["replicate"]),
        ({"FAL_KEY": "id:secret", "MEDIAGEN_PROVIDERS": "fal"}, []),
        ({"MEDIAGEN_PROVIDERS": "fal"}, ["fal"]),
        ({"MEDIAGEN_FAL_BASE_URL": "http://127.0.0.1:5056", "REPLICATE_API_TOKEN": "r8_x"}, []),
    ],
)
def test_make_run_starts_a_fake_for_each_provider_without_credentials_that_is_wanted(
    env: dict[str, str], fakes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REPLICATE_API_TOKEN", "FAL_KEY", "MEDIAGEN_PROVIDERS", "MEDIAGEN_FAL_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert fakes_to_start(Settings(_env_file=None)) == fakes  # type: ignore[call-arg]
