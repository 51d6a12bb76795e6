"""The fake fal's command line: ``python -m fake_fal``.

Example::

    python -m fake_fal --host 127.0.0.1 --port 5056 --latency 1.0 --p-submit-429 0.1 --seed 7

Every FakeFalConfig field is a flag (``--p-submit-500``, ``--retry-after``, ...) and can also come
from an environment variable ``FAKE_FAL_<NAME>`` (``FAKE_FAL_LATENCY=0.5``, ``FAKE_FAL_PORT``...);
flags win. ``--data-dir`` (``FAKE_FAL_DATA_DIR``) keeps the requests there, found again after a
restart; without it they live in memory only. ``--outage SECONDS`` starts with an outage (every queue
route answers 503 for that long). Faults can be changed while it runs with ``PUT /_fake/config``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fake_fal.config import FakeFalConfig, config_help, config_names, config_with, parse_config_value
from fake_fal.server import create_app

ENV_PREFIX = "FAKE_FAL_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5056


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen, what to keep, plus the fault configuration."""

    host: str
    port: int
    config: FakeFalConfig
    data_dir: Path | None = None
    outage: float = 0.0


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fake_fal", description="Fake fal.ai queue API for tests and benchmarks."
    )
    parser.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--data-dir", default=None, help="keep requests here across restarts (default: memory only)")
    parser.add_argument("--outage", type=float, default=None, help="start with an outage of this many seconds")
    for name in config_names():
        help_text = f"{config_help(name)} [env {_env_name(name)}]"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="VALUE", help=help_text)
    return parser


def build_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Parse flags and ``FAKE_FAL_*`` variables (flags win)."""
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    try:
        for name in config_names():
            text = getattr(args, name)
            if text is None:
                text = env.get(_env_name(name))
            if text is not None:
                values[name] = parse_config_value(name, text)
        config = config_with(FakeFalConfig(), values)
    except ValueError as exc:
        parser.error(str(exc))
    host = args.host or env.get(_env_name("host")) or DEFAULT_HOST
    port = args.port if args.port is not None else int(env.get(_env_name("port")) or DEFAULT_PORT)
    data_dir = args.data_dir or env.get(_env_name("data_dir")) or None
    outage = args.outage if args.outage is not None else float(env.get(_env_name("outage")) or 0)
    return ServerSettings(host, port, config, Path(data_dir) if data_dir else None, outage)


class JsonLines(logging.Formatter):
    """uvicorn's records as one JSON object a line, like the service beside the fake logs."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name}
        line["event"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonLines}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {"uvicorn": {"handlers": [], "propagate": True}, "uvicorn.access": {"handlers": []}},
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the fake with uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    settings = build_settings(argv)
    app = create_app(settings.config, data_dir=settings.data_dir)
    if settings.outage > 0:
        app.state.fake.start_outage(settings.outage)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _available("uvloop") else "asyncio",
        http="httptools" if _available("httptools") else "h11",
        log_level="warning",
        log_config=LOG_CONFIG,
        access_log=False,
    )
