"""JSON log lines for the API and the worker.

`log_event("job.attempt.failed", job_id=..., attempt=2, error_class=...)` writes one line:
`{"ts": ..., "level": "info", "event": "job.attempt.failed", "job_id": ..., "attempt": 2, ...}`.
Events have dotted names and carry fields; secrets are never passed in (and `redact` masks URLs').
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import orjson

_LOGGER = logging.getLogger("mediagen")
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")


def redact(text: str) -> str:
    """Mask passwords embedded in URLs (`postgresql://user:secret@host` → `user:***@host`)."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class _LineHandler(logging.StreamHandler[TextIO]):
    """Goes quiet when nobody reads its lines any more (EPIPE: `make run`'s launcher was killed).

    The default would write a traceback per line to `sys.stderr` instead, which in a Dramatiq worker
    process is a pipe that nobody drains then either: full, it blocks the process for good.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def _stderr() -> TextIO:
    """The process's real stderr, line-buffered.

    Not `sys.stderr`: in a Dramatiq worker process that is a pipe to the parent process, and lines
    still in that pipe are lost when the worker is killed. An attempt's log line must not be.
    """
    try:
        return open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        return sys.stderr


# Loggers that libraries give handlers of their own (uvicorn's plain-text "WARNING:  Invalid HTTP
# request received."): their records go through the root's JSON handler instead.
_OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def configure_logging(level: str = "INFO") -> None:
    """Send every logger's records, Python's warnings included, as JSON lines to stderr."""
    handler = _LineHandler(_stderr())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _OWN_HANDLERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_event(event: str, level: int = logging.INFO, *, exc_info: Any = None, **fields: Any) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, extra=fields, exc_info=exc_info)
