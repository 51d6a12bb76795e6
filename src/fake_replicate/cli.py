"""The fake Replicate's command line: ``python -m fake_replicate``.

Example::

    python -m fake_replicate --host 127.0.0.1 --port 5055 \\
        --latency 1.0 --p-create-500 0.2 --seed 7 --output-mode url

Every FakeConfig field is a flag (``--p-create-429``, ``--retry-after``, ...) and
can also come from an environment variable ``FAKE_REPLICATE_<NAME>`` (e.g.
``FAKE_REPLICATE_LATENCY=0.5``, ``FAKE_REPLICATE_HOST``, ``FAKE_REPLICATE_PORT``).
Flags win over the environment. ``--data-dir`` (``FAKE_REPLICATE_DATA_DIR``) keeps
the predictions in that directory, found again after a restart (see
:mod:`fake_replicate.store`); without it they live in memory only. Point the client at it with
``REPLICATE_BASE_URL=http://127.0.0.1:5055``. Faults can be changed while it runs
with ``PUT /_fake/config``; the package's README.md describes every knob, the
per-prompt ``[[...]]`` directives and the ``/_fake`` control routes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from fake_replicate.config import FakeConfig, config_with, parse_config_value
from fake_replicate.server import create_app

ENV_PREFIX = "FAKE_REPLICATE_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5055

_HELP = {
    "latency": "seconds from create to a terminal status (default 1.0)",
    "latency_jitter": "latency varies by +- this fraction (default 0)",
    "create_latency": "seconds slept before handling each create",
    "p_create_500": "probability that a create answers 500",
    "p_create_429": "probability that a create answers 429",
    "p_create_ambiguous": "probability that a create makes its prediction, then answers 502/504 or drops",
    "create_ambiguous_answers": "what an ambiguous create answers, drawn evenly (default 502,504,drop)",
    "retry_after": "Retry-After seconds sent with 429s (default 1)",
    "p_get_503": "probability that a GET of a prediction answers 503",
    "p_get_429": "probability that a GET of a prediction answers 429",
    "p_flagged": "probability that a prediction fails with E005 (flagged)",
    "p_model_error": "probability that a prediction fails with E001 (CUDA OOM)",
    "seed": "seed of the fault RNG",
    "output_mode": "url (http file URLs) or data (data: URLs)",
    "api_token": "the only token accepted (default: any token)",
    "base_url": "scheme://host:port used in returned URLs (default: the request's)",
    "list_page_size": "predictions per page of GET /v1/predictions (default 100, as Replicate)",
}


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen plus the fault configuration."""

    host: str
    port: int
    config: FakeConfig
    data_dir: Path | None = None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fake_replicate",
        description="Fake Replicate HTTP server for tests and benchmarks.",
    )
    parser.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"keep predictions here across restarts (default: memory only) [env {_env_name('data_dir')}]",
    )
    for f in fields(FakeConfig):
        help_text = f"{_HELP.get(f.name, f.name)} [env {_env_name(f.name)}]"
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar="VALUE", help=help_text)
    return parser


def _config_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, object]:
    """FakeConfig values from the flags, falling back to the environment."""
    values: dict[str, object] = {}
    for f in fields(FakeConfig):
        text = getattr(args, f.name)
        if text is None:
            text = environ.get(_env_name(f.name))
        if text is not None:
            values[f.name] = parse_config_value(f.name, text)
    return values


def build_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Parse flags and ``FAKE_REPLICATE_*`` variables (flags win)."""
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_with(FakeConfig(), _config_values(args, env))
    except ValueError as exc:
        parser.error(str(exc))
    host = args.host or env.get(_env_name("host")) or DEFAULT_HOST
    port = args.port if args.port is not None else int(env.get(_env_name("port")) or DEFAULT_PORT)
    data_dir = args.data_dir or env.get(_env_name("data_dir")) or None
    return ServerSettings(host=host, port=port, config=config, data_dir=Path(data_dir) if data_dir else None)


def build_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> FakeConfig:
    """The FakeConfig described by ``argv`` and the environment."""
    return build_settings(argv, environ).config


class JsonLines(logging.Formatter):
    """uvicorn's records (errors, "Invalid HTTP request received.") as one JSON object a line, the
    way the service beside the fake logs: `make run`'s output stays readable by `jq`."""

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
    uvicorn.run(
        create_app(settings.config, data_dir=settings.data_dir),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _available("uvloop") else "asyncio",
        http="httptools" if _available("httptools") else "h11",
        log_level="warning",
        log_config=LOG_CONFIG,
        access_log=False,
    )
