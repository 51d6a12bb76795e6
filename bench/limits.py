"""Within Replicate's limits: 300 jobs through 3 worker processes against a fake that enforces them.

The fake Replicate enforces Replicate's numbers (600 creates a minute with a burst of 20, 3,000 other
requests a minute with a burst of 100) and runs each prediction for 2 s. Three worker processes, each
with its own settings as if on its own host, share one PostgreSQL and one Redis. Three runs:

* `no limiter, polls`: the shared budgets off (`MEDIAGEN_REPLICATE_*_PER_MINUTE=0`), polling as before;
* `limiter, polls`: the budgets on (600/min with a burst of 10, 3,000/min with a burst of 50);
* `limiter, webhooks`: the budgets on, and the fake's webhooks wake the attempts (`MEDIAGEN_REPLICATE_WEBHOOKS`).

Reported per run: wall time from the first submit to the last job's end against the floor the create
limit sets (300 / 10 per s = 30 s; target within 10 %), 429s the fake answered (target 0), GETs per
job (target at most 1.2 with webhooks; without them, the read budget never exceeded: the fake's own
limit refused none), attempts per job (target 1.0), and jobs that did not succeed.

    python bench/limits.py            # prints the table and writes it into docs/benchmarks.md
    python bench/limits.py --no-write --jobs 100
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mediagen.core.db import libpq_url
from stack import ROOT, Stack, free_port, kill_tree

CREATES_PER_MINUTE = 600
REQUESTS_PER_MINUTE = 3000
MODEL_SECONDS = 2.0
WORKERS = 3
BEGIN, END = "<!-- limits:begin -->", "<!-- limits:end -->"

FAKE = {
    "latency": MODEL_SECONDS,
    "create_rate_per_minute": CREATES_PER_MINUTE,
    "create_burst": 20,
    "request_rate_per_minute": REQUESTS_PER_MINUTE,
    "request_burst": 100,
}
MODES: dict[str, dict[str, str]] = {
    "no limiter, polls": {
        "MEDIAGEN_REPLICATE_CREATES_PER_MINUTE": "0",
        "MEDIAGEN_REPLICATE_REQUESTS_PER_MINUTE": "0",
    },
    "limiter, polls": {},
    "limiter, webhooks": {"MEDIAGEN_REPLICATE_WEBHOOKS": "true"},
}


def query(stack: Stack, sql: str) -> Any:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        return conn.execute(sql).fetchone()


async def submit_all(api: str, jobs: int) -> float:
    started = time.time()
    async with httpx.AsyncClient(base_url=api, timeout=30, limits=httpx.Limits(max_connections=32)) as client:

        async def submit(i: int) -> None:
            # Retry-safe with an Idempotency-Key: a dropped connection is tried again, never doubled.
            for _ in range(5):
                try:
                    answer = await client.post(
                        "/generate",
                        json={"prompt": f"a lighthouse #{i}", "parameters": {}},
                        headers={"Idempotency-Key": f"bench-{started}-{i}"},
                    )
                    if answer.status_code in (200, 202):
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.5)
            raise RuntimeError(f"job {i} could not be submitted")

        await asyncio.gather(*(submit(i) for i in range(jobs)))
    return started


def run_mode(stack: Stack, name: str, env: dict[str, str], jobs: int, limit: float) -> dict[str, Any]:
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")
    stack.flush_redis()
    stack.fake_config(**FAKE)
    api = f"http://127.0.0.1:{stack.api_port}"
    common = {
        **env,
        "MEDIAGEN_REPLICATE_WEBHOOK_BASE_URL": api,
        "MEDIAGEN_LOG_LEVEL": "INFO",  # the test harness waits for worker.started
        # Four processes on a PostgreSQL shared with others: a few connections each is plenty.
        "MEDIAGEN_DB_POOL_SIZE": "5",
    }
    workers = [
        stack._spawn(
            f"worker-{i}",
            [sys.executable, "-m", "mediagen.worker"],
            **common,
            MEDIAGEN_WORKER_METRICS_PORT=str(free_port()),
            MEDIAGEN_WORKER_THREADS=str(threads),
        )
        for i, threads in enumerate((256, 200, 300))
    ]
    try:
        for i in range(WORKERS):
            log = stack.workdir / f"worker-{i}.log"
            deadline = time.monotonic() + 30
            while b"worker.started" not in log.read_bytes().split(b"worker.stopped")[-1]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.1)
        stack.fake_reset()
        started = asyncio.run(submit_all(api, jobs))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            done = query(stack, "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')")[0]
            if done >= jobs:
                break
            time.sleep(0.2)
        row = query(
            stack,
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), avg(attempts)::float, "
            "extract(epoch FROM max(finished_at))::float FROM jobs",
        )
        stats = stack.fake_stats()
    finally:
        for worker in workers:
            kill_tree(worker, timeout=30)
    faults = stats.get("faults", {})
    requests = stats.get("requests", {})
    wall = (row[2] or time.time()) - started
    return {
        "mode": name,
        "jobs": jobs,
        "succeeded": row[0],
        "wall_s": wall,
        "floor_s": jobs / (CREATES_PER_MINUTE / 60),
        "throttled": faults.get("rate_limited_create", 0)
        + faults.get("rate_limited_request", 0)
        + faults.get("create_429", 0),
        "gets_per_job": requests.get("gets", 0) / jobs,
        "reads_per_min": 60 * (requests.get("gets", 0) + requests.get("lists", 0)) / max(wall, 1e-9),
        "attempts_per_job": row[1] or 0.0,
        "webhooks": stats.get("webhooks", {}).get("delivered", 0),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | jobs ok | wall (floor 30 s) | vs floor | 429s | GETs/job | reads/min (avg) | attempts/job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['succeeded']}/{r['jobs']} | {r['wall_s']:.1f} s | "
            f"{(r['wall_s'] / r['floor_s'] - 1) * 100:+.0f} % | {r['throttled']} | {r['gets_per_job']:.2f} | "
            f"{r['reads_per_min']:.0f} | {r['attempts_per_job']:.2f} |"
        )
    return "\n".join(lines)


def write(block: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    section = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Within Replicate's limits (`python bench/limits.py`)\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--mode", action="append", choices=list(MODES), help="run only these (default: all)")
    parser.add_argument("--limit", type=float, default=90.0, help="give up on a run after this many seconds")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results = []
    with Stack(log_level="INFO", keep=args.keep) as stack:
        stack.start_api()
        for name in args.mode or list(MODES):
            results.append(run_mode(stack, name, MODES[name], args.jobs, args.limit))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        facts = f"PostgreSQL {stack.facts.get('postgres_version')}, Redis {stack.facts.get('redis_version')}"
    rendered = table(results)
    print(rendered)
    if not args.no_write:
        write(
            f"{rendered}\n\n{args.jobs} jobs, {MODEL_SECONDS:.0f} s model time, {WORKERS} worker processes; the fake "
            f"enforces {CREATES_PER_MINUTE} creates/min (burst 20) and {REQUESTS_PER_MINUTE} other requests/min "
            f"(burst 100). {facts}. Command: `python bench/limits.py`."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
