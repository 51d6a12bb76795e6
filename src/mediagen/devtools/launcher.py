"""`python -m mediagen.devtools` (what `make run` runs): the whole service on one machine, no setup.

Starts what is not configured: embedded PostgreSQL unless DATABASE_URL is set, embedded Redis unless
REDIS_URL is set, the fake Replicate unless REPLICATE_API_TOKEN is set; migrates; then runs the API
(port 8000) and a worker. Data stays in `.mediagen/` and `media/`. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mediagen.devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open
from mediagen.logging import configure_logging, log_event, redact


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

    root = Path(__file__).resolve().parents[3]
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


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


def main() -> None:
    configure_logging(os.environ.get("MEDIAGEN_LOG_LEVEL", "INFO"))
    data_dir = Path(os.environ.get("MEDIAGEN_DATA_DIR", ".mediagen"))
    host = os.environ.get("MEDIAGEN_HOST", "127.0.0.1")
    port = int(os.environ.get("MEDIAGEN_PORT", "8000"))
    env = dict(os.environ)
    closers: list[Callable[[], None]] = []
    children: list[subprocess.Popen[bytes]] = []

    def stop(children_signaled: bool) -> None:
        # After Ctrl-C the terminal has already sent SIGINT to every child: a second signal would make
        # Dramatiq and uvicorn skip their graceful shutdown, so give them a moment first.
        deadline = time.monotonic() + (2 if children_signaled else 0)
        while time.monotonic() < deadline and any(child.poll() is None for child in children):
            time.sleep(0.1)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        # The servers stop while the worker finishes: a job it could not hand back in time keeps its
        # lease in PostgreSQL and is picked up again at the next start (nothing is lost either way).
        for close in reversed(closers):
            close()
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        log_event("dev.stopped")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    interrupted = False
    try:
        if not env.get("DATABASE_URL"):
            pg = EmbeddedPostgres(data_dir / "postgres")
            closers.append(pg.close)
            env["DATABASE_URL"] = pg.url
            log_event("dev.embedded_postgres", url=redact(pg.url))
        if not env.get("REDIS_URL"):
            redis = EmbeddedRedis(data_dir / "redis", port=int(env.get("MEDIAGEN_EMBEDDED_REDIS_PORT", "6390")))
            closers.append(redis.close)
            env["REDIS_URL"] = redis.url
            log_event("dev.embedded_redis", url=redis.url)
        if not env.get("REPLICATE_API_TOKEN"):
            fake_port = int(env.get("FAKE_REPLICATE_PORT", "0")) or free_port()
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fake_replicate",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(fake_port),
                        "--data-dir",
                        str(data_dir / "fake_replicate"),
                    ],
                    env=env,
                )
            )
            env["REPLICATE_BASE_URL"] = f"http://127.0.0.1:{fake_port}"
            # The fake sends its webhooks to this API, so the worker waits for them instead of polling.
            env.setdefault("MEDIAGEN_REPLICATE_WEBHOOKS", "true")
            env.setdefault("MEDIAGEN_REPLICATE_WEBHOOK_BASE_URL", f"http://{host}:{port}")
            log_event("dev.fake_replicate", url=env["REPLICATE_BASE_URL"])
        _webhooks_for_a_local_receiver(env, data_dir)
        migrate(env["DATABASE_URL"])
        log_event("dev.migrated")
        children.append(subprocess.Popen(api_command(host, port), env=env))
        children.append(subprocess.Popen([sys.executable, "-m", "mediagen.worker"], env=env))
        for _ in range(100):
            if port_open(host, port):
                break
            time.sleep(0.1)
        log_event("dev.ready", api=f"http://{host}:{port}", docs=f"http://{host}:{port}/docs")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        log_event("dev.child_exited", codes=[child.poll() for child in children])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop(children_signaled=interrupted)


if __name__ == "__main__":
    main()
