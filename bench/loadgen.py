"""A lean HTTP/1.1 keep-alive load generator: a fixed number of requests at a fixed concurrency.

Runs in its own process (run.py starts it with `python bench/loadgen.py ...` and reads one JSON line
from its stdout), so its CPU is not the API's. Raw asyncio streams on uvloop: N connections, each
sending one request, reading one response, and taking the next request number until all are sent.
Every request's latency is recorded (send to the last body byte). Only 127.0.0.1 is allowed.

    python bench/loadgen.py --port 8000 --method POST --path /generate --body '{"prompt": "x"}' -n 2000 -c 64
    python bench/loadgen.py --port 8000 --paths-file ids.txt -n 5000 -c 64   # GET each path in turn

Prints: {"requests", "ok", "errors", "statuses", "seconds", "rps", "p50_ms", "p90_ms", "p99_ms",
"max_ms", "mean_ms", "started_at", "ended_at"} (`started_at`/`ended_at`: epoch seconds of the first
send and the last answer, so the caller can line them up with database timestamps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def build_request(method: str, path: str, port: int, body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", "Connection: keep-alive"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class ProtocolError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status code, whether the server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    keep_alive = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection":
            keep_alive = value.strip().lower() == b"keep-alive" or (keep_alive and value.strip().lower() != b"close")
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()  # body until close
        keep_alive = False
    return status, keep_alive


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    started_at: float = 0.0
    ended_at: float = 0.0


async def run_load(
    port: int,
    requests: list[bytes],
    total: int,
    concurrency: int,
    time_limit: float,
) -> Result:
    """Send `total` requests (request i is `requests[i % len(requests)]`) over `concurrency` connections."""
    result = Result()
    next_index = 0
    deadline = time.monotonic() + time_limit
    max_errors = max(10, total // 10)

    async def connection() -> None:
        nonlocal next_index
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while next_index < total and time.monotonic() < deadline:
                if sum(result.errors.values()) > max_errors:
                    return
                index = next_index
                next_index += 1
                if writer is None:
                    try:
                        reader, writer = await asyncio.open_connection(LOOPBACK, port)
                    except OSError as exc:
                        result.errors[type(exc).__name__] += 1
                        await asyncio.sleep(0.05)
                        continue
                assert reader is not None
                sent = time.perf_counter()
                if not result.started_at:
                    result.started_at = time.time()
                try:
                    writer.write(requests[index % len(requests)])
                    status, keep_alive = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError) as exc:
                    result.errors[type(exc).__name__] += 1
                    writer.close()
                    writer = reader = None
                    continue
                result.latencies.append(time.perf_counter() - sent)
                result.statuses[status] += 1
                result.ended_at = time.time()
                if not keep_alive:
                    writer.close()
                    writer = reader = None
        finally:
            if writer is not None:
                writer.close()

    tasks = [asyncio.create_task(connection()) for _ in range(min(concurrency, total))]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit + 10)
    except TimeoutError:
        result.errors["TimeLimit"] += 1
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
    return result


def summarize(result: Result, ok_statuses: tuple[int, ...]) -> dict[str, object]:
    latencies = sorted(result.latencies)
    seconds = max(result.ended_at - result.started_at, 1e-9) if latencies else math.nan
    ok = sum(count for status, count in result.statuses.items() if status in ok_statuses)
    return {
        "requests": len(latencies),
        "ok": ok,
        "errors": dict(result.errors),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "seconds": round(seconds, 4),
        "rps": round(len(latencies) / seconds, 1) if latencies else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else math.nan,
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 2) if latencies else math.nan,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
    }


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=LOOPBACK, help="only 127.0.0.1 is accepted")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/")
    parser.add_argument("--body", default=None, help="request body (JSON text)")
    parser.add_argument("--paths-file", default=None, help="one path per line, requested in turn")
    parser.add_argument("-n", "--requests", type=int, required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=60.0, help="stop sending after this many seconds")
    parser.add_argument("--ok", default="200,201,202", help="status codes that count as success")
    args = parser.parse_args(argv)
    if args.host != LOOPBACK:
        parser.error("the load generator only talks to 127.0.0.1")
    if not 0 < args.requests <= 1_000_000 or not 0 < args.concurrency <= 1024:
        parser.error("requests must be 1..1e6 and concurrency 1..1024")
    body = args.body.encode() if args.body is not None else None
    if args.paths_file:
        with open(args.paths_file) as f:
            paths = [line.strip() for line in f if line.strip()]
        requests = [build_request(args.method, path, args.port, body) for path in paths]
    else:
        requests = [build_request(args.method, args.path, args.port, body)]
    load = run_load(args.port, requests, args.requests, args.concurrency, args.time_limit)
    result = run_fast(load)
    ok_statuses = tuple(int(code) for code in args.ok.split(","))
    sys.stdout.write(json.dumps(summarize(result, ok_statuses)) + "\n")


if __name__ == "__main__":
    main()
