"""Where the fake keeps its predictions across restarts, as the real Replicate does.

Without a data directory (tests, benchmarks) nothing is written: predictions live in memory only.
With one (``--data-dir`` / ``FAKE_REPLICATE_DATA_DIR``; ``make run`` passes one under
``MEDIAGEN_DATA_DIR``) every create appends one JSON line to ``predictions.jsonl``, and every later
fact about it (a cancel, the webhook it reports to) one more. A line is one ``write`` on an
``O_APPEND`` descriptor, with no fsync: a few microseconds, so thousands of creates a second still
cost the event loop next to nothing, and the lines survive the process being killed (not the
machine losing power, which a fake may forget). Webhooks of predictions still running are sent
again after a restart, as Replicate goes on sending them.

What is stored are the facts a prediction's status is derived from (its input, creation wall-clock
time, latency and fated outcome, a cancel's moment), never the status itself: a prediction that
was ``processing`` when the fake stopped is found ``succeeded`` after a restart once its time has
come, and its output files are rendered again from the same input. Lines older than
``RETENTION_SECONDS`` are dropped when the file is read at start, so the file does not grow forever.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = ["FILE_NAME", "RETENTION_SECONDS", "PredictionStore"]

FILE_NAME: Final = "predictions.jsonl"
RETENTION_SECONDS: Final = 7 * 24 * 3600.0

Record = dict[str, Any]


class PredictionStore:
    """Append-only JSON lines: creates (``{"id", ..., "created"}``) and updates (``{"id", "canceled_after"}``, ...)."""

    def __init__(self, data_dir: Path | None) -> None:
        self.path = data_dir / FILE_NAME if data_dir is not None else None
        self._fd: int | None = None

    @property
    def persistent(self) -> bool:
        return self.path is not None

    def load(self) -> list[Record]:
        """The stored creates, oldest first, each with its cancel merged in; then open for appends."""
        if self.path is None:
            return []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: dict[str, Record] = {}
        kept_lines = 0
        read_lines = 0
        for record in self._read():
            read_lines += 1
            if "created" not in record:  # an update of a create read before
                known = records.get(str(record.get("id")))
                if known is not None:
                    known.update(record)
                continue
            records[str(record["id"])] = record
        horizon = time.time() - RETENTION_SECONDS
        kept = [record for record in records.values() if float(record.get("created", 0)) >= horizon]
        kept_lines = len(kept)
        if kept_lines != read_lines:
            self._rewrite(kept)
        self._open()
        return kept

    def created(self, record: Record) -> None:
        self._append(record)

    def update(self, prediction_id: str, **facts: Any) -> None:
        """More facts about a stored prediction (``canceled_after``, ``webhook``, ...)."""
        self._append({"id": prediction_id, **facts})

    def clear(self) -> None:
        """Forget every prediction (``POST /_fake/reset``)."""
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
        temporary.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
        os.replace(temporary, self.path)
