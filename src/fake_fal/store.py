"""Where the fake keeps its requests across restarts, as fal's durable queue does.

Without a data directory (tests, benchmarks) nothing is written. With one (``--data-dir`` /
``FAKE_FAL_DATA_DIR``) every submit appends one JSON line to ``requests.jsonl``, and every later fact
about it (a cancel) one more: one ``write`` on an ``O_APPEND`` descriptor, no fsync, so the lines
survive the process being killed. What is stored are the facts a request's status is derived from
(endpoint, input, wall-clock submit time, queue time, latency, fated outcome, cancel moment, webhook
URL), never the status itself: a request IN_PROGRESS when the fake stopped is found COMPLETED after a
restart once its time has come, and its images are rendered again from the same input. Webhooks of
requests still running are sent after a restart. Lines older than a week are dropped at start.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson

FILE_NAME: Final = "requests.jsonl"
RETENTION_SECONDS: Final = 7 * 24 * 3600.0

Record = dict[str, Any]


class RequestStore:
    """Append-only JSON lines: submits (``{"id", ..., "created"}``) and updates (``{"id", "canceled_after"}``)."""

    def __init__(self, data_dir: Path | None) -> None:
        self.path = data_dir / FILE_NAME if data_dir is not None else None
        self._fd: int | None = None

    def load(self) -> list[Record]:
        """The stored submits, oldest first, each with its updates merged in; then open for appends."""
        if self.path is None:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: dict[str, Record] = {}
        lines = 0
        for record in self._read():
            lines += 1
            if "created" not in record:
                known = records.get(str(record["id"]))
                if known is not None:
                    known.update(record)
                continue
            records[str(record["id"])] = record
        horizon = time.time() - RETENTION_SECONDS
        kept = [r for r in records.values() if float(r.get("created", 0)) >= horizon]
        if len(kept) != lines:
            self._rewrite(kept)
        self._open()
        return kept

    def submitted(self, record: Record) -> None:
        self._append(record)

    def update(self, request_id: str, **facts: Any) -> None:
        self._append({"id": request_id, **facts})

    def clear(self) -> None:
        if self.path is None:
            return
        self.close()
        self.path.write_bytes(b"")
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _append(self, record: Record) -> None:
        if self._fd is not None:
            os.write(self._fd, orjson.dumps(record) + b"\n")

    def _read(self) -> Iterator[Record]:
        assert self.path is not None
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as lines:
            for line in lines:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line cut short by a crash mid-write
                if isinstance(record, dict) and "id" in record:
                    yield record

    def _rewrite(self, records: list[Record]) -> None:
        assert self.path is not None
        temporary = self.path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
        os.replace(temporary, self.path)
